"""End-to-end runs through Hydra, Flower's simulation engine (Ray) and TFLite interpreters."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import compose_config, flex_param, metrics_rows, reply, stable_rows
from guide_model import guide_tflite_bytes

from fl_ondevice.client.client import local_seed
from fl_ondevice.config import parse_config
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.ondevice.checkpoint import read_checkpoint
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.layouts import GUIDE
from fl_ondevice.server.prepare import prepare
from fl_ondevice.simulate import simulate

rows = metrics_rows


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[n].astype(np.float64) - b[n]).max()) for n in a)


SMALL = ("num_clients=4", "num_rounds=3")


# -- FedAvg correctness ---------------------------------------------------------------------------
def test_one_client_one_round_equals_centralised_training(run, cache, tmp_path):
    overrides = ("num_clients=1", "num_rounds=1", "strategy.min_train_nodes=1", "partition=iid")
    out = run(*overrides)
    # Independently: the same interpreter file, trained centrally on the client's data in the
    # order the client's seed gives.
    cfg = compose_config(tmp_path, f"cache_dir={cache}", *overrides)
    prep = prepare(cfg)
    (part,) = prep.partitions
    device = OnDeviceModel(prep.model_file)
    device.fit(
        prep.dataset.x_train[part.train_indices],
        prep.dataset.y_train[part.train_indices],
        epochs=1,
        batch_size=cfg.client.batch_size,
        seed=local_seed(cfg.seed, 1, 0),
    )

    assert _max_diff(read_checkpoint(out / "global_model.ckpt"), device.get_weights()) <= 1e-6


def test_two_clients_average_weighted_by_examples(run, cache, tmp_path):
    overrides = ("num_clients=2", "num_rounds=1", "partition.alpha=0.3")
    out = run(*overrides)
    cfg = compose_config(tmp_path, f"cache_dir={cache}", *overrides)
    prep = prepare(cfg)
    start = OnDeviceModel(prep.model_file).get_weights()
    updates, counts = [], []
    for part in prep.partitions:
        device = OnDeviceModel(prep.model_file)
        device.fit(
            prep.dataset.x_train[part.train_indices],
            prep.dataset.y_train[part.train_indices],
            batch_size=cfg.client.batch_size,
            seed=local_seed(cfg.seed, 1, part.client_id),
        )
        updates.append(device.get_weights())
        counts.append(len(part.train_indices))
    assert counts[0] != counts[1]  # the weighting matters
    n0, n1 = counts
    expected = {k: (updates[0][k] * n0 + updates[1][k] * n1) / (n0 + n1) for k in start}

    got = read_checkpoint(out / "global_model.ckpt")

    assert _max_diff(got, expected) <= 1e-6
    assert _max_diff(got, updates[0]) > 1e-3  # not just one client's weights
    assert int(rows(out)[1]["examples"]) == n0 + n1


def test_streaming_fedavg_equals_flowers_fedavg_and_the_hand_computed_average():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    from fl_ondevice.server.fedavg import FedAvg

    # Six updates with different example counts, as replies.
    rng = np.random.default_rng(0)
    counts = (5, 1, 7, 3, 2, 11)
    updates = [
        {
            "w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32),
        }
        for _ in counts
    ]

    def replies():
        for n, w in zip(counts, updates, strict=True):
            arrays = ArrayRecord({k: Array(v) for k, v in w.items()})
            metrics = MetricRecord({"num-examples": n, "train-loss": float(n)})
            yield reply(RecordDict({"arrays": arrays, "metrics": metrics}))

    ours, our_metrics = FedAvg().aggregate_train(1, replies())  # a generator: consumed once
    theirs, their_metrics = FlowerFedAvg().aggregate_train(1, list(replies()))

    total = sum(counts)
    for k in ("w", "b"):
        by_hand = sum(n * w[k].astype(np.float64) for n, w in zip(counts, updates, strict=True))
        by_hand /= total
        assert ours[k].numpy().dtype == np.float32
        np.testing.assert_allclose(ours[k].numpy(), by_hand, rtol=1e-6)
        np.testing.assert_allclose(ours[k].numpy(), theirs[k].numpy(), rtol=1e-6)
    expected_loss = sum(n * n for n in counts) / total
    assert our_metrics["train-loss"] == pytest.approx(expected_loss)
    assert their_metrics["train-loss"] == pytest.approx(expected_loss)


# -- outputs and reproducibility ------------------------------------------------------------------
def test_run_writes_every_output_and_the_global_model_reproduces_its_accuracy(run):
    out = run(*SMALL)
    table = rows(out)

    assert [r["round"] for r in table] == ["0", "1", "2", "3"]
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.json",
        "accuracy.png",
        "partition.csv",
        "partition.png",
        "global_model.ckpt",
        "global_model.tflite",
        "state.json",
        "checkpoints/round-3.weights.npz",
    ):
        assert (out / name).stat().st_size > 0, name
    last = table[-1]
    assert last["clients_sampled"] == last["clients_replied"] == "4"
    assert last["clients_failed"] == "0"
    assert (
        int(last["bytes_down"]) == int(last["bytes_up"]) == 4 * (64 * 128 + 128 + 128 * 10 + 10) * 4
    )
    assert json.loads((out / "metrics.json").read_text())["summary"]["rounds"] == 3
    # The exported model: four signatures, trained weights baked in.
    fresh = OnDeviceModel(out / "global_model.tflite")
    assert set(GUIDE.required) <= set(fresh.signatures)
    data = load_dataset(parse_config({}).dataset, 0)
    accuracy = fresh.evaluate(data.x_test, data.y_test)["accuracy"]
    assert accuracy == pytest.approx(float(last["accuracy"]), abs=1e-9)
    assert _max_diff(fresh.get_weights(), read_checkpoint(out / "global_model.ckpt")) == 0.0


def test_same_seed_same_metrics_other_seed_other_partitions_and_metrics(run):
    a, b = run(*SMALL), run(*SMALL, "hydra.job.name=again")
    c = run(*SMALL, "seed=1")

    assert stable_rows(a) == stable_rows(b)
    assert (a / "partition.csv").read_text() == (b / "partition.csv").read_text()
    assert (a / "partition.csv").read_text() != (c / "partition.csv").read_text()
    assert stable_rows(a)[1:] != stable_rows(c)[1:]


def test_results_do_not_depend_on_how_many_clients_a_message_carries(run):
    # 4 clients: one per message, two per message, and the default. The strategy gets one reply
    # per client, in client order, whatever the grouping: the results are bitwise equal.
    runs = [
        run(*SMALL, "client.clients_per_message=1"),
        run(*SMALL, "client.clients_per_message=2"),
    ]
    runs.append(run(*SMALL))
    ckpts = [read_checkpoint(out / "global_model.ckpt") for out in runs]
    for out, ckpt in zip(runs[1:], ckpts[1:], strict=True):
        assert stable_rows(out) == stable_rows(runs[0])
        assert all(ckpt[n].tobytes() == ckpts[0][n].tobytes() for n in ckpts[0])


def test_fraction_train_samples_the_configured_share(run):
    out = run("num_clients=10", "num_rounds=2", "strategy.fraction_train=0.3")
    assert [r["clients_sampled"] for r in rows(out)[1:]] == ["3", "3"]


def test_client_side_evaluation_is_reported(run):
    out = run(*SMALL, "strategy.fraction_evaluate=1.0")
    assert all(0.0 <= float(r["client_eval_accuracy"]) <= 1.0 for r in rows(out)[1:])


@pytest.mark.parametrize("flex", [flex_param(True), False])
def test_bring_your_own_tflite_model(run, tmp_path_factory, flex):
    path = tmp_path_factory.mktemp("byo") / "guide.tflite"
    path.write_bytes(guide_tflite_bytes(flex=flex))

    out = run(*SMALL, "model=tflite", f"model.path={path}")

    table = rows(out)
    assert len(table) == 4
    assert float(table[-1]["accuracy"]) > float(table[0]["accuracy"])
    assert not (out / "global_model.tflite").exists()  # a foreign file is not rebuilt
    device = OnDeviceModel(path)
    device.set_weights(read_checkpoint(out / "global_model.ckpt"))
    data = load_dataset(parse_config({}).dataset, 0)
    assert device.evaluate(data.x_test, data.y_test)["accuracy"] == pytest.approx(
        float(table[-1]["accuracy"]), abs=1e-9
    )


# -- the command line -----------------------------------------------------------------------------
def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_ondevice.simulate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_default_command_runs_end_to_end(tmp_path, cache):
    proc = _cli(f"hydra.run.dir={tmp_path}", f"cache_dir={cache}", "num_rounds=2")

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fl_ondevice: final accuracy" in proc.stdout
    assert "round 2/2" in proc.stdout + proc.stderr
    assert len(rows(tmp_path)) == 3
    # A quiet console: only our lines; Flower's, Ray's and TF's go to simulate.log.
    console = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    ours = re.compile(r"^(\[[\d\-: ,]+\]\[fl_ondevice[.\w]*\]\[\w+\] - |fl_ondevice: )")
    assert [line for line in console if not ours.match(line)] == []
    assert "`run_simulation` function is deprecated" in (tmp_path / "simulate.log").read_text()
    # Written after the engine stopped, from the last round's weights: the same bytes.
    last = np.load(tmp_path / "checkpoints" / "round-2.weights.npz")
    final = read_checkpoint(tmp_path / "global_model.ckpt")
    assert sorted(final) == sorted(last.files)
    assert all(final[name].tobytes() == last[name].tobytes() for name in final)
    baked = OnDeviceModel(tmp_path / "global_model.tflite").get_weights()
    assert all(baked[name].tobytes() == final[name].tobytes() for name in final)


def test_sweep_runs_each_job_and_writes_a_summary(tmp_path, cache):
    proc = _cli(
        "-m",
        "num_clients=5,20",
        "num_rounds=2",
        f"cache_dir={cache}",
        f"hydra.sweep.dir={tmp_path}",
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [r["num_clients"] for r in summary] == ["5", "20"]
    assert all(0.0 < float(r["final_accuracy"]) <= 1.0 for r in summary)
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert [len(rows(tmp_path / j)) for j in ("0", "1")] == [3, 3]


# -- invalid configuration fails before the engine starts -----------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_clients=0", "num_clients=0 is invalid: must be >= 1"),
        (
            "strategy.fraction_train=0",
            r"strategy.fraction_train=0.0 is invalid: must be in \(0, 1\]",
        ),
        ("strategy.fraction_train=1.5", "strategy.fraction_train=1.5 is invalid"),
        ("dataset.name=cifar", r"dataset.name='cifar' is invalid: choose one of \('digits'"),
        ("model.name=resnet", r"model.name='resnet' is invalid: choose one of \('mlp'"),
        ("client.batch_size=0", "client.batch_size=0 is invalid: must be >= 1, or null"),
        ("client.batch_size=-5", "client.batch_size=-5 is invalid"),
        ("num_clients=1", r"strategy.min_train_nodes=2 is invalid: must be >= 1 and <= num_c"),
        ("+typo_key=3", "typo_key"),
        (
            "strategy.fraction_evaluate=0.5 partition.local_test_fraction=0",
            "partition.local_test_fraction=0 leaves none",
        ),
    ],
)
def test_invalid_config_names_the_key_and_allowed_values(tmp_path, override, message):
    from fl_ondevice.errors import ConfigError
    from fl_ondevice.server.strategy import make_strategy

    with pytest.raises(ConfigError, match=message):
        make_strategy(compose_config(tmp_path, *override.split()))


def test_tflite_with_wrong_input_shape_fails_before_ray_starts(
    tmp_path, cache, converted, no_engine
):
    path = tmp_path / "fmnist_mlp.tflite"
    path.write_bytes(converted("mlp", (28, 28), learning_rate=0.1)[1])
    cfg = compose_config(tmp_path, f"cache_dir={cache}", "model=tflite", f"model.path={path}")
    from fl_ondevice.errors import ConfigError

    with pytest.raises(ConfigError, match=r"takes inputs of shape \(28, 28\).*\(8, 8\)"):
        simulate(cfg)


def test_cli_reports_a_bad_value_without_a_traceback(tmp_path):
    proc = _cli(f"hydra.run.dir={tmp_path}", "num_clients=0", timeout=120)

    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert "num_clients=0 is invalid: must be >= 1" in output
    assert "Traceback" not in output
    assert not (tmp_path / "metrics.csv").exists()
