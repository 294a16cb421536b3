"""Faults: dropouts, crashes, invalid updates, interruptions and resume, unwritable outputs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, metrics_rows, stable_rows
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from poison_client import dying_app

from fl_ondevice.client.client import injected_failure
from fl_ondevice.errors import ConfigError, ResumeError
from fl_ondevice.ondevice.checkpoint import read_checkpoint
from fl_ondevice.ondevice.weights import WeightSpec
from fl_ondevice.simulate import simulate
from fl_ondevice.wire.updates import checked_update

FAULTY = ("num_clients=10", "num_rounds=4", "client.dropout_rate=0.3", "client.failure_rate=0.2")


# -- dropouts and crashes -------------------------------------------------------------------------
def test_dropouts_and_failures_are_counted_as_the_seed_dictates(run):
    table = metrics_rows(run(*FAULTY))

    for row in table[1:]:
        r = int(row["round"])
        # Independent re-computation of the documented draws: all 10 clients are sampled
        # (fraction 1.0); dropout draws come from (seed, round, client, 2), failures from
        # (seed, round, client, 1).
        active = [c for c in range(10) if np.random.default_rng([0, r, c, 2]).random() >= 0.3]
        failing = [c for c in active if injected_failure(0, r, c, 0.2)]
        assert int(row["clients_sampled"]) == 10
        assert int(row["clients_dropped"]) == 10 - len(active)
        assert int(row["clients_replied"]) == len(active)
        assert int(row["clients_failed"]) == len(failing)
        assert row["skipped"] == "0"
    assert sum(int(r["clients_dropped"]) for r in table) > 0
    assert sum(int(r["clients_failed"]) for r in table) > 0
    assert float(table[-1]["accuracy"]) > float(table[0]["accuracy"])


def test_fault_injection_is_deterministic_for_a_seed(run):
    assert stable_rows(run(*FAULTY)) == stable_rows(run(*FAULTY, "hydra.job.name=again"))


def test_crash_is_reported_with_client_round_and_cause(tmp_path, cache, caplog):
    overrides = ("num_clients=4", "num_rounds=1", "client.failure_rate=0.5", f"cache_dir={cache}")
    failing = [c for c in range(4) if injected_failure(0, 1, c, 0.5)]
    assert failing

    simulate(compose_config(tmp_path, *overrides), keep_engine=True)

    warnings = [r.getMessage() for r in caplog.records if r.name == "fl_ondevice.wire.transport"]
    for c in failing:
        expected = (
            f"round 1: client {c}, round 1, train: injected failure (client.failure_rate=0.5)"
        )
        assert any(w.startswith(expected) for w in warnings), warnings
    assert not any("Traceback" in w or "ClientAppException" in w for w in warnings)


def test_a_crashed_message_fails_each_of_its_clients_and_the_rest_average(tmp_path, cache, caplog):
    # Two clients per message: the message holding client 0 raises before any client trains
    # (as if the worker died), so clients 0 and 1 (its message) fail; 2 and 3 make the round.
    overrides = ("num_clients=4", "num_rounds=1", "client.clients_per_message=2")
    simulate(compose_config(tmp_path, *overrides, f"cache_dir={cache}"), client_app=dying_app())

    row = metrics_rows(tmp_path)[1]
    assert (row["clients_replied"], row["clients_failed"], row["skipped"]) == ("4", "2", "0")
    assert int(row["examples"]) > 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "fl_ondevice.wire.transport"]
    for c in (0, 1):
        assert any(f"client {c}, round 1" in w and w.endswith("device lost") for w in warnings)


def test_too_few_replies_skip_the_round_and_the_run_goes_on(run):
    out = run(
        "num_clients=4", "num_rounds=4", "client.dropout_rate=0.6", "strategy.min_train_nodes=3"
    )
    table = metrics_rows(out)

    skipped = [row for row in table[1:] if row["skipped"] == "1"]
    assert skipped, "with 60% dropout some round must have fewer than 3 updates"
    assert len(table) == 5  # every round recorded
    for row in skipped:
        previous = table[int(row["round"]) - 1]
        assert row["accuracy"] == previous["accuracy"]  # global model unchanged
        assert int(row["clients_replied"]) - int(row["clients_failed"]) < 3


# -- invalid updates ------------------------------------------------------------------------------
SPEC = WeightSpec.of({"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)})


def _content(weights: dict, examples: float = 5) -> RecordDict:
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples})})


def _good() -> dict:
    return {"a": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}


@pytest.mark.parametrize(
    ("change", "examples", "message"),
    [
        (lambda w: w.update(a=np.ones((3, 2), np.float32)), 5, r"'a' has shape \(3, 2\)"),
        (lambda w: w.update(b=np.ones(3, np.float64)), 5, "'b' has dtype float64"),
        (lambda w: w.pop("b"), 5, r"missing tensors \['b'\]"),
        (lambda w: w.update(c=np.ones(1, np.float32)), 5, r"unexpected tensors \['c'\]"),
        (
            lambda w: w["a"].__setitem__((0, 0), np.nan),
            5,
            r"non-finite values \(NaN/Inf\) in \['a'\]",
        ),
        (lambda w: w["b"].__setitem__(1, np.inf), 5, r"non-finite.*\['b'\]"),
        (lambda w: None, 0, "num-examples=0, must be > 0"),
        (lambda w: None, -3, "num-examples=-3"),
    ],
)
def test_each_kind_of_invalid_update_is_named(change, examples, message):
    weights = _good()
    change(weights)
    problem = checked_update(_content(weights, examples), SPEC, "num-examples")
    assert isinstance(problem, str) and re.search(message, problem), problem


def test_valid_update_passes():
    examples, weights = checked_update(_content(_good(), 7), SPEC, "num-examples")
    assert examples == 7.0
    assert all(np.array_equal(weights[n], _good()[n]) for n in _good())


POISON = ("+client.mods.poison._target_=poison_client.Poison",)


@pytest.mark.parametrize("kind", ["nan", "examples"])  # each kind is unit-tested above
def test_poisoned_update_never_reaches_the_global_model(run, cache, tmp_path, kind):
    # Client 0 of 2 sends a bad update (a mod spoils it on the device) through the real engine;
    # with min_train_nodes=2 the round is skipped, so the global model must still be the
    # initial one.
    overrides = ("num_clients=2", "num_rounds=1")
    out = run(*overrides, *POISON, f"+client.mods.poison.kind='{kind}'")
    initial = compose_config(tmp_path, f"cache_dir={cache}", *overrides)

    row = metrics_rows(out)[1]
    got = read_checkpoint(out / "global_model.ckpt")
    from fl_ondevice.server.prepare import prepare

    start = prepare(initial).server_model.get_weights()
    assert row["clients_rejected"] == "1" and row["skipped"] == "1"
    assert all(got[n].tobytes() == start[n].tobytes() for n in start)


def test_poisoned_update_is_left_out_of_the_average(run):
    # All three clients in one engine message: each goes through the mod chain on its own, as
    # on its own device, so only client 0's update is spoiled.
    out = run(
        "num_clients=3",
        "num_rounds=1",
        "client.clients_per_message=3",
        *POISON,
        "+client.mods.poison.kind='nan'",
    )
    row = metrics_rows(out)[1]
    assert row["clients_rejected"] == "1" and row["skipped"] == "0"
    assert all(np.isfinite(w).all() for w in read_checkpoint(out / "global_model.ckpt").values())


# -- interruption and resume ----------------------------------------------------------------------
def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fl_ondevice.simulate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow  # three command-line runs: ~1 min on an idle 2-core machine
def test_resume_after_a_real_interruption_equals_the_uninterrupted_run(tmp_path, cache):
    # 40 rounds of ~0.1 s: Ctrl-C after round 2 must land while rounds still run, also on a
    # loaded machine (with 6, the run could end before the signal arrived).
    args = ("num_rounds=40", "num_clients=6", "client.failure_rate=0.1", f"cache_dir={cache}")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    reference = _cli(*args, f"hydra.run.dir={whole}")
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output[-3000:]
    assert "train: injected failure" in output and "Traceback" not in output

    proc = _cli(*args, f"hydra.run.dir={cut}")
    _wait_for_round(proc, cut, 2)
    output = _stop(proc, signal.SIGINT)  # Ctrl-C

    done = json.loads((cut / "state.json").read_text())["round"]
    assert f"SIGINT: stopped after round {done}; continue with" in output
    assert f"resume={cut}" in output
    assert "Traceback" not in output, output[-3000:]
    assert len(metrics_rows(cut)) - 1 < 40, "the run finished before it was interrupted"

    resumed = _cli(f"resume={cut}", f"hydra.run.dir={tmp_path / 'resume-log'}")
    output, _ = resumed.communicate(timeout=600)

    assert resumed.returncode == 0, output[-3000:]
    assert f"resuming {cut} after round" in output
    assert stable_rows(cut) == stable_rows(whole)
    a, b = read_checkpoint(cut / "global_model.ckpt"), read_checkpoint(whole / "global_model.ckpt")
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


def _wait_for_round(proc: subprocess.Popen, out: Path, r: int) -> None:
    deadline, state = time.monotonic() + 300, out / "state.json"
    while not state.exists() or json.loads(state.read_text())["round"] < r:
        assert time.monotonic() < deadline and proc.poll() is None, f"round {r} never completed"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, sig: signal.Signals) -> str:
    """Send ``sig``; the process must be gone within 20 s with exit code 128 + sig."""
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"still running 20 s after {sig.name}:\n{output[-3000:]}")
    assert proc.returncode == 128 + sig, output[-3000:]
    return output


@pytest.mark.slow  # one command-line run
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, cache):
    out = tmp_path / "run"
    proc = _cli("num_rounds=500", f"cache_dir={cache}", f"hydra.run.dir={out}")
    _wait_for_round(proc, out, 1)

    output = _stop(proc, signal.SIGTERM)

    done = json.loads((out / "state.json").read_text())["round"]
    assert done < 500 and "Traceback" not in output
    assert f"SIGTERM: stopped after round {done}; continue with" in output
    assert f"resume={out}" in output


def test_resume_of_a_directory_without_a_completed_round_says_so(tmp_path, cache):
    cfg = compose_config(tmp_path, f"cache_dir={cache}")
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    from fl_ondevice.server.resume import resumed_config

    with pytest.raises(ResumeError, match="no state.json there"):
        simulate(resumed_config(str(tmp_path)))
    with pytest.raises(ResumeError, match="no config.yaml there"):
        resumed_config(str(tmp_path / "nowhere"))
    assert cfg.resume is None


# -- output directory -----------------------------------------------------------------------------
def test_unwritable_output_dir_is_detected_at_start(tmp_path, no_engine):
    with pytest.raises(ConfigError, match=r"output_dir='/proc/fl_ondevice/run' is not writable"):
        simulate(compose_config(Path("/proc/fl_ondevice/run")))
