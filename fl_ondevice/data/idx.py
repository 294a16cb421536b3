"""(Fashion-)MNIST from IDX files (or keras' mnist.npz): the reader, the lookup and the loader."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fl_ondevice.config import DATASET_CLASSES
from fl_ondevice.data.dataset import Dataset, make_dataset
from fl_ondevice.data.download import (
    HOW_TO_GET,
    KERAS_MNIST_NPZ,
    KERAS_SUBDIRS,
    download_files,
    keras_cache_dir,
)
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
# IDX type codes (third magic byte) -> big-endian numpy dtype, per the format's definition.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


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


def load_idx_dataset(name: str, data_dir: str | None, download: bool) -> Dataset:
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
    `keras_cache_dir`). The download itself is :func:`fl_ondevice.data.download.download_files`.

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
        As :func:`~fl_ondevice.data.download.download_files` raises it.
    """
    directory = download_files(name, base_url=base_url, sha256=sha256)
    if name == "mnist":
        return _load_mnist_npz(directory / KERAS_MNIST_NPZ)
    files = {key: directory / f"{stem}.gz" for key, stem in IDX_FILES.items()}
    return _read_idx_files(name, directory, files)


def _from_uint8(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    source: str,
) -> Dataset:
    num_classes = DATASET_CLASSES[name]
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
    return make_dataset(
        name, x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), num_classes
    )
