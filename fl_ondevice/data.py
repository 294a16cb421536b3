"""Datasets (digits, fashion_mnist, mnist) as float32 images in [0, 1] with a fixed test split."""

from __future__ import annotations

import functools
import gzip
import importlib
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_ondevice.config import DATASET_CLASSES, DatasetConfig
from fl_ondevice.errors import DataError

log = logging.getLogger(__name__)

# The four files of the IDX distribution; MNIST and Fashion-MNIST share names and shapes.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# System-wide copies: Debian's `dataset-fashion-mnist` installs here; Debian has no MNIST package,
# the mnist path is the same layout for users who unpack it there themselves.
SYSTEM_DIRS = {
    "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}
# Where keras.datasets caches each dataset, relative to the Keras cache (`$KERAS_HOME/datasets`).
KERAS_SUBDIRS = {"fashion_mnist": "fashion-mnist", "mnist": ""}
KERAS_MNIST_NPZ = "mnist.npz"
NUM_CLASSES = DATASET_CLASSES
HOW_TO_GET = {
    "fashion_mnist": (
        "install Debian's package (`apt-get install dataset-fashion-mnist`, files land in "
        "/usr/share/datasets/fashion-mnist/), or put the four IDX .gz files in a directory and "
        "pass dataset.data_dir=PATH"
    ),
    "mnist": (
        "put the four IDX .gz files (train-images-idx3-ubyte.gz, ...) or keras' mnist.npz in a "
        "directory and pass dataset.data_dir=PATH"
    ),
}

# IDX type codes (third magic byte) -> big-endian numpy dtype, per the format's definition.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """One dataset with its fixed train/test split, shared read-only by every client of a process.

    Attributes
    ----------
    name : str
        Dataset name (``digits``, ``fashion_mnist``, ``mnist``).
    x_train, x_test : np.ndarray
        Images, shape (N, H, W), float32 in [0, 1], read-only.
    y_train, y_test : np.ndarray
        Labels, shape (N,), int64 in [0, num_classes), read-only.
    num_classes : int
        Number of classes.
    """

    name: str
    x_train: np.ndarray  # (N, H, W) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray  # (M, H, W) float32 in [0, 1]
    y_test: np.ndarray  # (M,) int64
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int]:
        """Image shape (H, W) of one example."""
        return (int(self.x_train.shape[1]), int(self.x_train.shape[2]))


def load_dataset(cfg: DatasetConfig, seed: int = 0) -> Dataset:
    """Load a dataset, once per process (later calls with equal arguments return the same object).

    Parameters
    ----------
    cfg : DatasetConfig
        ``name`` selects the dataset; ``data_dir`` and ``download`` steer the file lookup of
        fashion_mnist and mnist; ``test_fraction`` is the held-out share of digits;
        ``classes`` keeps only those classes (train and test), relabelled 0..k-1 in that order.
    seed : int
        Seed of the stratified train/test split of digits. fashion_mnist and mnist have an
        official split and ignore it.

    Returns
    -------
    Dataset
        Read-only arrays: images (N, H, W) float32 in [0, 1], labels (N,) int64;
        ``num_classes`` is ``len(cfg.classes)`` when classes are selected.

    Raises
    ------
    DataError
        The files are missing (message lists every place looked and how to get them), corrupt, or
        the download failed.
    """
    classes = tuple(int(c) for c in cfg.classes) if cfg.classes is not None else None
    if cfg.name == "digits":
        return _load_cached(cfg.name, None, False, float(cfg.test_fraction), int(seed), classes)
    # Official split: seed and test_fraction do not matter, keep them out of the cache key.
    return _load_cached(cfg.name, cfg.data_dir, bool(cfg.download), 0.0, 0, classes)


def clear_cache() -> None:
    """Forget every dataset loaded by this process (for tests and long-lived interactive use)."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_cached(
    name: str,
    data_dir: str | None,
    download: bool,
    test_fraction: float,
    seed: int,
    classes: tuple[int, ...] | None = None,
) -> Dataset:
    if classes is not None:
        full = _load_cached(name, data_dir, download, test_fraction, seed)
        return select_classes(full, classes)
    if name == "digits":
        dataset = _load_digits(test_fraction, seed)
    elif name in SYSTEM_DIRS:
        dataset = _load_idx_dataset(name, data_dir, download)
    else:
        raise DataError(f"unknown dataset {name!r}: choose one of {sorted(NUM_CLASSES)}")
    log.info(
        "loaded %s: %d train / %d test examples of shape %s",
        name,
        len(dataset.y_train),
        len(dataset.y_test),
        dataset.input_shape,
    )
    return dataset


def _load_digits(test_fraction: float, seed: int) -> Dataset:
    # Imported here: sklearn.datasets costs ~1 s of start-up that the IDX datasets do not need.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # (1797, 64) float64 in 0..16, (1797,) int
    images = (x.reshape(-1, 8, 8) / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        images, y.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=y
    )
    return _make_dataset("digits", x_train, y_train, x_test, y_test, NUM_CLASSES["digits"])


def select_classes(dataset: Dataset, classes: tuple[int, ...]) -> Dataset:
    """The examples of ``classes`` only, train and test, relabelled 0..k-1 in the listed order.

    Parameters
    ----------
    dataset : Dataset
        The full dataset.
    classes : tuple of int
        Original labels to keep; ``classes[i]`` becomes label ``i``.

    Returns
    -------
    Dataset
        A new read-only dataset with ``num_classes == len(classes)``.
    """
    missing = [c for c in classes if not 0 <= c < dataset.num_classes]
    if missing:
        raise DataError(
            f"dataset.classes={list(classes)}: {missing} are not classes of {dataset.name} "
            f"(0..{dataset.num_classes - 1})"
        )
    # Old label -> new label; -1 for the classes left out.
    relabel = np.full(dataset.num_classes, -1, np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    train, test = (relabel[dataset.y_train] >= 0), (relabel[dataset.y_test] >= 0)
    return _make_dataset(
        dataset.name,
        dataset.x_train[train],
        relabel[dataset.y_train[train]],
        dataset.x_test[test],
        relabel[dataset.y_test[test]],
        len(classes),
    )


def _make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test)]
    for array in arrays:
        # Shared by every client of the process: a client writing into it would corrupt the others.
        array.setflags(write=False)
    return Dataset(name, arrays[0], arrays[1], arrays[2], arrays[3], num_classes)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or plain) into an array of its declared shape and type.

    Parameters
    ----------
    path : str or PathLike
        The file; gzip is recognised by its content, not by the name.

    Returns
    -------
    np.ndarray
        Array with the shape in the header, in the header's type (native byte order).

    Raises
    ------
    DataError
        Names the file and what is wrong: unreadable or corrupt gzip, wrong magic number, unknown
        type code, truncated or trailing data.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from None
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an IDX file: wrong magic number 0x{raw[:4].hex()} (expected "
            f"0x0000TTDD, TT a type code in {[hex(c) for c in _IDX_DTYPES]}, DD the number of "
            "dimensions); the file is corrupt or of another format"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"IDX file {path} is truncated: its header declares {ndim} dimensions "
            f"({header_size} header bytes) but the file has {len(raw)} bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_size
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {what}: header declares shape {shape} of {dtype.name} "
            f"({expected} data bytes) but the file holds {found} data bytes; re-download it"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def keras_cache_dir() -> Path:
    """Directory where keras.datasets keeps its downloads (``$KERAS_HOME/datasets``)."""
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(home) / "datasets"


def candidate_dirs(name: str, data_dir: str | None) -> list[Path]:
    """Directories searched for the IDX files of ``name``, in lookup order.

    Parameters
    ----------
    name : str
        ``fashion_mnist`` or ``mnist``.
    data_dir : str or None
        The configured ``dataset.data_dir``; searched first when given.

    Returns
    -------
    list of Path
        ``data_dir``, the system directory (Debian's), the Keras cache.
    """
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    dirs.append(SYSTEM_DIRS[name])
    dirs.append(keras_cache_dir() / KERAS_SUBDIRS[name])
    return dirs


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in IDX_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _load_idx_dataset(name: str, data_dir: str | None, download: bool) -> Dataset:
    dirs = candidate_dirs(name, data_dir)
    looked: list[str] = []
    for directory in dirs:
        files = _find_idx_files(directory)
        if files is not None:
            log.info("reading %s IDX files from %s", name, directory)
            arrays = {key: read_idx(path) for key, path in files.items()}
            return _from_uint8(
                name,
                arrays["x_train"],
                arrays["y_train"],
                arrays["x_test"],
                arrays["y_test"],
                source=str(directory),
            )
        looked.append(f"{directory}/ (the four IDX files, .gz or plain)")
        if name == "mnist" and (directory / KERAS_MNIST_NPZ).is_file():
            return _load_mnist_npz(directory / KERAS_MNIST_NPZ)
        if name == "mnist":
            looked.append(f"{directory / KERAS_MNIST_NPZ} (keras' npz)")
    if download:
        return _download_with_keras(name, looked)
    places = "\n  ".join(looked)
    raise DataError(
        f"dataset {name!r} not found and dataset.download=false. IDX files: "
        f"{', '.join(s + '.gz' for s in IDX_FILES.values())}. Looked in:\n  {places}\n"
        f"To get it: {HOW_TO_GET[name]}; or allow a download with dataset.download=true."
    )


def _load_mnist_npz(path: Path) -> Dataset:
    log.info("reading mnist from keras' %s", path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in IDX_FILES}
    except (OSError, KeyError, ValueError, zlib.error) as err:
        raise DataError(
            f"cannot read {path} as keras' mnist.npz (arrays {list(IDX_FILES)}): {err}"
        ) from None
    return _from_uint8(
        "mnist",
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        source=str(path),
    )


def _download_with_keras(name: str, looked: list[str]) -> Dataset:
    log.info("%s not found locally; downloading it through keras.datasets", name)
    try:
        # Lazy: importing keras imports TensorFlow (~500 MiB, seconds), only worth it here.
        module = importlib.import_module(f"keras.datasets.{name}")
        (x_train, y_train), (x_test, y_test) = module.load_data()
    except Exception as err:  # noqa: BLE001 - network/SSL/HTTP/IO errors all mean the same here
        places = "\n  ".join(looked)
        raise DataError(
            f"dataset {name!r} not found locally and the download through "
            f"keras.datasets.{name}.load_data() failed: {type(err).__name__}: {err}\n"
            f"Looked in:\n  {places}\nTo get it offline: {HOW_TO_GET[name]}."
        ) from err
    return _from_uint8(name, x_train, y_train, x_test, y_test, source="keras download")


def _from_uint8(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    source: str,
) -> Dataset:
    num_classes = NUM_CLASSES[name]
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{name} {split} split from {source} has images {x.shape} and labels {y.shape}; "
                "expected (N, H, W) images and (N,) labels"
            )
        if x.dtype != np.uint8:
            raise DataError(f"{name} {split} images from {source} are {x.dtype}, expected uint8")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(
                f"{name} {split} labels from {source} span {y.min()}..{y.max()}, "
                f"expected 0..{num_classes - 1}"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{name} from {source}: train images {x_train.shape[1:]} and test images "
            f"{x_test.shape[1:]} differ in shape"
        )

    def scale(x: np.ndarray) -> np.ndarray:
        # uint8 0..255 -> float32 [0, 1]; in-place division keeps one output copy and maps 255 to
        # exactly 1.0 (multiplying by a rounded 1/255 need not).
        out = x.astype(np.float32)
        np.divide(out, np.float32(255.0), out=out)
        return out

    return _make_dataset(
        name,
        scale(x_train),
        y_train.astype(np.int64),
        scale(x_test),
        y_test.astype(np.int64),
        num_classes,
    )


__all__ = [
    "Dataset",
    "IDX_FILES",
    "SYSTEM_DIRS",
    "candidate_dirs",
    "clear_cache",
    "keras_cache_dir",
    "load_dataset",
    "read_idx",
    "select_classes",
]
