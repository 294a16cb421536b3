"""The Dataset type: one dataset's fixed train/test split, read-only, and its class subsets."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fl_ondevice.errors import DataError


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
    train_clients : np.ndarray or None
        (N,) int64 in 0..K-1: the natural client of each training row (FEMNIST's writers, a
        files dataset's ``client`` array); None when a partitioner makes the clients.
    local_test : np.ndarray or None
        (N,) bool: training rows that are their client's own test data (LEAF's per-user test
        split), used only as the natural clients' local test sets, never assigned for training.
    """

    name: str
    train_images: np.ndarray  # (N, H, W) uint8 0..255, or float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    test_images: np.ndarray  # (M, H, W), as train_images
    y_test: np.ndarray  # (M,) int64
    num_classes: int
    train_clients: np.ndarray | None = None  # (N,) int64, natural client per training row
    local_test: np.ndarray | None = None  # (N,) bool, a natural client's own test rows

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Image shape of one example: (H, W), or (H, W, C) for colour images."""
        return tuple(int(d) for d in self.train_images.shape[1:])

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
    clients, local = dataset.train_clients, dataset.local_test
    return make_dataset(
        dataset.name,
        dataset.train_images[train],  # as stored: uint8 stays uint8
        relabel[dataset.y_train[train]],
        dataset.test_images[test],
        relabel[dataset.y_test[test]],
        len(classes),
        None if clients is None else clients[train],
        None if local is None else local[train],
    )


def make_dataset(
    name: str,
    train_images: np.ndarray,
    y_train: np.ndarray,
    test_images: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    train_clients: np.ndarray | None = None,
    local_test: np.ndarray | None = None,
) -> Dataset:
    """A :class:`Dataset` of contiguous, read-only copies (or views) of the arrays."""
    arrays = [np.ascontiguousarray(a) for a in (train_images, y_train, test_images, y_test)]
    natural = [None if a is None else np.ascontiguousarray(a) for a in (train_clients, local_test)]
    for array in [*arrays, *(a for a in natural if a is not None)]:
        # Shared by every client of the process: a client writing into it would corrupt the others.
        array.setflags(write=False)
    train_x, train_y, test_x, test_y = arrays
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes, natural[0], natural[1])
