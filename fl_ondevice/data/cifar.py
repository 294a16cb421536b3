"""dataset=cifar10: the CIFAR-10 python batches, 32x32 colour images, 10 classes.

The python version of CIFAR-10 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html)
is ``data_batch_1`` .. ``data_batch_5`` (50,000 training images) and ``test_batch`` (10,000), each
a pickled dict with ``b"data"`` (N, 3072) uint8, channel-major (1,024 red, green, then blue values
of a 32x32 image, row by row) and ``b"labels"`` (N ints). The pickles are read by an unpickler that
builds only dicts, lists, bytes and numpy arrays, so a crafted file cannot run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from fl_ondevice.data.dataset import Dataset, make_dataset
from fl_ondevice.errors import DataError

log = logging.getLogger(__name__)

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
FOLDER = "cifar-10-batches-py"  # what the official archive unpacks to
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # published with the archive on the page above
# The callables a pickled ndarray needs (numpy 1.x and 2.x module names; protocol-2 pickles
# written by Python 3 rebuild bytes with _codecs.encode). None of them runs anything else.
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def load_cifar10(data_dir: str | None, download: bool, cache_dir: Path) -> Dataset:
    """Read CIFAR-10 from ``data_dir`` (the batches, or their ``cifar-10-batches-py`` folder),
    else from ``cache_dir``, downloading the official archive there when ``download``.

    Returns
    -------
    Dataset
        Images (N, 32, 32, 3) uint8, channels last; labels 0..9.

    Raises
    ------
    DataError
        No batches found (every place looked and how to get them), or a malformed batch.
    """
    places = [Path(os.path.expanduser(data_dir))] if data_dir else []
    places.append(cache_dir)
    for place in places:
        for folder in (place, place / FOLDER):
            if all((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
                return _read_batches(folder)
    if download:
        fetch_cifar10(cache_dir)
        return _read_batches(cache_dir / FOLDER)
    raise DataError(
        f"dataset=cifar10: no {', '.join(TRAIN_BATCHES)} and {TEST_BATCH} in "
        f"{[str(p) for p in places]}; set dataset.data_dir to the unpacked {FOLDER} of {URL}, or "
        "allow dataset.download=true"
    )


def _read_batches(folder: Path) -> Dataset:
    train = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    x_test, y_test = _read_batch(folder / TEST_BATCH)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return make_dataset("cifar10", x_train, y_train, x_test, y_test, 10)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch: Any = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[b"labels"], np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"data {data.shape}, labels {labels.shape}; need (N, 3072), (N,)")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise ValueError("labels outside 0..9")
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err}); re-extract {URL}"
        ) from None
    # (N, 3072) channel-major -> (N, 3, 32, 32) -> channels last (N, 32, 32, 3)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a CIFAR-10 batch holds no {module}.{name}")


def fetch_cifar10(cache_dir: Path) -> None:
    """Download the official archive into ``cache_dir``, check its MD5 and unpack the batches."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading CIFAR-10 (163 MiB) from %s", URL)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        try:
            urllib.request.urlretrieve(URL, archive)
        except OSError as err:
            raise DataError(f"downloading {URL} failed ({err}); set dataset.data_dir") from None
        digest = hashlib.md5(archive.read_bytes()).hexdigest()
        if digest != MD5:
            raise DataError(f"{URL}: MD5 {digest}, expected {MD5}; download it again")
        with tarfile.open(archive) as tar:
            names = {f"{FOLDER}/{n}" for n in (*TRAIN_BATCHES, TEST_BATCH)}
            members = [m for m in tar.getmembers() if m.name in names and m.isfile()]
            tar.extractall(cache_dir, members=members, filter="data")
