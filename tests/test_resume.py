"""What a resume reads back: the strategy's own state, saved after every round."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import stable_rows
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
)

from fl_ondevice.checkpoint import read_checkpoint
from fl_ondevice.errors import ResumeError
from fl_ondevice.resume import restore_strategy_state, strategy_state


def test_strategy_state_round_trips_every_layer_and_kind():
    # Prepare: state as rounds leave it, in a DP wrapper around FedAvgM, and in FedAdam.
    wrapped = DifferentialPrivacyServerSideAdaptiveClipping(FedAvgM(), 0.1, 10)
    wrapped.clipping_norm = 0.37
    inner = wrapped.strategy
    assert isinstance(inner, FedAvgM)
    inner.momentum_vector = [np.arange(3.0), np.ones((2, 2), np.float32)]
    adam = FedAdam()
    adam.m_t = {"w": np.full(2, 0.5)}
    adam.v_t = {"w": np.full(2, 0.25)}

    saved_dp, saved_adam = strategy_state(wrapped), strategy_state(adam)
    fresh_dp = DifferentialPrivacyServerSideAdaptiveClipping(FedAvgM(), 0.1, 10)
    fresh_adam = FedAdam()
    restore_strategy_state(fresh_dp, saved_dp)
    restore_strategy_state(fresh_adam, saved_adam)

    assert fresh_dp.clipping_norm == 0.37 and isinstance(fresh_dp.clipping_norm, float)
    momentum = fresh_dp.strategy.momentum_vector  # type: ignore[attr-defined]
    assert isinstance(momentum, list) and len(momentum) == 2
    np.testing.assert_array_equal(momentum[0], np.arange(3.0))
    assert momentum[1].dtype == np.float32
    assert fresh_adam.m_t is not None and fresh_adam.v_t is not None
    np.testing.assert_array_equal(fresh_adam.m_t["w"], [0.5, 0.5])
    np.testing.assert_array_equal(fresh_adam.v_t["w"], [0.25, 0.25])
    assert "strategy/current_arrays" not in saved_adam  # rebuilt from the global model


def test_a_stateless_strategy_saves_only_its_settings():
    state = strategy_state(FedAvg(fraction_train=0.5))

    assert all(v.ndim == 0 for v in state.values())
    assert float(state["strategy/fraction_train"]) == 0.5


# -- reading a run directory back: nothing read is trusted ----------------------------------------
FEDADAM_RUN = ("num_clients=4", "num_rounds=3", "strategy=fedadam")  # moments: state on disk


def _copy(run, tmp_path: Path) -> tuple[Path, Path]:
    whole = run(*FEDADAM_RUN)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    (cut / "global_model.ckpt").unlink()  # a resume must write it again
    return whole, cut


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_last_checkpoint_resumes_from_the_round_before(run, tmp_path, caplog):
    from fl_ondevice.resume import resumed_config
    from fl_ondevice.simulate import simulate

    whole, cut = _copy(run, tmp_path)
    _truncate(cut / "checkpoints" / "round-3.ckpt")

    with caplog.at_level(logging.WARNING):
        simulate(resumed_config(str(cut)), keep_engine=True)

    warning = "round-3.ckpt' cannot be read as a TF checkpoint"
    assert warning in caplog.text and "continuing after round 2 instead" in caplog.text
    assert stable_rows(cut) == stable_rows(whole)  # round 3 again, from round 2's moments
    a, b = read_checkpoint(cut / "global_model.ckpt"), read_checkpoint(whole / "global_model.ckpt")
    assert all(a[n].tobytes() == b[n].tobytes() for n in b)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda cut: (cut / "state.json").write_text('{"round": 3, "checkp'),
            r"state.json' is not valid JSON \(.*\); restore it from a copy or start the run anew",
        ),
        (
            lambda cut: (cut / "state.json").write_text(
                json.dumps({"round": 3, "checkpoint": "../../etc/passwd"})
            ),
            r"names the checkpoint '../../etc/passwd', which is not in '.*checkpoints'",
        ),
        (
            lambda cut: (cut / "state.json").write_text(json.dumps({"round": "3"})),
            r"state.json' should be \{\"round\": N >= 0, \"checkpoint\": PATH\}",
        ),
        (
            lambda cut: [_truncate(cut / "checkpoints" / f"round-{r}.ckpt") for r in (2, 3)],
            r"neither of the kept rounds can be read \(round 3: .*round-3.ckpt.*; round 2: "
            r".*round-2.ckpt.*\); start the run anew",
        ),
        (
            lambda cut: (cut / "metrics.json").write_text("{}"),
            r"metrics.json' cannot be read \(KeyError: 'rounds'\).*start it anew",
        ),
    ],
    ids=["not-json", "outside-the-run", "wrong-fields", "both-checkpoints", "metrics"],
)
def test_a_damaged_run_directory_is_named_before_anything_runs(
    run, tmp_path, request, damage, message
):
    from fl_ondevice.resume import resumed_config
    from fl_ondevice.simulate import simulate

    _, cut = _copy(run, tmp_path)
    damage(cut)
    request.getfixturevalue("no_engine")  # from here on, starting an engine fails the test

    with pytest.raises(ResumeError, match=message):
        simulate(resumed_config(str(cut)))
