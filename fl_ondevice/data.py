"""Datasets (digits, fashion_mnist, mnist) as float32 images in [0, 1] with a fixed test split."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
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
        fashion_mnist and mnist (``download`` fetches them with `fetch_dataset` when no
        directory has them); ``test_fraction`` is the held-out share of digits;
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
    "DATASET_URL_ENV",
    "DOWNLOAD_SHA256",
    "Dataset",
    "IDX_FILES",
    "KERAS_DATASETS_URL",
    "SYSTEM_DIRS",
    "candidate_dirs",
    "clear_cache",
    "fetch_dataset",
    "keras_cache_dir",
    "load_dataset",
    "read_idx",
    "select_classes",
]
