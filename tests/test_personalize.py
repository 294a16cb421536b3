"""Personalization metrics (personalize.epochs): the clients' fine-tuning and what reaches files."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, metrics_rows, stable_rows

from fl_ondevice.client.client import (
    StagedWeights,
    client_data,
    evaluate_client,
    local_seed,
    personalize_seed,
    train_client,
)
from fl_ondevice.config import Config, ModelConfig, PartitionConfig, PersonalizeConfig
from fl_ondevice.errors import ConfigError
from fl_ondevice.ondevice.convert import build_tflite
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.pool import clear_pool, pooled_model
from fl_ondevice.outputs.results import LOCAL_ACCURACIES, SPREAD
from fl_ondevice.server.strategy import make_strategy

# -- one client, without Flower -------------------------------------------------------------------
# Momentum: optimizer state that would leak from the fine-tuning into the next client's training.
MODEL = ModelConfig(name="mlp", learning_rate=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def tflite(tmp_path_factory) -> str:
    """The momentum mlp for digits, converted once for this module's tests."""
    return str(build_tflite(MODEL, (8, 8), 10, 0, tmp_path_factory.mktemp("tflite")))


def _setup(path: str, epochs: int) -> tuple[Config, str, dict]:
    cfg = Config(
        model=MODEL,
        num_clients=4,
        partition=PartitionConfig(name="label_quantity", labels_per_client=2),
        personalize=PersonalizeConfig(epochs=epochs),
    )
    clear_pool()
    return cfg, path, pooled_model(path).get_weights()


def test_client_reports_the_fine_tuning_recomputed_in_a_second_interpreter(tflite):
    cfg, path, start = _setup(tflite, epochs=2)
    model = pooled_model(path)
    staged = StagedWeights().get(model, start, lambda: start)

    got = evaluate_client(cfg, model, staged, client_id=1, server_round=3)

    # Independently: a second interpreter from the global weights, k epochs on the client's
    # local train split in the order the fine-tuning seed gives, evaluated on its local test.
    dataset, partitions = client_data(cfg)
    part = partitions[1]
    x_test, y_test = dataset.x_train[part.test_indices], dataset.y_train[part.test_indices]
    other = OnDeviceModel(path)
    other.set_weights(start)
    before = other.evaluate(x_test, y_test)
    other.fit(
        dataset.x_train[part.train_indices],
        dataset.y_train[part.train_indices],
        epochs=2,
        batch_size=cfg.client.batch_size,
        seed=personalize_seed(cfg.seed, 3, 1),
    )
    after = other.evaluate(x_test, y_test)

    assert (got.accuracy, got.loss) == (before["accuracy"], before["loss"])
    assert (got.personal_accuracy, got.personal_loss) == (after["accuracy"], after["loss"])
    assert got.num_examples == len(part.test_indices)
    assert got.personal_accuracy > got.accuracy  # two labels held: fine-tuning helps a lot


def test_fine_tuning_leaves_nothing_behind_for_the_next_training(tflite):
    cfg, path, start = _setup(tflite, epochs=1)
    fresh = train_client(cfg, pooled_model(path), pooled_model(path).stage(start), 2, 4)

    clear_pool()
    model = pooled_model(path)
    staged = StagedWeights().get(model, start, lambda: start)
    evaluate_client(cfg, model, staged, client_id=0, server_round=4)  # fine-tunes client 0
    after = train_client(cfg, model, staged, 2, 4)

    assert after.train_loss == fresh.train_loss
    assert all(after.weights[n].tobytes() == fresh.weights[n].tobytes() for n in start)


def test_personalization_off_reports_no_personal_metrics(tflite):
    cfg, path, start = _setup(tflite, epochs=0)
    model = pooled_model(path)

    got = evaluate_client(cfg, model, StagedWeights().get(model, start, lambda: start), 1, 3)

    assert got.personal_accuracy is None and got.personal_loss is None


def test_fine_tuning_shuffles_apart_from_training():
    assert personalize_seed(0, 2, 3) == personalize_seed(0, 2, 3)
    assert personalize_seed(0, 2, 3) != local_seed(0, 2, 3)
    assert len({personalize_seed(0, r, c) for r in range(1, 4) for c in range(5)}) == 15


# -- config ---------------------------------------------------------------------------------------
def test_negative_epochs_are_refused_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"personalize.epochs=-1 is invalid: must be >= 0"):
        compose_config(tmp_path, "personalize.epochs=-1")


def test_personalization_without_client_evaluation_fails_at_start(tmp_path):
    cfg = compose_config(tmp_path, "personalize.epochs=1", "strategy.fraction_evaluate=0.0")

    with pytest.raises(ConfigError, match=r"set strategy.fraction_evaluate>0"):
        make_strategy(cfg)
    evaluating = compose_config(tmp_path, "personalize.epochs=1", "strategy.fraction_evaluate=0.5")
    make_strategy(evaluating)  # accepted


# -- end to end (Flower simulation) ---------------------------------------------------------------
# Two labels per client: the global model after 3 rounds knows little of any client's two
# labels, one local epoch on them knows them well (digits: ~0.2 vs ~0.9), a margin no seed closes.
SKEWED = (
    "num_clients=10",
    "num_rounds=3",
    "partition=label_quantity",
    "strategy.fraction_evaluate=1.0",  # every client, every round: clients.csv has them all
)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _number(cell: str) -> float | None:
    return float(cell) if cell else None


def test_personalized_run_writes_the_spread_clients_csv_and_plot(run):
    out = run(*SKEWED, "personalize.epochs=1")
    rows = metrics_rows(out)
    clients = _csv(out / "clients.csv")
    partition = _csv(out / "partition.csv")

    assert rows[0]["local_acc_global_mean"] == ""  # round 0: no evaluation
    for row in rows[1:]:
        for name in LOCAL_ACCURACIES:
            p10, median, p90 = (float(row[f"{name}_{s}"]) for s in ("p10", "median", "p90"))
            assert p10 <= median <= p90
            assert p10 <= float(row[f"{name}_mean"]) <= p90
    # The last round's columns recomputed from clients.csv (every client evaluated in it).
    last = rows[-1]
    assert {c["last_eval_round"] for c in clients} == {last["round"]}
    for name in LOCAL_ACCURACIES:
        values = np.array([float(c[name]) for c in clients])
        expected = dict(
            zip(SPREAD, [values.mean(), *np.percentile(values, [10, 50, 90])], strict=True)
        )
        for stat in SPREAD:
            assert float(last[f"{name}_{stat}"]) == pytest.approx(expected[stat], abs=1e-12)
    # The per-client global accuracies are those the strategy averaged (by test examples).
    n = np.array([int(c["test_examples"]) for c in clients])
    acc = np.array([float(c["local_acc_global"]) for c in clients])
    assert float(last["client_eval_accuracy"]) == pytest.approx((acc * n).sum() / n.sum())
    # clients.csv: one row per client, its partition's sizes and labels, 3 valid updates each.
    assert [int(c["client"]) for c in clients] == list(range(10))
    for c, p in zip(clients, partition, strict=True):
        assert (c["examples"], c["test_examples"]) == (p["n_train"], p["n_test"])
        held = [str(k) for k in range(10) if int(p[f"label_{k}"]) > 0]
        assert c["labels"].split(";") == held and int(c["num_labels"]) == 2
        assert int(c["rounds"]) == 3
    assert (out / "personalization.png").stat().st_size > 10_000
    # The expected effect on two labels per client: fine-tuning on them wins by far.
    assert float(last["local_acc_personal_mean"]) > float(last["local_acc_global_mean"]) + 0.3


def test_personalization_changes_no_existing_column(run):
    plain = run(*SKEWED)
    off = run(*SKEWED, "personalize.epochs=0")
    on = run(*SKEWED, "personalize.epochs=1")
    new = {f"{n}_{s}" for n in LOCAL_ACCURACIES for s in SPREAD}

    # k=0 is the same run as no key, new columns (empty) included.
    assert stable_rows(off) == stable_rows(plain)
    assert all(row[c] == "" for row in metrics_rows(off) for c in new)
    # k=1: the fine-tuned weights never reach the global model or the strategy's aggregate.
    assert [{k: v for k, v in r.items() if k not in new} for r in stable_rows(on)] == [
        {k: v for k, v in r.items() if k not in new} for r in stable_rows(plain)
    ]
    # clients.csv with personalization off: the global model's local accuracy, no personal one.
    clients = _csv(off / "clients.csv")
    assert all(c["local_acc_personal"] == "" for c in clients)
    assert all(_number(c["local_acc_global"]) is not None for c in clients)
    assert not (off / "personalization.png").exists()


def test_a_personalization_layout_fine_tunes_its_head_on_bottlenecks(tmp_path):
    from layout_models import personalization_tflite_bytes  # load(images) -> bottlenecks

    path = tmp_path / "personalization.tflite"
    path.write_bytes(personalization_tflite_bytes(flex=False))
    model_cfg = ModelConfig(name="tflite", path=str(path))
    cfg = Config(model=model_cfg, num_clients=4, personalize=PersonalizeConfig(epochs=1))
    clear_pool()
    model = pooled_model(path)
    start = model.initial_weights()

    got = evaluate_client(cfg, model, StagedWeights().get(model, start, lambda: start), 1, 2)

    dataset, partitions = client_data(cfg)
    part = partitions[1]
    other = OnDeviceModel(path)
    other.set_weights(start)
    other.fit(
        other.load(dataset.x_train[part.train_indices]),
        dataset.y_train[part.train_indices],
        batch_size=cfg.client.batch_size,
        seed=personalize_seed(cfg.seed, 2, 1),
    )
    after = other.evaluate(dataset.x_train[part.test_indices], dataset.y_train[part.test_indices])
    assert (got.personal_accuracy, got.personal_loss) == (after["accuracy"], after["loss"])
    assert model.loaded_examples == len(part.train_indices)  # the train split, once


def test_a_resumed_run_keeps_the_clients_record_of_the_rounds_before(run, tmp_path):
    from fl_ondevice.server.resume import resumed_config
    from fl_ondevice.simulate import simulate

    whole = run(*SKEWED, "personalize.epochs=1")
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    # Round 3's checkpoint is unreadable: the run continues after round 2, while clients.csv
    # already holds round 3 (the case where the file is ahead of the resume point).
    ckpt = cut / "checkpoints" / "round-3.weights.npz"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])

    simulate(resumed_config(str(cut)), keep_engine=True)

    assert _csv(cut / "clients.csv") == _csv(whole / "clients.csv")
    assert {c["train_rounds"] for c in _csv(cut / "clients.csv")} == {"1;2;3"}


def test_the_experiment_table_is_rebuilt_from_its_runs(tmp_path):
    from experiments import tables

    folder = Path(__file__).resolve().parents[1] / "experiments" / "personalization"
    shutil.copytree(folder / "runs", tmp_path / "experiments" / "personalization" / "runs")

    text = tables.build("personalization", tmp_path / "experiments")

    assert text in (folder / "README.md").read_text()
    # The global and k=1 rows are the run's own metrics.csv columns at the last round.
    last = metrics_rows(folder / "runs" / "dirichlet" / "0")[-1]
    for name, row in (("local_acc_global", 2), ("local_acc_personal", 3)):
        cells = text.splitlines()[row].split(" | ")
        assert cells[3] == f"{float(last[f'{name}_mean']):.3f}"
        assert cells[6] == f"{float(last[f'{name}_p90']):.3f}"
    assert (tmp_path / "experiments" / "personalization" / "personalization.png").is_file()
