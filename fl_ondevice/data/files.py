"""dataset=files: your own (federated) data from one ``.npz`` file.

Arrays: ``x`` (N, H, W) or (N, H, W, C) images, uint8 0..255 or floats in [0, 1]; ``y`` (N,)
integer labels 0..k-1; optional ``client`` (N,), any values, one natural client each (the
clients are the sorted distinct values); optional ``x_test``/``y_test``, the central test set.
Without them a seeded ``test_fraction`` of the rows is held out as the central test set. Every
check fails with one line that names the file, the array and what to change.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from fl_ondevice.data.dataset import Dataset, make_dataset
from fl_ondevice.errors import DataError

REQUIRED = ("x", "y")
OPTIONAL = ("client", "x_test", "y_test")


def load_files_dataset(path: str, test_fraction: float, seed: int) -> Dataset:
    """Read a files dataset from ``path`` (a ``.npz``), checked array by array.

    Parameters
    ----------
    path : str
        The ``.npz`` file (``~`` expanded).
    test_fraction : float
        Share of the rows held out as the central test set when the file has no ``x_test``.
    seed : int
        Seed of that hold-out.

    Returns
    -------
    Dataset
        Named ``files``; ``train_clients`` set when the file has a ``client`` array.

    Raises
    ------
    DataError
        The file is missing or unreadable, an array is missing, lengths or shapes disagree, the
        labels are not 0..k-1, or pixel values are out of range.
    """
    file = Path(os.path.expanduser(path))
    arrays = _read(file)
    where = f"dataset.path={path}"
    x, y = _images(arrays["x"], where, "x"), _labels(arrays["y"], where, "y")
    _same_length(x, y, where, "x", "y")
    classes = np.unique(y)
    k = int(classes.max()) + 1 if len(classes) else 0
    if len(classes) < 2 or not np.array_equal(classes, np.arange(k)):
        raise DataError(
            f"{where}: y holds labels {_short(classes)}; labels must be 0..k-1 with every class "
            "present (at least 2); renumber them, e.g. np.unique(y, return_inverse=True)[1]"
        )
    clients = None
    if "client" in arrays:
        raw = np.asarray(arrays["client"])
        if raw.ndim != 1 or len(raw) != len(y):
            raise DataError(
                f"{where}: client has shape {raw.shape}; need one value per image, ({len(y)},)"
            )
        clients = np.unique(raw, return_inverse=True)[1].astype(np.int64)
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{where}: has only one of x_test and y_test; give both or neither")
    if "x_test" not in arrays:
        return _hold_out(x, y, clients, k, test_fraction, seed)
    x_test, y_test = (
        _images(arrays["x_test"], where, "x_test"),
        _labels(arrays["y_test"], where, "y_test"),
    )
    _same_length(x_test, y_test, where, "x_test", "y_test")
    if x_test.shape[1:] != x.shape[1:]:
        raise DataError(
            f"{where}: x_test images are {x_test.shape[1:]} but x images are {x.shape[1:]}"
        )
    if len(y_test) and (y_test.min() < 0 or y_test.max() >= k):
        raise DataError(
            f"{where}: y_test holds labels {_short(np.unique(y_test))} outside y's 0..{k - 1}"
        )
    return make_dataset("files", x, y, x_test, y_test, k, clients)


def _read(file: Path) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise DataError(f"dataset.path={file}: no such file; give the .npz with arrays x and y")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(
            f"dataset.path={file}: not a readable .npz ({err}); write it with np.savez"
        ) from None
    missing = [name for name in REQUIRED if name not in arrays]
    if missing:
        raise DataError(
            f"dataset.path={file}: no array {missing} (it has {sorted(arrays)}); a files dataset "
            f"needs x (N, H, W) and y (N,), optionally {list(OPTIONAL)}"
        )
    return arrays


def _images(x: np.ndarray, where: str, name: str) -> np.ndarray:
    if x.ndim not in (3, 4):
        raise DataError(
            f"{where}: {name} has shape {x.shape}; "
            "need grey (N, H, W) or colour (N, H, W, C) images"
        )
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: {name} is {x.dtype}; need uint8 0..255 or floats in [0, 1]")
    x = x.astype(np.float32)
    if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise DataError(
            f"{where}: {name} spans {x.min():g}..{x.max():g}; float images must be in [0, 1] "
            "(divide 0..255 pixels by 255, or store them as uint8)"
        )
    return x


def _labels(y: np.ndarray, where: str, name: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: {name} is {y.dtype} {y.shape}; need integer labels (N,)")
    return y.astype(np.int64)


def _same_length(x: np.ndarray, y: np.ndarray, where: str, xs: str, ys: str) -> None:
    if len(x) != len(y):
        raise DataError(
            f"{where}: {xs} has {len(x)} images but {ys} has {len(y)} labels; "
            "need one label per image"
        )


def _short(values: np.ndarray) -> str:
    shown = values[:12].tolist()
    return f"{shown}{' ...' if len(values) > 12 else ''}"


def _hold_out(
    x: np.ndarray, y: np.ndarray, clients: np.ndarray | None, k: int, fraction: float, seed: int
) -> Dataset:
    """A seeded ``fraction`` of the rows as the central test set, the rest for the clients."""
    n_test = int(np.floor(fraction * len(y) + 0.5))
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    train_clients = None if clients is None else clients[train]
    return make_dataset("files", x[train], y[train], x[test], y[test], k, train_clients)
