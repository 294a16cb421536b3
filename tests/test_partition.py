"""Tests of fl_ondevice.data.partitioners and .report: properties, local splits, report, CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fl_ondevice.config import PartitionConfig
from fl_ondevice.data.dataset import Dataset
from fl_ondevice.data.partitioners import (
    Partition,
    local_split,
    make_partitions,
    partition_indices,
)
from fl_ondevice.data.report import write_partition_report
from fl_ondevice.errors import DataError

NUM_CLASSES = 10
SEEDS = [0, 1, 7]
# 2,000 examples, deliberately unequal classes (120..280 per label).
CLASS_SIZES = np.array([120, 280, 200, 150, 250, 180, 220, 160, 240, 200])
# Configs under which every partitioner covers the 2,000 examples (shards: 10 x 2 x 100 = 2,000).
COVERING = {
    "iid": PartitionConfig(name="iid"),
    "dirichlet": PartitionConfig(name="dirichlet", alpha=0.5),
    "shards": PartitionConfig(name="shards", shards_per_client=2, shard_size=100),
    "label_quantity": PartitionConfig(name="label_quantity", labels_per_client=2),
}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(NUM_CLASSES), CLASS_SIZES))


@pytest.fixture(scope="module")
def fmnist_labels() -> np.ndarray:
    """Labels shaped like Fashion-MNIST's training set: 60,000, 6,000 per class, shuffled."""
    return np.random.default_rng(5).permutation(np.repeat(np.arange(NUM_CLASSES), 6000))


def label_sets(parts: list[np.ndarray], labels: np.ndarray) -> list[set[int]]:
    return [set(np.unique(labels[p]).tolist()) for p in parts]


# ---------------------------------------------------------------------------------------------
# Properties shared by every partitioner
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(COVERING))
def test_partitions_are_disjoint_nonempty_and_cover_the_training_set(
    labels: np.ndarray, name: str, seed: int
) -> None:
    # Prepare
    cfg = COVERING[name]

    # Execute
    parts = partition_indices(labels, 10, cfg, seed, NUM_CLASSES)

    # Assert
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and p.ndim == 1 and len(p) > 0 for p in parts)
    merged = np.concatenate(parts)
    assert len(np.unique(merged)) == len(merged)  # disjoint
    np.testing.assert_array_equal(np.sort(merged), np.arange(len(labels)))  # covering


@pytest.mark.parametrize("name", list(COVERING))
def test_same_seed_gives_same_partition_and_other_seed_another(
    labels: np.ndarray, name: str
) -> None:
    # Prepare
    cfg = COVERING[name]

    # Execute
    first = partition_indices(labels, 10, cfg, 3, NUM_CLASSES)
    again = partition_indices(labels, 10, cfg, 3, NUM_CLASSES)
    other = partition_indices(labels, 10, cfg, 4, NUM_CLASSES)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(
        len(a) == len(b) and np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_iid_sizes_differ_by_at_most_one_and_labels_are_mixed(labels: np.ndarray) -> None:
    # Execute
    parts = partition_indices(labels, 7, PartitionConfig(name="iid"), 0, NUM_CLASSES)

    # Assert: 2000 = 7 * 285 + 5
    assert sorted(len(p) for p in parts) == [285] * 2 + [286] * 5
    assert all(len(s) == NUM_CLASSES for s in label_sets(parts, labels))


# ---------------------------------------------------------------------------------------------
# dirichlet
# ---------------------------------------------------------------------------------------------


def test_dirichlet_with_huge_alpha_is_within_a_few_percent_of_uniform(
    fmnist_labels: np.ndarray,
) -> None:
    # Prepare
    cfg = PartitionConfig(name="dirichlet", alpha=1e4)

    for seed in SEEDS:
        # Execute
        parts = partition_indices(fmnist_labels, 10, cfg, seed, NUM_CLASSES)

        # Assert: every client holds ~6,000 examples, each label ~10 % of them
        shares = np.stack([np.bincount(fmnist_labels[p], minlength=10) / len(p) for p in parts])
        assert np.abs(shares - 0.1).max() < 0.01
        assert all(abs(len(p) - 6000) < 0.03 * 6000 for p in parts)


def test_dirichlet_with_small_alpha_is_clearly_skewed(fmnist_labels: np.ndarray) -> None:
    # Prepare
    cfg = PartitionConfig(name="dirichlet", alpha=0.05)

    for seed in SEEDS:
        # Execute
        parts = partition_indices(fmnist_labels, 10, cfg, seed, NUM_CLASSES)

        # Assert: mean total-variation distance from uniform > 0.5 (IID gives ~0), and a typical
        # client has at most 4 labels above 1 % of its data
        shares = np.stack([np.bincount(fmnist_labels[p], minlength=10) / len(p) for p in parts])
        tv = 0.5 * np.abs(shares - 0.1).sum(axis=1)
        assert tv.mean() > 0.5
        assert np.median((shares > 0.01).sum(axis=1)) <= 4
        assert min(len(p) for p in parts) >= cfg.min_partition_size


def test_dirichlet_gives_up_with_advice_when_clients_stay_too_small(labels: np.ndarray) -> None:
    # Prepare: 100 clients of >= 15 examples from 2,000 with alpha 0.01 cannot be drawn
    cfg = PartitionConfig(name="dirichlet", alpha=0.01, min_partition_size=15, max_retries=3)

    # Execute / Assert
    with pytest.raises(DataError) as info:
        partition_indices(labels, 100, cfg, 0, NUM_CLASSES)
    message = str(info.value)
    assert "partition.max_retries=3" in message and "fewer than 15" in message
    assert "raise partition.alpha" in message


def test_dirichlet_rejects_minimum_that_cannot_fit(labels: np.ndarray) -> None:
    # Prepare
    cfg = PartitionConfig(name="dirichlet", min_partition_size=30)

    # Execute / Assert: 100 x 30 = 3000 > 2000
    with pytest.raises(
        DataError, match="needs 3000 examples but the training set has 2000; use at most 66 clients"
    ):
        partition_indices(labels, 100, cfg, 0, NUM_CLASSES)


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------


def test_shards_match_mcmahan_construction_recomputed_independently(
    fmnist_labels: np.ndarray,
) -> None:
    # Prepare: arXiv:1602.05629 - sort by label, 200 shards of 300, 2 per client, 100 clients.
    # Recompute the shards with Python's (stable) sort instead of numpy's argsort.
    order = sorted(range(len(fmnist_labels)), key=lambda i: int(fmnist_labels[i]))
    shard_of = {}
    for position, index in enumerate(order):
        shard_of[index] = position // 300
    cfg = PartitionConfig(name="shards", shards_per_client=2, shard_size=300)

    for seed in SEEDS:
        # Execute
        parts = partition_indices(fmnist_labels, 100, cfg, seed, NUM_CLASSES)

        # Assert: each client = exactly two complete shards; all 200 shards used once
        used: list[int] = []
        for part in parts:
            shards = sorted({shard_of[int(i)] for i in part})
            assert len(shards) == 2 and len(part) == 600
            expected = [i for s in shards for i in order[s * 300 : (s + 1) * 300]]
            assert part.tolist() == sorted(expected)
            used += shards
        assert sorted(used) == list(range(200))
        # each shard holds one label (6,000 per label = 20 shards), so a client has 1 or 2 labels
        assert all(1 <= len(s) <= 2 for s in label_sets(parts, fmnist_labels))


def test_shards_leave_unused_examples_when_they_do_not_cover(labels: np.ndarray) -> None:
    # Prepare: 5 clients x 2 shards x 100 = 1,000 of 2,000 examples (documented: rest unused)
    cfg = PartitionConfig(name="shards", shards_per_client=2, shard_size=100)

    # Execute
    parts = partition_indices(labels, 5, cfg, 0, NUM_CLASSES)

    # Assert
    merged = np.concatenate(parts)
    assert [len(p) for p in parts] == [200] * 5
    assert len(np.unique(merged)) == 1000


def test_shards_that_do_not_fit_are_rejected_with_the_limit(labels: np.ndarray) -> None:
    # Prepare: 10 x 2 x 300 = 6,000 > 2,000
    cfg = PartitionConfig(name="shards", shards_per_client=2, shard_size=300)

    # Execute / Assert
    with pytest.raises(DataError) as info:
        partition_indices(labels, 10, cfg, 0, NUM_CLASSES)
    message = str(info.value)
    assert "= 6000 examples" in message and "has 2000" in message
    assert "num_clients * shards_per_client * shard_size <= 2000" in message
    assert "partition.shard_size=100" in message


# ---------------------------------------------------------------------------------------------
# label_quantity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("num_clients", "k"), [(10, 1), (10, 2), (10, 3), (5, 2), (20, 3)])
def test_label_quantity_gives_exactly_k_labels_and_covers_all_labels(
    labels: np.ndarray, num_clients: int, k: int, seed: int
) -> None:
    # Prepare
    cfg = PartitionConfig(name="label_quantity", labels_per_client=k)

    # Execute
    parts = partition_indices(labels, num_clients, cfg, seed, NUM_CLASSES)

    # Assert
    sets = label_sets(parts, labels)
    assert all(len(s) == k for s in sets)
    assert set().union(*sets) == set(range(NUM_CLASSES))  # num_clients * k >= 10 here
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    if num_clients >= NUM_CLASSES:  # NIID-Bench: client i first gets label i % C
        assert all(i % NUM_CLASSES in s for i, s in enumerate(sets))


def test_label_quantity_splits_each_label_evenly_among_its_holders(labels: np.ndarray) -> None:
    # Prepare
    cfg = PartitionConfig(name="label_quantity", labels_per_client=3)

    # Execute
    parts = partition_indices(labels, 10, cfg, 0, NUM_CLASSES)

    # Assert: counts of one label differ by at most 1 between the clients holding it
    counts = np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts])
    for c in range(NUM_CLASSES):
        held = counts[:, c][counts[:, c] > 0]
        assert held.sum() == CLASS_SIZES[c] and held.max() - held.min() <= 1


def test_label_quantity_with_too_few_slots_uses_only_held_labels(labels: np.ndarray) -> None:
    # Prepare: 3 clients x 2 labels = 6 < 10 labels (documented: 4 labels unused)
    cfg = PartitionConfig(name="label_quantity", labels_per_client=2)

    # Execute
    parts = partition_indices(labels, 3, cfg, 0, NUM_CLASSES)

    # Assert
    sets = label_sets(parts, labels)
    held = set().union(*sets)
    assert all(len(s) == 2 for s in sets) and len(held) == 6
    assert len(np.concatenate(parts)) == CLASS_SIZES[sorted(held)].sum()


def test_label_quantity_rejects_more_labels_than_classes(labels: np.ndarray) -> None:
    # Prepare
    cfg = PartitionConfig(name="label_quantity", labels_per_client=11)

    # Execute / Assert
    with pytest.raises(
        DataError,
        match="labels_per_client=11 but the dataset has only 10 labels; "
        "use labels_per_client <= 10",
    ):
        partition_indices(labels, 10, cfg, 0, NUM_CLASSES)


def test_label_quantity_rejects_label_with_fewer_examples_than_holders() -> None:
    # Prepare: label 1 has 3 examples, 10 clients with k=1 -> 5 clients hold label 1
    small = np.array([0] * 50 + [1] * 3)
    cfg = PartitionConfig(name="label_quantity", labels_per_client=1)

    # Execute / Assert
    with pytest.raises(DataError, match="label 1 has 3 training examples but 5 clients hold it"):
        partition_indices(small, 10, cfg, 0, 2)


# ---------------------------------------------------------------------------------------------
# Generic impossible requests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COVERING))
def test_more_clients_than_examples_is_rejected_with_the_limit(name: str) -> None:
    # Prepare
    tiny = np.arange(8) % NUM_CLASSES

    # Execute / Assert
    with pytest.raises(
        DataError, match="cannot give 9 clients .* has 8 examples; use num_clients <= 8"
    ):
        partition_indices(tiny, 9, COVERING[name], 0, NUM_CLASSES)


def test_labels_outside_the_class_range_are_rejected() -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="labels span 0..12, outside 0..9"):
        partition_indices(np.arange(13), 2, PartitionConfig(name="iid"), 0, NUM_CLASSES)


# ---------------------------------------------------------------------------------------------
# Local split and make_partitions
# ---------------------------------------------------------------------------------------------


def test_local_split_is_disjoint_complete_seeded_per_client() -> None:
    # Prepare
    indices = np.arange(1000, 1100, dtype=np.int64)

    # Execute
    train, test = local_split(indices, 0.2, seed=0, client_id=3)
    train_again, _ = local_split(indices, 0.2, seed=0, client_id=3)
    train_other_client, _ = local_split(indices, 0.2, seed=0, client_id=4)
    train_other_seed, _ = local_split(indices, 0.2, seed=1, client_id=3)

    # Assert
    assert (len(train), len(test)) == (80, 20)
    assert not set(train.tolist()) & set(test.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), indices)
    np.testing.assert_array_equal(train, train_again)
    assert not np.array_equal(train, train_other_client)
    assert not np.array_equal(train, train_other_seed)


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (1, 0.2, (1, 0)),
        (2, 0.2, (2, 0)),
        (3, 0.2, (2, 1)),
        (2, 0.9, (1, 1)),
        (0, 0.2, (0, 0)),
        (10, 0.0, (10, 0)),
    ],
)
def test_local_split_keeps_one_train_example_and_rounds_test_size(
    n: int, fraction: float, expected: tuple[int, int]
) -> None:
    # Execute
    train, test = local_split(np.arange(n), fraction, seed=0, client_id=0)

    # Assert: n_test = min(round(fraction * n), n - 1)
    assert (len(train), len(test)) == expected


def test_make_partitions_of_fashion_mnist_into_1000_clients_keeps_one_image_copy(
    fmnist_labels: np.ndarray,
) -> None:
    # Prepare: a Fashion-MNIST-sized dataset (188 MB of float32 images)
    images = np.zeros((60000, 28, 28), np.float32)
    dataset = Dataset(
        "fashion_mnist",
        images,
        fmnist_labels.astype(np.int64),
        images[:100],
        fmnist_labels[:100].astype(np.int64),
        NUM_CLASSES,
    )
    cfg = PartitionConfig(name="dirichlet", alpha=0.5)

    # Execute
    tracemalloc.start()
    partitions = make_partitions(dataset, 1000, cfg, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Assert: only int64 indices, 8 bytes per example in total, no view of or copy of the images
    assert len(partitions) == 1000 and all(isinstance(p, Partition) for p in partitions)
    arrays = [a for p in partitions for a in (p.train_indices, p.test_indices)]
    assert all(a.dtype == np.int64 for a in arrays)
    assert sum(a.nbytes for a in arrays) == 60000 * 8
    assert not any(np.shares_memory(a, images) for a in arrays)
    assert dataset.train_images is images
    assert peak < 0.05 * images.nbytes  # a copy of the images would need 100 %
    assert [p.client_id for p in partitions] == list(range(1000))


def test_make_partitions_combines_partitioner_and_local_split(labels: np.ndarray) -> None:
    # Prepare
    dataset = Dataset(
        "toy",
        np.zeros((len(labels), 2, 2), np.float32),
        labels.astype(np.int64),
        np.zeros((1, 2, 2), np.float32),
        np.zeros(1, np.int64),
        NUM_CLASSES,
    )
    cfg = PartitionConfig(name="iid", local_test_fraction=0.25)

    # Execute
    partitions = make_partitions(dataset, 4, cfg, seed=2)

    # Assert
    parts = partition_indices(labels, 4, cfg, 2, NUM_CLASSES)
    for p, indices in zip(partitions, parts, strict=True):
        assert (len(p.train_indices), len(p.test_indices)) == (375, 125)
        np.testing.assert_array_equal(
            np.sort(np.concatenate([p.train_indices, p.test_indices])), indices
        )


# ---------------------------------------------------------------------------------------------
# Report and CLI
# ---------------------------------------------------------------------------------------------


def test_report_writes_csv_json_png_with_hand_computed_skew(tmp_path: Path) -> None:
    # Prepare: labels [0, 0, 1, 1]; client 0 holds label 0 only, client 1 label 1 only
    labels = np.array([0, 0, 1, 1])
    partitions = [
        Partition(0, np.array([0]), np.array([1])),
        Partition(1, np.array([2, 3]), np.array([], dtype=np.int64)),
    ]
    # q = (1, 0) vs p = (.5, .5): TV = 0.5; JS with m = (.75, .25):
    # KL(q||m) = log2(4/3), KL(p||m) = .5 log2(2/3) + .5 log2(2)
    expected_js = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)

    # Execute
    line = write_partition_report(partitions, labels, 2, tmp_path, description="toy")

    # Assert
    with open(tmp_path / "partition.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["client", "n_train", "n_test", "label_0", "label_1"],
        ["0", "1", "1", "2", "0"],
        ["1", "2", "0", "0", "2"],
    ]
    report = json.loads((tmp_path / "partition.json").read_text())
    assert report["tv_mean"] == pytest.approx(0.5)
    assert report["js_mean"] == pytest.approx(expected_js)
    assert (report["examples_min"], report["examples_median"], report["examples_max"]) == (2, 2, 2)
    assert report["description"] == "toy" and report["summary"] == line
    assert (tmp_path / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "min 2 / median 2 / max 2" in line and "mean TV 0.500" in line


def test_partition_cli_writes_report_into_hydra_run_dir(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "fl_ondevice.partition",
        "dataset=digits",
        "num_clients=5",
        f"hydra.run.dir={run_dir}",
    ]

    # Execute
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=pytestconfig.rootpath
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert "5 clients" in result.stdout and str(run_dir) in result.stdout
    for name in ("partition.csv", "partition.json", "partition.png"):
        assert (run_dir / name).is_file()
    with open(run_dir / "partition.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert sum(int(r["n_train"]) + int(r["n_test"]) for r in rows) == 1437
