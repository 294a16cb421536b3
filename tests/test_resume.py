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

from fl_ondevice.errors import ResumeError
from fl_ondevice.ondevice.checkpoint import read_checkpoint
from fl_ondevice.server.resume import restore_strategy_state, strategy_state


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
    from fl_ondevice.server.resume import resumed_config
    from fl_ondevice.simulate import simulate

    whole, cut = _copy(run, tmp_path)
    _truncate(cut / "checkpoints" / "round-3.weights.npz")

    with caplog.at_level(logging.WARNING):
        simulate(resumed_config(str(cut)), keep_engine=True)

    warning = "round-3.weights.npz' cannot be read as a round's weights"
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
            lambda cut: [_truncate(cut / "checkpoints" / f"round-{r}.weights.npz") for r in (2, 3)],
            r"neither of the kept rounds can be read \(round 3: .*round-3.weights.npz.*; "
            r"round 2: .*round-2.weights.npz.*\); start the run anew",
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
    from fl_ondevice.server.resume import resumed_config
    from fl_ondevice.simulate import simulate

    _, cut = _copy(run, tmp_path)
    damage(cut)
    request.getfixturevalue("no_engine")  # from here on, starting an engine fails the test

    with pytest.raises(ResumeError, match=message):
        simulate(resumed_config(str(cut)))


def test_each_round_keeps_its_weights_as_npz_equal_to_the_final_tf_checkpoint(run):
    from fl_ondevice.server.resume import read_weights

    whole = run(*FEDADAM_RUN)

    state = json.loads((whole / "state.json").read_text())
    assert state == {"round": 3, "checkpoint": "checkpoints/round-3.weights.npz"}
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == [
        "round-2.npz",
        "round-2.weights.npz",
        "round-3.npz",
        "round-3.weights.npz",
    ]
    kept = read_weights(whole / state["checkpoint"])
    final = read_checkpoint(whole / "global_model.ckpt")  # written by TensorFlow at the end
    assert list(kept) == list(final)
    assert all(kept[n].dtype == final[n].dtype for n in final)
    assert all(kept[n].tobytes() == final[n].tobytes() for n in final)


def test_a_run_directory_with_tf_checkpoints_resumes_from_them(run, tmp_path):
    # Runs written before the weights were kept as .npz have TF checkpoints, round-r.ckpt.
    from fl_ondevice.ondevice.checkpoint import write_checkpoint
    from fl_ondevice.server.resume import resumed_config
    from fl_ondevice.simulate import simulate

    whole, cut = _copy(run, tmp_path)
    for r in (2, 3):
        npz = cut / "checkpoints" / f"round-{r}.weights.npz"
        with np.load(npz) as saved:
            write_checkpoint(npz.with_name(f"round-{r}.ckpt"), {k: saved[k] for k in saved.files})
        npz.unlink()
    _truncate(cut / "checkpoints" / "round-3.ckpt")  # so round 2 is also read from its .ckpt
    state = {"round": 3, "checkpoint": "checkpoints/round-3.ckpt"}
    (cut / "state.json").write_text(json.dumps(state))

    simulate(resumed_config(str(cut)), keep_engine=True)

    assert stable_rows(cut) == stable_rows(whole)  # round 3 again, from round 2's .ckpt
    assert json.loads((cut / "state.json").read_text())["checkpoint"].endswith(".weights.npz")
    a, b = read_checkpoint(cut / "global_model.ckpt"), read_checkpoint(whole / "global_model.ckpt")
    assert all(a[n].tobytes() == b[n].tobytes() for n in b)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"checkpoint file '.*round-1.weights.npz' does not exist"),
        (b"", r"round-1.weights.npz' cannot be read as a round's weights \(.*\); the file is"),
        ("empty", r"checkpoint file '.*round-1.weights.npz' holds no tensors"),
    ],
    ids=["missing", "not-a-zip", "no-tensors"],
)
def test_read_weights_names_a_file_it_cannot_use(tmp_path, content, message):
    from fl_ondevice.errors import CheckpointError
    from fl_ondevice.server.resume import read_weights

    path = tmp_path / "round-1.weights.npz"
    if content == "empty":
        np.savez(path)
    elif content is not None:
        path.write_bytes(content)

    with pytest.raises(CheckpointError, match=message):
        read_weights(path)
