"""scikit-learn's digits (1,797 real 8x8 images): a seeded stratified split, cached on disk."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from fl_ondevice.config import DATASET_CLASSES
from fl_ondevice.data.dataset import Dataset, make_dataset
from fl_ondevice.errors import DataError

log = logging.getLogger(__name__)

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


def load_digits(test_fraction: float, seed: int, cache_dir: str | None) -> Dataset:
    """The digits split of ``(test_fraction, seed)``: read from ``cache_dir`` when a load wrote
    it there, else split anew (and written there); None: split anew, nothing written."""
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
    return make_dataset("digits", x_train, y_train, x_test, y_test, DATASET_CLASSES["digits"])


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
    return make_dataset("digits", x_train, y_train, x_test, y_test, DATASET_CLASSES["digits"])


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
