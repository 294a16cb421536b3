"""dataset=files (fl_ondevice.data.files): a .npz with x, y, optional client and test arrays;
natural partitions (fl_ondevice.data.natural); one-line errors; short federations."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config

from fl_ondevice.config import DatasetConfig, PartitionConfig
from fl_ondevice.data.datasets import clear_cache, load_dataset
from fl_ondevice.data.files import load_files_dataset
from fl_ondevice.data.partitioners import make_partitions
from fl_ondevice.errors import ConfigError, DataError

# Three natural clients of unequal sizes; ids are strings, sorted to clients 0, 1, 2.
CLIENT_IDS = np.array(["bob"] * 60 + ["amy"] * 100 + ["cy"] * 40)
EXPECTED_SIZES = [100, 60, 40]  # amy, bob, cy


@pytest.fixture(scope="module")
def digit_arrays() -> dict[str, np.ndarray]:
    """200 training and 100 test images of scikit-learn's digits, as float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8).astype(np.float32)
    return {"x": x[:200], "y": y[:200], "x_test": x[200:300], "y_test": y[200:300]}


def write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_client_array_makes_one_client_per_value_with_its_own_rows(
    tmp_path: Path, digit_arrays: dict[str, np.ndarray]
) -> None:
    path = write(tmp_path / "fed.npz", **digit_arrays, client=CLIENT_IDS)

    dataset = load_files_dataset(str(path), 0.2, seed=0)
    parts = make_partitions(dataset, 3, PartitionConfig(local_test_fraction=0.25), seed=0)

    assert dataset.num_classes == 10 and dataset.input_shape == (8, 8)
    assert len(dataset.y_test) == 100  # the file's own test set
    for part, name, size in zip(parts, ["amy", "bob", "cy"], EXPECTED_SIZES, strict=True):
        rows = np.concatenate([part.train_indices, part.test_indices])
        assert sorted(rows.tolist()) == np.flatnonzero(CLIENT_IDS == name).tolist()
        assert len(part.test_indices) == size // 4  # 25% held out locally


def test_fewer_clients_than_the_data_has_are_a_seeded_sample(
    tmp_path: Path, digit_arrays: dict[str, np.ndarray]
) -> None:
    path = write(tmp_path / "fed.npz", **digit_arrays, client=np.arange(200) % 20)
    dataset = load_files_dataset(str(path), 0.2, seed=0)

    picked = [
        sorted(
            {
                int(dataset.train_clients[p.train_indices[0]])
                for p in make_partitions(dataset, 5, PartitionConfig(), seed=s)
            }
        )
        for s in (0, 0, 1)
    ]

    assert picked[0] == picked[1] != picked[2]
    assert picked[0] == sorted(np.random.default_rng(0).choice(20, 5, replace=False).tolist())
    with pytest.raises(DataError, match="num_clients=21: files has 20 natural clients"):
        make_partitions(dataset, 21, PartitionConfig(), seed=0)


def test_without_client_any_partitioner_applies_and_a_seeded_share_is_held_out(
    tmp_path: Path, digit_arrays: dict[str, np.ndarray]
) -> None:
    path = write(tmp_path / "plain.npz", x=digit_arrays["x"], y=digit_arrays["y"])

    a = load_files_dataset(str(path), 0.25, seed=0)
    b = load_files_dataset(str(path), 0.25, seed=1)
    parts = make_partitions(a, 4, PartitionConfig(name="iid"), seed=0)

    assert (len(a.y_train), len(a.y_test)) == (150, 50)
    assert not np.array_equal(a.y_test, b.y_test)
    assert sorted(
        np.concatenate([p.train_indices for p in parts] + [p.test_indices for p in parts]).tolist()
    ) == list(range(150))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 3, 3), np.uint8)}, r"no array \['y'\]"),
        (
            {"x": np.zeros((4, 3, 3), np.uint8), "y": np.array([0, 1, 0])},
            "x has 4 images but y has 3",
        ),
        ({"x": np.zeros((4, 3, 3), np.uint8), "y": np.array([0, 1, 3, 1])}, r"labels \[0, 1, 3\]"),
        ({"x": np.zeros((4, 9), np.uint8), "y": np.array([0, 1, 0, 1])}, r"shape \(4, 9\)"),
        ({"x": np.full((4, 3, 3), 2.0), "y": np.array([0, 1, 0, 1])}, "spans 2..2"),
        (
            {"x": np.zeros((4, 3, 3)), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 3, 3))},
            "only one of x_test and y_test",
        ),
        (
            {"x": np.zeros((4, 3, 3)), "y": np.array([0, 1, 0, 1]), "client": np.arange(3)},
            r"client has shape \(3,\)",
        ),
    ],
)
def test_bad_files_fail_with_one_line_naming_the_array(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = write(tmp_path / "bad.npz", **arrays)

    with pytest.raises(DataError, match=message) as err:
        load_files_dataset(str(path), 0.2, seed=0)
    assert "\n" not in str(err.value) and "dataset.path=" in str(err.value)


def test_missing_path_is_a_config_error_and_a_missing_file_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset=files needs dataset.path=FILE.npz"):
        DatasetConfig(name="files")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(DatasetConfig(name="files", path=str(tmp_path / "none.npz")))


def test_images_too_small_for_the_model_fail_before_the_engine_starts(
    tmp_path: Path, cache: str, no_engine: None
) -> None:
    from fl_ondevice.simulate import simulate

    rng = np.random.default_rng(0)
    path = write(tmp_path / "tiny.npz", x=rng.random((400, 4, 4)), y=np.arange(400) % 2)
    clear_cache()
    cfg = compose_config(
        tmp_path, f"cache_dir={cache}", "dataset=files", f"dataset.path={path}", "model=simple_cnn"
    )

    with pytest.raises(ConfigError, match=r"need larger images than \(4, 4\)"):
        simulate(cfg)


def test_a_federation_on_natural_clients_writes_their_counts_in_clients_csv(
    run, tmp_path_factory: pytest.TempPathFactory, digit_arrays: dict[str, np.ndarray]
) -> None:
    path = write(tmp_path_factory.mktemp("npz") / "fed.npz", **digit_arrays, client=CLIENT_IDS)

    out = run("dataset=files", f"dataset.path={path}", "num_clients=3", "num_rounds=2")

    with open(out / "clients.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["examples"]) + int(r["test_examples"]) for r in table] == EXPECTED_SIZES
    assert [int(r["test_examples"]) for r in table] == [20, 12, 8]  # 20% of each, rounded
    with open(out / "metrics.csv") as f:
        rounds = list(csv.DictReader(f))
    assert [r["round"] for r in rounds] == ["0", "1", "2"]
    assert float(rounds[-1]["accuracy"]) > 0.2  # 100 held-out digits, chance is 0.1
