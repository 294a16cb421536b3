"""dataset=femnist (fl_ondevice.data.leaf) on small files in LEAF's JSON layout: one client per
writer, LEAF's per-writer test split as local test sets, errors, a short federation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fl_ondevice.config import DatasetConfig, PartitionConfig
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.data.leaf import load_femnist
from fl_ondevice.data.partitioners import make_partitions
from fl_ondevice.errors import DataError

WRITERS = 30


def writer_size(w: int) -> int:
    return 4 + w % 5


def holdout_size(w: int) -> int:
    return 1 + w % 3


def write_leaf(root: Path, writers: int = WRITERS, seed: int = 0) -> Path:
    """LEAF's data/femnist/data layout: train/ and test/, writers spread over two files each."""
    rng = np.random.default_rng(seed)
    names = [f"f{w:04d}_{w % 7:02d}" for w in range(writers)]
    for split, size in (("train", writer_size), ("test", holdout_size)):
        (root / split).mkdir(parents=True)
        for part, chunk in enumerate((names[: writers // 2], names[writers // 2 :])):
            doc: dict = {"users": [], "num_samples": [], "user_data": {}}
            for name in chunk:
                n = size(names.index(name))
                pixels = rng.integers(0, 256, (n, 784)) / 255.0  # LEAF stores pixel / 255
                doc["users"].append(name)
                doc["num_samples"].append(n)
                doc["user_data"][name] = {
                    "x": pixels.tolist(),
                    "y": rng.integers(0, 62, n).tolist(),
                }
            (root / split / f"all_data_{part}_niid_05_keep_0_{split}_9.json").write_text(
                json.dumps(doc)
            )
    return root


@pytest.fixture(scope="module")
def leaf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_leaf(tmp_path_factory.mktemp("femnist") / "data")


def test_every_writer_is_one_client_with_its_own_train_and_test_samples(leaf_dir: Path) -> None:
    dataset = load_femnist(str(leaf_dir))

    parts = make_partitions(dataset, WRITERS, PartitionConfig(), seed=0)

    assert dataset.num_classes == 62 and dataset.input_shape == (28, 28)
    assert len(dataset.y_test) == sum(
        holdout_size(w) for w in range(WRITERS)
    )  # every writer's test
    assert [len(p.train_indices) for p in parts] == [writer_size(w) for w in range(WRITERS)]
    assert [len(p.test_indices) for p in parts] == [holdout_size(w) for w in range(WRITERS)]


def test_pixels_and_labels_are_the_files_values(leaf_dir: Path) -> None:
    doc = json.loads(sorted((leaf_dir / "train").glob("*.json"))[0].read_text())
    first = doc["user_data"][doc["users"][0]]
    dataset = load_femnist(str(leaf_dir))

    part = make_partitions(dataset, WRITERS, PartitionConfig(), seed=0)[0]

    np.testing.assert_array_equal(
        dataset.train_x(part.train_indices).reshape(-1, 784),
        np.asarray(first["x"], np.float32),  # k / 255 survives the uint8 round trip exactly
    )
    assert dataset.y_train[part.train_indices].tolist() == first["y"]


def test_a_seeded_sample_of_writers_and_other_partitioners_skip_the_writers_test_rows(
    leaf_dir: Path,
) -> None:
    dataset = load_femnist(str(leaf_dir))

    sample = make_partitions(dataset, 10, PartitionConfig(), seed=4)
    flower_iid = "flwr_datasets.partitioner.IidPartitioner"
    iid = make_partitions(dataset, 5, PartitionConfig(_target_=flower_iid), seed=0)

    expected = sorted(np.random.default_rng(4).choice(WRITERS, 10, replace=False).tolist())
    assert [len(p.train_indices) for p in sample] == [writer_size(w) for w in expected]
    assigned = np.concatenate([np.concatenate([p.train_indices, p.test_indices]) for p in iid])
    assert len(assigned) == sum(writer_size(w) for w in range(WRITERS))
    assert dataset.local_test is not None and not dataset.local_test[assigned].any()


def test_missing_leaf_data_names_the_commands_that_make_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="preprocess.sh -s niid") as err:
        load_dataset(DatasetConfig(name="femnist", data_dir=str(tmp_path)))
    assert "github.com/TalwalkarLab/leaf" in str(err.value) and "\n" not in str(err.value)


def test_a_malformed_leaf_file_is_named_in_one_line(tmp_path: Path) -> None:
    root = write_leaf(tmp_path / "data", writers=4)
    bad = sorted((root / "train").glob("*.json"))[0]
    doc = json.loads(bad.read_text())
    doc["num_samples"][0] += 1
    bad.write_text(json.dumps(doc))

    with pytest.raises(DataError, match=f"{bad.name}: not LEAF FEMNIST JSON.*num_samples") as err:
        load_femnist(str(root))
    assert "\n" not in str(err.value)


def test_a_federation_of_30_writers_writes_each_writers_counts_in_clients_csv(
    run, leaf_dir: Path
) -> None:
    out = run(
        "dataset=femnist",
        f"dataset.data_dir={leaf_dir}",
        f"num_clients={WRITERS}",
        "num_rounds=2",
        "client.batch_size=4",
    )

    with open(out / "clients.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["examples"]) for r in table] == [writer_size(w) for w in range(WRITERS)]
    assert [int(r["test_examples"]) for r in table] == [holdout_size(w) for w in range(WRITERS)]
    with open(out / "metrics.csv") as f:
        rounds = list(csv.DictReader(f))
    assert [r["round"] for r in rounds] == ["0", "1", "2"]
    assert rounds[-1]["clients_replied"] == str(WRITERS)
