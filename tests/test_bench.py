"""Tests of experiments/bench's bookkeeping: grid rule, /proc sampling, Keras twin, verdicts."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from experiments.bench.grid import plan, updates_per_round
from experiments.bench.procstat import TreeSampler, tree_stat
from experiments.bench.report import issue_targets


def test_updates_per_round_follows_fedavg_sampling_rule():
    # Prepare / Execute / Assert: max(int(n * C), min_train_nodes), capped at n
    assert [updates_per_round(n, f) for n, f in [(10, 0.1), (1000, 0.1), (100, 1.0)]] == [
        2,
        100,
        100,
    ]


def test_plan_skips_jobs_estimated_over_the_budget_and_says_why():
    cells = plan(["mlp"], [10, 1000], [1.0], ["ours", "peer"], 3, 2, 200.0)

    skipped = {(c.job.kind, c.job.clients): c.skipped for c in cells}

    assert skipped[("ours", 10)] is None
    assert "max-sim-seconds" in (skipped[("peer", 1000)] or "")


def test_tree_stat_sees_this_process_and_its_child():
    child = subprocess.Popen(["sleep", "2"])
    try:
        stat = tree_stat(os.getpid())
    finally:
        child.kill()
        child.wait()

    assert {os.getpid(), child.pid} <= set(stat)
    assert stat[os.getpid()][2] > 0  # RSS in MiB


def test_sampler_counts_cpu_of_a_busy_loop():
    sampler = TreeSampler(os.getpid(), interval=0.05).start()
    t_end = time.monotonic() + 0.5
    while time.monotonic() < t_end:
        pass
    sampler.stop()

    util, _ = sampler.utilisation(sampler.samples[0].t, sampler.samples[-1].t, cores=1)

    assert 0.1 < util <= 1.2  # one busy core, on a shared machine


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_keras_twin_has_fl_ondevice_weight_shapes_in_order(name):
    from experiments.bench.peer import keras_twin
    from fl_ondevice.config import ModelConfig
    from fl_ondevice.ondevice.model import build_model

    ours = build_model(ModelConfig(name=name), (28, 28), 10, 0)
    twin = keras_twin(name, (28, 28), 10, 0.1)

    assert [tuple(w.shape) for w in twin.get_weights()] == [tuple(w.shape) for w in ours.weights_]


def test_targets_compare_ratios_with_issue_limits():
    by = {
        ("mlp", 100, 1.0, "ours"): {
            "non_train_ms": 7.0,
            "cpu_util": 0.95,
            "updates_per_round": 100,
        },
        ("mlp", 10, 1.0, "ours"): {"peak_rss_mib": 1000.0},
        ("mlp", 1000, 1.0, "ours"): {"peak_rss_mib": 1200.0},
    }
    compare = [
        {"model": "mlp", "clients": 100, "fraction": 1.0, "ratio": 0.4},
        {"model": "cnn", "clients": 10, "fraction": 0.1, "ratio": 1.5},
    ]

    verdicts = {(t["target"], t["where"]): t["verdict"] for t in issue_targets(by, compare)}

    assert verdicts[("mlp round time / peer", "n=100 C=1.0")] == "PASS"  # 0.4 <= 0.5
    assert verdicts[("cnn round time / peer", "n=10 C=0.1")] == "FAIL"  # 1.5 > 1.0
    assert verdicts[("mlp non-train ms per update", "n=100 C=1.0")] == "FAIL"  # 7 > 5 ms
    assert verdicts[("peak RSS 1000 / 10 clients", "mlp C=1.0")] == "PASS"  # 1.2 <= 1.3
    assert verdicts[("both cores busy (CPU util)", "mlp n=100 C=1.0")] == "PASS"
