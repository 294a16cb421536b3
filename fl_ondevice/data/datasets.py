"""load_dataset: digits, (fashion_)mnist, femnist, cifar10 or files by name, once per process.

Each source has its module: ``digits`` (scikit-learn's, split and cached), ``idx`` (the IDX files
of (Fashion-)MNIST, found locally or fetched by ``download``); ``dataset`` holds the type.
"""

from __future__ import annotations

import functools
import logging
import os

from fl_ondevice.config import DATASETS, DatasetConfig
from fl_ondevice.data.cifar import load_cifar10
from fl_ondevice.data.dataset import Dataset, select_classes
from fl_ondevice.data.digits import load_digits
from fl_ondevice.data.download import keras_cache_dir
from fl_ondevice.data.files import load_files_dataset
from fl_ondevice.data.idx import SYSTEM_DIRS, load_idx_dataset
from fl_ondevice.data.leaf import load_femnist
from fl_ondevice.errors import DataError

log = logging.getLogger(__name__)


def load_dataset(cfg: DatasetConfig, seed: int = 0, cache_dir: str | None = None) -> Dataset:
    """Load a dataset, once per process (later calls with equal arguments return the same object).

    Parameters
    ----------
    cfg : DatasetConfig
        ``name`` selects the dataset; ``data_dir`` and ``download`` steer the file lookup of
        fashion_mnist and mnist (``download`` fetches them with `fetch_dataset` when no
        directory has them); ``test_fraction`` is the held-out share of digits;
        ``classes`` keeps only those classes (train and test), relabelled 0..k-1 in that order;
        ``path`` is a files dataset's ``.npz`` (``fl_ondevice.data.files``).
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
    if cfg.name == "files":  # held out by seed and test_fraction when the file has no test set
        path = os.path.abspath(os.path.expanduser(str(cfg.path)))
        return _load_cached(cfg.name, path, False, float(cfg.test_fraction), int(seed), classes)
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
        dataset = load_digits(test_fraction, seed, cache_dir)
    elif name == "files":
        dataset = load_files_dataset(str(data_dir), test_fraction, seed)
    elif name == "femnist":
        dataset = load_femnist(data_dir)
    elif name == "cifar10":  # keras.datasets.cifar10 unpacks the same archive there too
        dataset = load_cifar10(data_dir, download, keras_cache_dir())
    elif name in SYSTEM_DIRS:
        dataset = load_idx_dataset(name, data_dir, download)
    else:
        raise DataError(f"unknown dataset {name!r}: choose one of {list(DATASETS)}")
    log.info(
        "loaded %s: %d train / %d test examples of shape %s",
        name,
        len(dataset.y_train),
        len(dataset.y_test),
        dataset.input_shape,
    )
    return dataset
