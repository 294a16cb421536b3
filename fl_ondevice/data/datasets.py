"""Datasets (digits, fashion_mnist, mnist) with a fixed test split, served as float32 in [0, 1]."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.client
import importlib.metadata
import json
import logging
import os
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
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
# Where keras.datasets.{mnist,fashion_mnist}.load_data() download from; a mirror serving the same
# files (or a local server in tests) replaces it through the environment variable below.
KERAS_DATASETS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
DATASET_URL_ENV = "FL_ONDEVICE_DATASET_URL"
# sha256 of each file a download fetches. mnist.npz: the hash keras.datasets.mnist checks.
# Fashion-MNIST: keras checks none; these are the hashes TensorFlow Datasets pins for Zalando's
# original files (url_checksums/fashion_mnist.txt), which keras' copies match in name and size
# (26421880, 29515, 4422102 and 5148 bytes).
DOWNLOAD_SHA256: Mapping[str, Mapping[str, str]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
        ),
        "train-labels-idx1-ubyte.gz": (
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
        ),
    },
    "mnist": {
        KERAS_MNIST_NPZ: "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    },
}
# Seconds a connection attempt or one read may stall (not a limit on the whole file).
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20  # 1 MiB: the download is streamed, never held whole in memory
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

    Images are kept as the dataset ships them: uint8 for fashion_mnist and mnist (a quarter of
    the memory of float32, in every process that holds the dataset), float32 in [0, 1] for
    digits. :meth:`train_x` and :meth:`test_x` convert only the examples asked for (a client's
    partition, an evaluation set) to float32 in [0, 1]; ``x_train`` and ``x_test`` are the whole
    splits, converted once and kept.

    Attributes
    ----------
    name : str
        Dataset name (``digits``, ``fashion_mnist``, ``mnist``).
    train_images, test_images : np.ndarray
        Images as stored, shape (N, H, W): uint8 in 0..255 (pixel / 255 is the model's input)
        or float32 in [0, 1]; read-only.
    y_train, y_test : np.ndarray
        Labels, shape (N,), int64 in [0, num_classes), read-only.
    num_classes : int
        Number of classes.
    """

    name: str
    train_images: np.ndarray  # (N, H, W) uint8 0..255, or float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    test_images: np.ndarray  # (M, H, W), as train_images
    y_test: np.ndarray  # (M,) int64
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int]:
        """Image shape (H, W) of one example."""
        return (int(self.train_images.shape[1]), int(self.train_images.shape[2]))

    def train_x(self, indices: np.ndarray | slice | None = None) -> np.ndarray:
        """Train images ``indices`` (all when None) as float32 in [0, 1], shape (len, H, W).

        A new array, except that float32 images (digits) selected by a slice or None are a
        read-only view of the stored ones, as indexing an array gives.
        """
        return unit_float32(self.train_images if indices is None else self.train_images[indices])

    def test_x(self, indices: np.ndarray | slice | None = None) -> np.ndarray:
        """Test images ``indices`` (all when None) as float32 in [0, 1]; as :meth:`train_x`."""
        return unit_float32(self.test_images if indices is None else self.test_images[indices])

    @functools.cached_property
    def x_train(self) -> np.ndarray:
        """The whole train split, float32 in [0, 1], (N, H, W), read-only. Converted on first
        use and kept for the dataset's life: four times the memory of uint8 images, so code
        that uses some examples at a time calls :meth:`train_x` instead."""
        return _read_only(self.train_x())

    @functools.cached_property
    def x_test(self) -> np.ndarray:
        """The whole test split, float32 in [0, 1], (M, H, W), read-only; as ``x_train``."""
        return _read_only(self.test_x())


def unit_float32(images: np.ndarray) -> np.ndarray:
    """Images as float32 in [0, 1]: uint8 pixels divided by 255, float32 ones as they are.

    The division is the same for any subset of a split, so a client's images are bit-identical
    to the same rows of the whole split converted at once.
    """
    if images.dtype == np.float32:
        return images
    if images.dtype != np.uint8:
        raise DataError(f"images are {images.dtype}; expected uint8 0..255 or float32 in [0, 1]")
    # In-place division keeps one output copy and maps 255 to exactly 1.0 (multiplying by a
    # rounded 1/255 need not).
    out = images.astype(np.float32)
    np.divide(out, np.float32(255.0), out=out)
    return out


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def load_dataset(cfg: DatasetConfig, seed: int = 0, cache_dir: str | None = None) -> Dataset:
    """Load a dataset, once per process (later calls with equal arguments return the same object).

    Parameters
    ----------
    cfg : DatasetConfig
        ``name`` selects the dataset; ``data_dir`` and ``download`` steer the file lookup of
        fashion_mnist and mnist (``download`` fetches them with `fetch_dataset` when no
        directory has them); ``test_fraction`` is the held-out share of digits;
        ``classes`` keeps only those classes (train and test), relabelled 0..k-1 in that order.
    seed : int
        Seed of the stratified train/test split of digits. fashion_mnist and mnist have an
        official split and ignore it.
    cache_dir : str or None
        Where digits keeps its split (``<cache_dir>/datasets/digits-<key>.npz``, written by the
        first load): later loads, in any process, read it instead of importing scikit-learn
        (~0.8 s, paid by every message of a deployed node). None: split anew. fashion_mnist
        and mnist ignore it.

    Returns
    -------
    Dataset
        Read-only arrays: images (N, H, W), uint8 for fashion_mnist and mnist, float32 in
        [0, 1] for digits (``Dataset.train_x`` gives float32 for any of them); labels (N,)
        int64; ``num_classes`` is ``len(cfg.classes)`` when classes are selected.

    Raises
    ------
    DataError
        The files are missing (message lists every place looked and how to get them), corrupt, or
        the download failed.
    """
    classes = tuple(int(c) for c in cfg.classes) if cfg.classes is not None else None
    if cfg.name == "digits":
        cache = os.path.expanduser(cache_dir) if cache_dir else None
        return _load_cached(
            cfg.name, None, False, float(cfg.test_fraction), int(seed), classes, cache
        )
    # Official split: seed, test_fraction and the cache do not matter, keep them out of the key.
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
    cache_dir: str | None = None,
) -> Dataset:
    if classes is not None:
        full = _load_cached(name, data_dir, download, test_fraction, seed, None, cache_dir)
        return select_classes(full, classes)
    if name == "digits":
        dataset = _load_digits(test_fraction, seed, cache_dir)
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


# Bump when _split_digits changes what it returns, so stale cached splits are ignored.
DIGITS_CACHE_VERSION = 1
DIGITS_ARRAYS = ("x_train", "y_train", "x_test", "y_test")  # the cached file's arrays


def digits_cache_file(cache_dir: str | os.PathLike[str], test_fraction: float, seed: int) -> Path:
    """Where :func:`load_dataset` keeps the digits split of ``(test_fraction, seed)``: keyed by
    everything that determines its arrays (the split's arguments, the scikit-learn that makes
    it, this code's version). ``dataset.classes`` is applied after loading: not in the key."""
    try:
        sklearn = importlib.metadata.version("scikit-learn")  # a few ms, without importing it
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "dataset.name=digits comes with scikit-learn, which is not installed: "
            "pip install scikit-learn"
        ) from None
    spec = {
        "test_fraction": test_fraction,
        "seed": seed,
        "scikit-learn": sklearn,
        "code": DIGITS_CACHE_VERSION,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "datasets" / f"digits-{key}.npz"


def _load_digits(test_fraction: float, seed: int, cache_dir: str | None) -> Dataset:
    if cache_dir is None:
        return _split_digits(test_fraction, seed)
    path = digits_cache_file(cache_dir, test_fraction, seed)
    cached = _read_digits(path)
    if cached is not None:
        return cached
    dataset = _split_digits(test_fraction, seed)
    _write_digits(path, dataset)
    return dataset


def _split_digits(test_fraction: float, seed: int) -> Dataset:
    # Imported here: sklearn.datasets costs ~1 s of start-up that the IDX datasets do not need.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # (1797, 64) float64 in 0..16, (1797,) int
    images = (x.reshape(-1, 8, 8) / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        images, y.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=y
    )
    return _make_dataset("digits", x_train, y_train, x_test, y_test, NUM_CLASSES["digits"])


def _read_digits(path: Path) -> Dataset | None:
    """The split cached in ``path``, or None when there is none or it cannot be used."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            x_train, y_train, x_test, y_test = (npz[k] for k in DIGITS_ARRAYS)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        log.warning("cached digits split %s cannot be read (%s); splitting anew", path, err)
        return None
    images_ok = all(x.dtype == np.float32 and x.shape[1:] == (8, 8) for x in (x_train, x_test))
    labels_ok = all(y.dtype == np.int64 and y.ndim == 1 for y in (y_train, y_test))
    sizes_ok = len(x_train) == len(y_train) and len(x_test) == len(y_test)
    if not (images_ok and labels_ok and sizes_ok):
        log.warning("cached digits split %s holds other arrays; splitting anew", path)
        return None
    return _make_dataset("digits", x_train, y_train, x_test, y_test, NUM_CLASSES["digits"])


def _write_digits(path: Path, dataset: Dataset) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as file:  # the names of DIGITS_ARRAYS
            np.savez(
                file,
                x_train=dataset.train_images,
                y_train=dataset.y_train,
                x_test=dataset.test_images,
                y_test=dataset.y_test,
            )
        os.replace(tmp, path)  # atomic: the nodes of one machine may load at once
    except OSError as err:  # only a cache: the run goes on, each load splits anew
        with contextlib.suppress(OSError):  # none to remove when the directory is unusable
            tmp.unlink(missing_ok=True)
        log.warning("cannot cache the digits split in %s (%s); each load splits anew", path, err)


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
        dataset.train_images[train],  # as stored: uint8 stays uint8
        relabel[dataset.y_train[train]],
        dataset.test_images[test],
        relabel[dataset.y_test[test]],
        len(classes),
    )


def _make_dataset(
    name: str,
    train_images: np.ndarray,
    y_train: np.ndarray,
    test_images: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    arrays = [np.ascontiguousarray(a) for a in (train_images, y_train, test_images, y_test)]
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
            return _read_idx_files(name, directory, files)
        looked.append(f"{directory}/ (the four IDX files, .gz or plain)")
        if name == "mnist" and (directory / KERAS_MNIST_NPZ).is_file():
            return _load_mnist_npz(directory / KERAS_MNIST_NPZ)
        if name == "mnist":
            looked.append(f"{directory / KERAS_MNIST_NPZ} (keras' npz)")
    places = "\n  ".join(looked)
    if download:
        try:
            return fetch_dataset(name)
        except DataError as err:
            # The download's own message has the URL, the cause and the offline fix.
            raise DataError(
                f"dataset {name!r} not found locally and its download failed. Looked in:\n"
                f"  {places}\n{err}"
            ) from None
    raise DataError(
        f"dataset {name!r} not found and dataset.download=false. IDX files: "
        f"{', '.join(s + '.gz' for s in IDX_FILES.values())}. Looked in:\n  {places}\n"
        f"To get it: {HOW_TO_GET[name]}; or allow a download with dataset.download=true."
    )


def _read_idx_files(name: str, directory: Path, files: Mapping[str, Path]) -> Dataset:
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


def fetch_dataset(
    name: str, *, base_url: str | None = None, sha256: Mapping[str, str] | None = None
) -> Dataset:
    """Download the files of ``name`` into the Keras cache, verify their sha256, and read them.

    Fetches the files keras.datasets fetches into the places it keeps them, so a cache filled by
    either serves both: fashion_mnist's four IDX ``.gz`` files into
    ``<keras cache>/fashion-mnist/``, mnist's ``mnist.npz`` into ``<keras cache>/`` (see
    `keras_cache_dir`). A file already there with the expected sha256 is not fetched again.
    Plain ``urllib``: importing TensorFlow (~500 MiB) is what a client node must avoid. Each file
    is written under a temporary name beside its target and renamed only once its sha256
    matches, so a failed or corrupt download leaves no file behind and processes downloading at
    the same time never read a half-written one.

    Parameters
    ----------
    name : str
        ``fashion_mnist`` or ``mnist``.
    base_url : str or None
        URL of the directory holding the files (each file's name is appended). None: the
        environment variable ``FL_ONDEVICE_DATASET_URL`` if set and non-empty (a mirror, or a
        local server in tests), else keras' `KERAS_DATASETS_URL`.
    sha256 : Mapping of str to str, or None
        Expected sha256 (hex) of each file, by file name; must name exactly the files of
        ``DOWNLOAD_SHA256[name]``. None: ``DOWNLOAD_SHA256[name]``, the published files' hashes;
        pass a table only to fetch other files of the same names (tests do). The environment
        variable changes where files come from, never what they must hash to.

    Returns
    -------
    Dataset
        As `load_dataset` returns it without ``classes``.

    Raises
    ------
    DataError
        An unknown ``name``, or a file could not be fetched or written (HTTP error, network
        failure, sha256 mismatch, unwritable cache): the message names the URL, the cause and
        how to get the dataset offline.
    """
    if name not in DOWNLOAD_SHA256:
        raise DataError(
            f"cannot download dataset {name!r}: choose one of {sorted(DOWNLOAD_SHA256)}"
        )
    expected = DOWNLOAD_SHA256[name] if sha256 is None else sha256
    if set(expected) != set(DOWNLOAD_SHA256[name]):
        raise DataError(
            f"sha256 table for {name} names {sorted(expected)}; it must name exactly the files "
            f"{sorted(DOWNLOAD_SHA256[name])}"
        )
    base = base_url or os.environ.get(DATASET_URL_ENV) or KERAS_DATASETS_URL
    directory = keras_cache_dir() / KERAS_SUBDIRS[name]
    for file_name, file_sha256 in expected.items():
        _download_file(name, f"{base.rstrip('/')}/{file_name}", directory / file_name, file_sha256)
    if name == "mnist":
        return _load_mnist_npz(directory / KERAS_MNIST_NPZ)
    files = {key: directory / f"{stem}.gz" for key, stem in IDX_FILES.items()}
    return _read_idx_files(name, directory, files)


def _download_file(name: str, url: str, target: Path, sha256: str) -> None:
    if target.is_file() and _sha256_of(target) == sha256:
        log.info("%s already downloaded (sha256 matches)", target)
        return
    log.info("downloading %s to %s", url, target)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Beside the target, so that the final rename stays on one file system and is atomic.
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        tmp = Path(tmp_name)
        found = _stream_into(url, fd)
        if found == sha256:
            os.replace(tmp, target)
            return
        reason = (
            f"the file's sha256 is {found}, expected {sha256}: the transfer was corrupted or the "
            f"server holds another file under this name (a mirror in {DATASET_URL_ENV} must "
            "serve the original files)"
        )
    # URLError/HTTPError and socket timeouts are OSErrors, IncompleteRead is an HTTPException,
    # a malformed URL (e.g. in the environment variable) is a ValueError.
    except (OSError, http.client.HTTPException, ValueError) as err:
        reason = f"{type(err).__name__}: {err}"
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # gone already after a successful rename
    raise DataError(
        f"cannot download {url} to {target}: {reason}. The file was not written. "
        f"To get {name} offline: {HOW_TO_GET[name]}."
    )


def _stream_into(url: str, fd: int) -> str:
    """Write the body of ``url`` to the open file ``fd`` (closing it); return its sha256 (hex)."""
    digest = hashlib.sha256()
    with (
        os.fdopen(fd, "wb") as out,
        urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
    ):
        while chunk := response.read(_CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


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
    # Kept as uint8: Dataset.train_x/test_x convert the examples a caller uses.
    return _make_dataset(
        name, x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), num_classes
    )


__all__ = [
    "DATASET_URL_ENV",
    "DOWNLOAD_SHA256",
    "Dataset",
    "IDX_FILES",
    "KERAS_DATASETS_URL",
    "SYSTEM_DIRS",
    "candidate_dirs",
    "clear_cache",
    "digits_cache_file",
    "fetch_dataset",
    "keras_cache_dir",
    "load_dataset",
    "read_idx",
    "select_classes",
    "unit_float32",
]
