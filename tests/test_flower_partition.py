"""Flower Datasets partitioners by ``partition._target_`` (fl_ondevice.data.flower): indices,
seeds, errors, the partition command and a short federation."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_ondevice.config import PartitionConfig
from fl_ondevice.data.dataset import make_dataset
from fl_ondevice.data.flower import flower_partition_indices
from fl_ondevice.data.partitioners import make_partitions, partition_indices
from fl_ondevice.errors import DataError

FLOWER = "flwr_datasets.partitioner."
# 2,000 labels, unequal classes (120..280 per label), shuffled.
CLASS_SIZES = np.array([120, 280, 200, 150, 250, 180, 220, 160, 240, 200])
ARGS = {
    "IidPartitioner": {},
    "DirichletPartitioner": {"alpha": 0.5},
    "PathologicalPartitioner": {"num_classes_per_partition": 2},
    "ShardPartitioner": {"num_shards_per_partition": 2, "shard_size": 100},
}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), CLASS_SIZES))


def flower(name: str, **kwargs: object) -> PartitionConfig:
    return PartitionConfig(_target_=FLOWER + name, **{**ARGS.get(name, {}), **kwargs})


@pytest.mark.parametrize("name", sorted(ARGS))
def test_flower_partitioners_give_disjoint_seeded_index_sets(labels: np.ndarray, name: str) -> None:
    # Execute
    parts = flower_partition_indices({"label": labels}, 10, flower(name), seed=0)
    again = flower_partition_indices({"label": labels}, 10, flower(name), seed=0)
    other = flower_partition_indices({"label": labels}, 10, flower(name), seed=1)

    # Assert
    assert len(parts) == 10 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    assert joined.min() >= 0 and joined.max() < len(labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_flower_iid_is_shuffled_from_the_seed_and_sized_as_ours(labels: np.ndarray) -> None:
    # IidPartitioner cuts rows in order; it gets them in a seeded order, so a client's rows are
    # spread over the whole set, and both cut 2,000 into 7 as 286 x 5 + 285 x 2.
    parts = flower_partition_indices({"label": labels}, 7, flower("IidPartitioner"), seed=3)
    ours = partition_indices(labels, 7, PartitionConfig(name="iid"), 3, 10)

    assert [len(p) for p in parts] == [286] * 5 + [285] * 2 == [len(p) for p in ours]
    assert np.concatenate(parts).tolist() != list(range(2000))
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))
    assert parts[0].max() - parts[0].min() > 1000  # not one contiguous run


def test_flower_shards_and_ours_give_every_client_two_shards_of_100(labels: np.ndarray) -> None:
    theirs = flower_partition_indices({"label": labels}, 10, flower("ShardPartitioner"), seed=0)
    ours = partition_indices(
        labels, 10, PartitionConfig(name="shards", shards_per_client=2, shard_size=100), 0, 10
    )

    assert [len(p) for p in theirs] == [200] * 10 == [len(p) for p in ours]
    # Shards of a label-sorted order: 2 shards of 100 hold at most 2 + 2 labels (a shard may
    # straddle a label boundary).
    assert max(len(np.unique(labels[p])) for p in theirs) <= 4


def test_pathological_gives_each_client_its_number_of_classes(labels: np.ndarray) -> None:
    parts = flower_partition_indices(
        {"label": labels}, 10, flower("PathologicalPartitioner"), seed=0
    )

    assert {len(np.unique(labels[p])) for p in parts} == {2}


def test_make_partitions_with_a_flower_partitioner_keeps_our_local_test_split(
    labels: np.ndarray,
) -> None:
    images = np.zeros((len(labels), 2, 2), np.uint8)
    dataset = make_dataset("toy", images, labels, images[:5], labels[:5], 10)
    cfg = flower("DirichletPartitioner", local_test_fraction=0.25)

    partitions = make_partitions(dataset, 5, cfg, seed=0)
    rows = flower_partition_indices({"label": labels}, 5, cfg, seed=0)

    for p, r in zip(partitions, rows, strict=True):
        assert np.array_equal(np.sort(np.concatenate([p.train_indices, p.test_indices])), r)
        assert len(p.test_indices) == int(np.floor(0.25 * len(r) + 0.5))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (flower("NaturalIdPartitioner", partition_by="client"), "partition.partition_by='client'"),
        (PartitionConfig(_target_=FLOWER + "PathologicalPartitioner"), "num_classes_per_part"),
        (flower("IidPartitioner", args={"alpha2": 1}), "partition.args ['alpha2']"),
        (PartitionConfig(_target_="flwr_datasets.partitioner.Nope"), "cannot be loaded"),
        (flower("ShardPartitioner", shard_size=1000), "ShardPartitioner with"),
    ],
)
def test_bad_flower_partition_requests_fail_with_one_line(
    labels: np.ndarray, cfg: PartitionConfig, message: str
) -> None:
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        flower_partition_indices({"label": labels}, 10, cfg, seed=0)
    assert "\n" not in str(err.value)


def test_partition_command_with_flower_dirichlet_writes_report_and_heat_map(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "fl_ondevice.partition",
        f"partition._target_={FLOWER}DirichletPartitioner",
        "partition.alpha=0.3",
        "partition.partition_by=label",
        "num_clients=20",
        f"hydra.run.dir={run_dir}",
    ]

    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=pytestconfig.rootpath
    )

    assert result.returncode == 0, result.stderr
    assert "DirichletPartitioner" in result.stdout and "20 clients" in result.stdout
    assert (run_dir / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run_dir / "partition.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 20
    assert sum(int(r["n_train"]) + int(r["n_test"]) for r in table) == 1437  # digits' train split
    assert min(int(r["n_train"]) + int(r["n_test"]) for r in table) >= 10  # min_partition_size


def test_partition_command_names_a_missing_column_in_one_line(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    command = [
        sys.executable,
        "-m",
        "fl_ondevice.partition",
        f"partition._target_={FLOWER}NaturalIdPartitioner",
        "partition.partition_by=writer",
        f"hydra.run.dir={tmp_path}",
    ]

    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=pytestconfig.rootpath
    )

    assert result.returncode != 0
    assert "partition.partition_by='writer'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_federation_on_flower_iid_partitions_writes_their_sizes_in_clients_csv(run) -> None:
    out = run("num_clients=4", "num_rounds=2", f"partition._target_={FLOWER}IidPartitioner")

    with open(out / "clients.csv") as f:
        table = list(csv.DictReader(f))
    # digits' 1,437 training images cut into 4 (360, 359, 359, 359), 20% of each held out
    # locally (72 each, rounded).
    assert [int(r["examples"]) + int(r["test_examples"]) for r in table] == [360, 359, 359, 359]
    assert [int(r["test_examples"]) for r in table] == [72] * 4
    assert (out / "partition.png").stat().st_size > 0
    with open(out / "metrics.csv") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["0", "1", "2"]
