"""dataset=cifar10 (fl_ondevice.data.cifar) on small files in CIFAR-10's python batch format:
layout, a safe unpickler, errors, and a short federation with model=simple_cnn."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fl_ondevice.config import DatasetConfig
from fl_ondevice.data.cifar import FOLDER, TEST_BATCH, TRAIN_BATCHES, load_cifar10
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.errors import DataError

PER_BATCH = 24


def write_cifar(root: Path, seed: int = 0) -> Path:
    """``cifar-10-batches-py`` with five train batches and a test batch of 24 images each."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, PER_BATCH).tolist(),
            b"data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * PER_BATCH,
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)  # the official files are protocol-2 pickles
    return root


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"))


def test_batches_become_channels_last_images_with_their_labels(cifar_dir: Path) -> None:
    with (cifar_dir / FOLDER / "data_batch_2").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")

    dataset = load_cifar10(str(cifar_dir), download=False, cache_dir=cifar_dir / "none")

    assert dataset.input_shape == (32, 32, 3) and dataset.num_classes == 10
    assert (len(dataset.y_train), len(dataset.y_test)) == (5 * PER_BATCH, PER_BATCH)
    image = dataset.train_images[PER_BATCH + 3]  # batch 2, image 3
    # Channel-major rows: red plane, green plane, blue plane, each 32 rows of 32.
    for r, c, ch in [(0, 0, 0), (5, 7, 1), (31, 30, 2)]:
        assert image[r, c, ch] == raw[b"data"][3, ch * 1024 + r * 32 + c]
    assert dataset.y_train[PER_BATCH : 2 * PER_BATCH].tolist() == raw[b"labels"]


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    root = write_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with (root / FOLDER / TEST_BATCH).open("wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)

    with pytest.raises(DataError, match="test_batch: not a CIFAR-10 python batch") as err:
        load_cifar10(str(root), download=False, cache_dir=tmp_path / "none")
    assert not marker.exists() and "\n" not in str(err.value)


def test_missing_batches_name_the_places_looked_and_the_archive(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as err:
        load_dataset(DatasetConfig(name="cifar10", data_dir=str(tmp_path), download=False))
    assert str(tmp_path) in str(err.value)


def test_a_federation_on_cifar10_format_data_trains_simple_cnn(run, cifar_dir: Path) -> None:
    out = run(
        "dataset=cifar10",
        f"dataset.data_dir={cifar_dir}",
        "dataset.download=false",
        "model=simple_cnn",
        "partition=iid",
        "num_clients=3",
        "num_rounds=2",
        "client.batch_size=8",
    )

    with open(out / "clients.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["examples"]) + int(r["test_examples"]) for r in table] == [40, 40, 40]
    with open(out / "metrics.csv") as f:
        rounds = list(csv.DictReader(f))
    assert [r["round"] for r in rounds] == ["0", "1", "2"]
    assert rounds[-1]["clients_replied"] == "3"
    assert np.isfinite(float(rounds[-1]["loss"]))
