"""dataset=femnist: LEAF's FEMNIST JSON files, one natural client per writer.

LEAF (Caldas et al. 2018, arXiv:1812.01097) writes ``data/femnist/data/{train,test}/*.json``, each
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], "y": [..]}}}``
(x: a 28x28 image, pixel / 255, background 1.0; y: 62 classes, 10 digits + 26 + 26 letters). With
LEAF's per-user split (``-t sample``) every writer has train and test samples: a writer's test
samples are its client's local test set, and all writers' test samples are the central test set.
Writers found only in the test files (``-t user``) add to the central test set only.

The files come from LEAF's own preprocessing of NIST Special Database 19; nothing here can
produce them, so a missing directory fails with the commands that do (:data:`HOW_TO_GET`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fl_ondevice.data.dataset import Dataset, make_dataset
from fl_ondevice.errors import DataError

NUM_CLASSES = 62
PIXELS = 28 * 28
LEAF_REPOSITORY = "https://github.com/TalwalkarLab/leaf"
# LEAF's data/femnist/preprocess.sh downloads NIST SD19 (by_class.zip, by_write.zip from
# https://s3.amazonaws.com/nist-srd/SD19/) and writes the JSON; -s niid: one client per writer,
# --sf 0.05: a 5% sample of the 3,500 writers, -k 0: keep every writer, -t sample: per-writer split.
HOW_TO_GET = (
    f"git clone {LEAF_REPOSITORY} && cd leaf/data/femnist && "
    "./preprocess.sh -s niid --sf 0.05 -k 0 -t sample, then dataset.data_dir=leaf/data/femnist/data"
)

Split = tuple[list[str], list[np.ndarray], list[np.ndarray]]  # users, their x, their y


def load_femnist(data_dir: str | None) -> Dataset:
    """Read LEAF FEMNIST from ``data_dir`` (holding ``train/`` and ``test/``, or ``data/train``...).

    Returns
    -------
    Dataset
        Named ``femnist``; images (N, 28, 28) uint8 (LEAF's pixel/255 times 255), labels 0..61.
        The training rows are every writer's train samples, then the test samples of the writers
        that have train samples (``local_test`` marks them); ``train_clients`` numbers the
        writers in the order they first appear in the train files (sorted by name).

    Raises
    ------
    DataError
        No LEAF directory (with the commands that make one), or a malformed file (named).
    """
    train_dir, test_dir = _find_dirs(data_dir)
    users, train_x, train_y = _read_split(train_dir)
    test_users, test_x, test_y = _read_split(test_dir)
    index = {user: i for i, user in enumerate(users)}
    own = [u in index for u in test_users]  # test samples of writers that also train
    pool_x = [*train_x, *(x for x, keep in zip(test_x, own, strict=True) if keep)]
    pool_y = [*train_y, *(y for y, keep in zip(test_y, own, strict=True) if keep)]
    owners = [*users, *(u for u, keep in zip(test_users, own, strict=True) if keep)]
    clients = np.concatenate(
        [np.full(len(y), index[u], np.int64) for u, y in zip(owners, pool_y, strict=True)]
    )
    n_train = sum(len(y) for y in train_y)
    local_test = np.arange(len(clients)) >= n_train
    return make_dataset(
        "femnist",
        _pixels(pool_x),
        np.concatenate(pool_y),
        _pixels(test_x),
        np.concatenate(test_y) if test_y else np.zeros(0, np.int64),
        NUM_CLASSES,
        clients,
        local_test,
    )


def _find_dirs(data_dir: str | None) -> tuple[Path, Path]:
    if not data_dir:
        raise DataError(f"dataset=femnist needs dataset.data_dir=DIR of LEAF's JSON: {HOW_TO_GET}")
    root = Path(os.path.expanduser(data_dir))
    for base in (root, root / "data"):
        if (base / "train").is_dir() and (base / "test").is_dir():
            return base / "train", base / "test"
    raise DataError(
        f"dataset.data_dir={data_dir}: no LEAF train/ and test/ folders there (nor under data/); "
        f"to make them: {HOW_TO_GET}"
    )


def _read_split(directory: Path) -> Split:
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DataError(f"{directory}: no LEAF .json files; to make them: {HOW_TO_GET}")
    users: list[str] = []
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for file in files:
        for user, x, y in _read_file(file):
            users.append(user)
            xs.append(x)
            ys.append(y)
    if len(set(users)) != len(users):
        raise DataError(f"{directory}: a writer appears in two files; LEAF lists each once")
    return users, xs, ys


def _read_file(file: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    try:
        doc: Any = json.loads(file.read_text())
        users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
        out = []
        for user, count in zip(users, counts, strict=True):
            x = np.asarray(data[user]["x"], np.float32).reshape(-1, PIXELS)
            y = np.asarray(data[user]["y"], np.int64).reshape(-1)
            if len(x) != count or len(y) != count:
                raise ValueError(f"writer {user}: num_samples {count}, x {len(x)}, y {len(y)}")
            if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
                raise ValueError(f"writer {user}: labels outside 0..{NUM_CLASSES - 1}")
            out.append((str(user), x, y))
        return out
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{file}: not LEAF FEMNIST JSON ({type(err).__name__}: {err}); each file needs "
            "users, num_samples and user_data with x (784 floats per image) and y"
        ) from None


def _pixels(xs: list[np.ndarray]) -> np.ndarray:
    """LEAF's pixel/255 floats back to uint8 (a quarter of float32's memory), (N, 28, 28)."""
    if not xs:
        return np.zeros((0, 28, 28), np.uint8)
    x = np.concatenate(xs)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise DataError(f"LEAF FEMNIST pixels span {x.min():g}..{x.max():g}; expected [0, 1]")
    return np.rint(x * 255.0).astype(np.uint8).reshape(-1, 28, 28)
