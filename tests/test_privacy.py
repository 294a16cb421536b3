"""(epsilon, delta) accounting: every number recomputed here with dp-accounting itself, the
server's noise measured on a run, the budget and the resume checked on real runs."""

from __future__ import annotations

import csv
import json
import math
import shutil

import dp_accounting
import numpy as np
import pytest
from conftest import compose_config, metrics_rows, reply
from dp_accounting.rdp import RdpAccountant as DpaRdp
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)

from fl_ondevice.errors import ConfigError
from fl_ondevice.server.fedavg import FedAvg
from fl_ondevice.server.privacy import find_mechanism, run_sampling, solve_noise_multiplier
from fl_ondevice.server.strategy import make_strategy

N, M = 100, 10  # clients, sampled per round
DP = (
    "strategy=dp_server_fixed",
    f"num_clients={N}",
    "partition=iid",
    f"strategy.strategy.fraction_train={M / N}",
    f"strategy.num_sampled_clients={M}",
    "strategy.noise_multiplier=1.0",
    "num_rounds=3",
)
DELTA = N**-1.1  # the default dp.delta


def _expected(sampling: str, z: float, rounds: int, delta: float) -> float:
    """epsilon of ``rounds`` releases, built from dp-accounting's own events."""
    gaussian = dp_accounting.GaussianDpEvent(z)
    if sampling == "without_replacement":
        event = dp_accounting.SampledWithoutReplacementDpEvent(N, M, gaussian)
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    elif sampling == "poisson":
        event = dp_accounting.PoissonSampledDpEvent(M / N, gaussian)
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    else:
        event, relation = gaussian, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    return DpaRdp(neighboring_relation=relation).compose(event, rounds).get_epsilon(delta)


@pytest.mark.parametrize("sampling", ["without_replacement", "poisson", "no_amplification"])
def test_epsilon_column_is_dp_accountings_epsilon_of_the_rounds_run(run, sampling):
    out = run(*DP, f"dp.sampling={sampling}")

    rows = metrics_rows(out)
    assert [int(r["clients_sampled"]) for r in rows] == [0, M, M, M]
    assert float(rows[0]["epsilon"]) == 0.0
    for r in rows[1:]:
        expected = _expected(sampling, 1.0, int(r["round"]), DELTA)
        assert float(r["epsilon"]) == pytest.approx(expected, rel=1e-6)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["summary"]["epsilon"] == pytest.approx(float(rows[-1]["epsilon"]), rel=1e-12)
    assert summary["privacy"]["sampling"] == sampling
    assert summary["privacy"]["delta"] == pytest.approx(DELTA)
    if sampling == "no_amplification":  # Flower's own accountant for its fixed-clipping wrappers
        config = PrivacyConfig(
            DELTA, N, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
        )
        flower = RdpAccountant(config)
        flower.compose(GaussianPrivacyEvent(1.0, M, N), 3)
        assert float(rows[-1]["epsilon"]) == pytest.approx(flower.get_epsilon(DELTA), rel=1e-6)


def test_amplification_by_sampling_lowers_epsilon(run):
    eps = {
        s: float(metrics_rows(run(*DP, f"dp.sampling={s}"))[-1]["epsilon"])
        for s in ("without_replacement", "no_amplification")
    }
    assert eps["without_replacement"] < eps["no_amplification"] / 3


def test_target_epsilon_sets_the_noise_so_the_final_epsilon_is_just_below_it(run):
    out = run(*DP[:-2], "num_rounds=4", "dp.target_epsilon=3")

    final = float(metrics_rows(out)[-1]["epsilon"])
    assert 0.95 * 3 <= final <= 3
    z = json.loads((out / "metrics.json").read_text())["privacy"]["noise_multiplier"]
    assert final == pytest.approx(_expected("without_replacement", z, 4, DELTA), rel=1e-6)
    assert f"noise_multiplier: {z}" in (out / "config.yaml").read_text()  # what it ran with


def test_the_solved_noise_is_the_smallest_that_meets_the_target():
    z = solve_noise_multiplier(2.0, M, N, 50, 1e-5, "poisson")
    assert _expected("poisson", z, 50, 1e-5) <= 2.0 < _expected("poisson", z * 0.999, 50, 1e-5)


def test_max_epsilon_stops_the_run_before_the_round_that_would_exceed_it(run):
    limit = 1.2
    stop = next(r for r in range(1, 10) if _expected("without_replacement", 1.0, r, DELTA) > limit)
    assert stop == 3  # the 3rd release would pass it: the test is not vacuous

    out = run(*DP[:-1], "num_rounds=6", f"dp.max_epsilon={limit}")

    rows = metrics_rows(out)
    assert [int(r["round"]) for r in rows] == list(range(stop))
    assert all(float(r["epsilon"]) <= limit for r in rows)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["privacy"]["stopped_before_round"] == stop
    assert (out / "global_model.tflite").is_file()  # a clean stop: the outputs are written


def test_a_resumed_run_continues_the_epsilon_bit_for_bit(run, tmp_path):
    from fl_ondevice.server.resume import resumed_config
    from fl_ondevice.simulate import simulate

    whole = run(*DP)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    (cut / "state.json").write_text(
        json.dumps({"round": 2, "checkpoint": "checkpoints/round-2.weights.npz"})
    )

    simulate(resumed_config(str(cut)), keep_engine=True)

    assert [r["epsilon"] for r in metrics_rows(cut)] == [r["epsilon"] for r in metrics_rows(whole)]
    privacy = [json.loads((d / "metrics.json").read_text())["privacy"] for d in (cut, whole)]
    assert privacy[0] == privacy[1]


@pytest.mark.parametrize("strategy", ["dp_server_fixed", "dp_client_fixed"])
def test_the_server_adds_noise_of_std_z_c_over_m(run, strategy):
    # Round 1 of two runs of one seed differs only by the noise: z = 1 against z = 0.
    common = (f"strategy={strategy}", *DP[1:-2], "num_rounds=1", "strategy.clipping_norm=0.5")
    noisy, clean = (
        run(*common, "strategy.noise_multiplier=1.0"),
        run(*common, "strategy.noise_multiplier=0.0"),
    )

    diffs = []
    with (
        np.load(noisy / "checkpoints/round-1.weights.npz") as a,
        np.load(clean / "checkpoints/round-1.weights.npz") as b,
    ):
        diffs = np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in a.files])
    expected = 1.0 * 0.5 / M  # Flower's z * C / m
    assert diffs.size > 5000
    assert np.std(diffs) == pytest.approx(expected, rel=0.04)
    assert abs(np.mean(diffs)) < 4 * expected / math.sqrt(diffs.size)
    assert metrics_rows(clean)[-1]["epsilon"] == ""  # no noise, no epsilon


def test_local_dp_mod_reports_each_clients_local_epsilon(run):
    z = math.sqrt(2 * math.log(1.25 / 0.01)) / 50.0
    out = run(
        "num_clients=6",
        "num_rounds=3",
        "strategy.fraction_train=0.5",
        "strategy.min_train_nodes=3",
        "+client.mods.localdp._target_=flwr.clientapp.mod.LocalDpMod",
        "+client.mods.localdp.clipping_norm=1.0",
        "+client.mods.localdp.sensitivity=1.0",
        "+client.mods.localdp.epsilon=50.0",
        "+client.mods.localdp.delta=0.01",
    )
    delta = 6**-1.1
    with (out / "clients.csv").open() as f:
        clients = list(csv.DictReader(f))
    epsilons = []
    for c in clients:
        k = int(c["rounds"])
        expected = 0.0 if k == 0 else _expected("none", z, k, delta)
        assert float(c["local_epsilon"]) == pytest.approx(expected, rel=1e-6)
        epsilons.append(expected)
    assert len({c["rounds"] for c in clients}) > 1  # clients took part in different numbers
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["local_epsilon_max"] == pytest.approx(max(epsilons), rel=1e-6)
    assert summary["local_epsilon_median"] == pytest.approx(float(np.median(epsilons)), rel=1e-6)
    assert summary["epsilon"] is None  # no central mechanism


def test_adaptive_clipping_is_accounted_with_its_effective_noise_multiplier():
    inner = FedAvg(equal_weights=True)
    layer = DifferentialPrivacyServerSideAdaptiveClipping(inner, 0.7, 20, clipped_count_stddev=1.0)
    update_noise = layer.noise_multiplier
    assert update_noise > 0.7  # Flower raised the update noise to pay for the count's
    mechanism = find_mechanism(layer, 200)
    # Andrew et al. 2021, Theorem 1, by hand: (z_update^-2 + (2 sigma_count)^-2)^-1/2
    assert mechanism.noise_multiplier == pytest.approx((update_noise**-2 + 2.0**-2) ** -0.5)
    assert mechanism.noise_multiplier == pytest.approx(0.7, rel=1e-9)


def test_equal_weights_average_is_the_plain_mean_and_the_metrics_stay_weighted():
    rng = np.random.default_rng(0)
    counts, updates = (5, 1, 12), [rng.normal(size=6).astype(np.float32) for _ in range(3)]
    replies = [
        reply(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(w)}),
                    "metrics": MetricRecord({"num-examples": n, "train-loss": float(n)}),
                }
            ),
            c,
        )
        for c, (n, w) in enumerate(zip(counts, updates, strict=True))
    ]
    arrays, metrics = FedAvg(equal_weights=True).aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean(updates, axis=0), rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(sum(n * n for n in counts) / sum(counts))


def test_a_weighted_average_under_dp_is_refused(tmp_path):
    cfg = compose_config(
        tmp_path, "strategy=dp_server_fixed", "strategy.strategy.equal_weights=false"
    )
    with pytest.raises(ConfigError, match=r"equal weights.*strategy.strategy.equal_weights=true"):
        find_mechanism(make_strategy(cfg), cfg.num_clients)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("dp.target_epsilon=3",), r"dp.target_epsilon=3.0 needs a central DP strategy"),
        (("dp.max_epsilon=3",), r"dp.max_epsilon=3.0 needs a central DP strategy"),
        (("dp.sampling=uniform",), r"dp.sampling='uniform' is invalid"),
        (("dp.delta=1.5",), r"dp.delta=1.5 is invalid"),
        (
            ("strategy=dp_server_fixed", "strategy.noise_multiplier=0", "dp.max_epsilon=3"),
            r"adds no noise",
        ),
    ],
)
def test_bad_privacy_settings_stop_before_any_engine_starts(
    tmp_path, no_engine, overrides, message
):
    from fl_ondevice.simulate import simulate

    with pytest.raises(ConfigError, match=message):
        simulate(compose_config(tmp_path, *overrides))


def test_phones_availability_makes_the_accounting_claim_no_amplification(tmp_path, caplog):
    cfg = compose_config(tmp_path, "strategy=dp_server_fixed", "device=phones")
    assert run_sampling(cfg) == "no_amplification"
    assert "not uniform" in caplog.text
