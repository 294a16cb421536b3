"""OnDeviceModel: training through signatures, any guide-style model, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import FLEX, flex_param
from guide_model import BuiltinGuideModel, guide_tflite_bytes, to_tflite

from fl_ondevice.errors import (
    CheckpointError,
    InputError,
    ModelError,
    RuntimeUnsupportedError,
    TrainingError,
)
from fl_ondevice.ondevice.checkpoint import read_checkpoint, write_checkpoint
from fl_ondevice.ondevice.device import (
    OnDeviceModel,
    evaluate_split,
    explain_load_error,
)
from fl_ondevice.ondevice.interpreters import FLEX_MISSING
from fl_ondevice.ondevice.layouts import INFER, RESTORE, SAVE, TRAIN
from fl_ondevice.ondevice.scratch import remove_stale_scratch

_GUIDE: dict[bool, bytes] = {}


def guide_file(flex: bool) -> bytes:
    """The guide's model as the guide converts it (Flex ops), or without Flex ops."""
    if flex not in _GUIDE:
        _GUIDE[flex] = guide_tflite_bytes(flex=flex)
    return _GUIDE[flex]


@pytest.fixture()
def mlp(converted) -> OnDeviceModel:
    return OnDeviceModel(converted("mlp", (8, 8), learning_rate=0.1)[1])


# -- behaviour ------------------------------------------------------------------------------------
def test_centralised_mlp_on_digits_reaches_90_percent(converted, digits):
    x_tr, y_tr, x_te, y_te = digits
    device = OnDeviceModel(converted("mlp", (8, 8), learning_rate=0.1)[1])
    before = device.evaluate(x_te, y_te)

    fit = device.fit(x_tr, y_tr, epochs=10, batch_size=32, seed=0)
    after = device.evaluate(x_te, y_te)

    assert before["accuracy"] < 0.3
    assert after["accuracy"] >= 0.90, after
    assert fit["examples"] == len(x_tr) and fit["steps"] == 10 * -(-len(x_tr) // 32)
    assert after["loss"] < before["loss"]


def test_weights_round_trip_bitwise(mlp):
    rng = np.random.default_rng(0)
    w = {n: rng.normal(size=a.shape).astype(np.float32) for n, a in mlp.get_weights().items()}

    mlp.set_weights(w)
    back = mlp.get_weights()
    mlp.set_weights(back)

    assert all(back[n].tobytes() == w[n].tobytes() for n in w)
    assert all(mlp.get_weights()[n].tobytes() == w[n].tobytes() for n in w)


@pytest.mark.parametrize("n_models", [1, 2, 3])
def test_split_evaluation_equals_one_interpreter(converted, digits, n_models):
    x_tr, y_tr, x_te, y_te = digits
    path = converted("mlp", (8, 8), learning_rate=0.1)[1]
    trained = OnDeviceModel(path)
    trained.fit(x_tr, y_tr, epochs=2, seed=0)
    weights = trained.get_weights()
    models = [OnDeviceModel(path) for _ in range(n_models)]  # fresh: initial weights

    for x, y in [(x_te, y_te), (x_te[:2], y_te[:2])]:  # 2 examples: fewer than 3 models
        got = evaluate_split(models, weights, x, y, batch_size=64)
        want = trained.evaluate(x, y, batch_size=64)
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    assert trained.evaluate(x_te, y_te)["accuracy"] > 0.8  # the weights were not the initial


def test_fit_is_deterministic_for_a_seed_and_differs_across_seeds(mlp, digits):
    x, y = digits[0][:200], digits[1][:200]
    w0 = mlp.get_weights()
    runs = []
    for seed in (5, 5, 6):
        mlp.set_weights(w0)
        runs.append((mlp.fit(x, y, epochs=2, batch_size=16, seed=seed)["loss"], mlp.get_weights()))
    assert runs[0][0] == runs[1][0]
    assert all(runs[0][1][n].tobytes() == runs[1][1][n].tobytes() for n in w0)
    assert runs[0][0] != runs[2][0]


def test_full_batch_fit_takes_one_step_per_epoch(mlp, digits):
    fit = mlp.fit(digits[0][:100], digits[1][:100], epochs=3, batch_size=None)
    assert fit["steps"] == 3


def test_reset_optimizer_clears_momentum(converted, digits):
    # A momentum model trained on other data, reset and restored, must equal a fresh interpreter.
    tflite = converted("mlp", (8, 8), learning_rate=0.05, momentum=0.9)[1]
    used, fresh = OnDeviceModel(tflite), OnDeviceModel(tflite)
    w0 = fresh.get_weights()
    x, y = digits[0][:64], digits[1][:64]
    used.fit(digits[0][64:300], digits[1][64:300], epochs=1, batch_size=16)

    used.reset_optimizer()
    used.set_weights(w0)
    used.fit(x, y, epochs=1, batch_size=16, seed=1)
    fresh.fit(x, y, epochs=1, batch_size=16, seed=1)

    a, b = used.get_weights(), fresh.get_weights()
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


@pytest.mark.parametrize("flex", [flex_param(True), False])
def test_guide_model_trains_through_on_device_model(flex, digits):
    device = OnDeviceModel(guide_file(flex))
    x, y = digits[0], digits[1]
    assert device.one_hot and device.num_classes == 10
    before = device.evaluate(x, y)["loss"]

    first = device.fit(x, y, epochs=1, batch_size=32, seed=0)["loss"]
    last = device.fit(x, y, epochs=3, batch_size=32, seed=1)["loss"]

    assert last < first < before
    assert device.evaluate(x, y)["accuracy"] > 0.8
    # No reset signature: reset recreates the interpreter, back to the file's weights.
    device.reset_optimizer()
    assert device.evaluate(x, y)["loss"] == pytest.approx(before)


# -- bad input ------------------------------------------------------------------------------------
def test_missing_signatures_are_named():
    m = BuiltinGuideModel()
    sigs = {k: getattr(m, k).get_concrete_function() for k in (TRAIN, INFER)}
    with pytest.raises(ModelError, match=r"lacks the signature\(s\) \['save', 'restore'\]"):
        OnDeviceModel(to_tflite(m, sigs, flex=False))


def test_unexpected_train_inputs_are_named():
    class ThreeInputs(BuiltinGuideModel):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 8, 8], tf.float32),
                tf.TensorSpec([None, 10], tf.float32),
                tf.TensorSpec([None], tf.float32),
            ]
        )
        def train(self, x, y, w):
            return {"loss": tf.reduce_sum(self.model(x)) + tf.reduce_sum(y) + tf.reduce_sum(w)}

    m = ThreeInputs()
    sigs = {k: getattr(m, k).get_concrete_function() for k in (TRAIN, INFER, SAVE)}
    sigs[RESTORE] = m.restore_signature()
    with pytest.raises(ModelError, match=r"train must take \(x, y\).*\['w', 'x', 'y'\]"):
        OnDeviceModel(to_tflite(m, sigs, flex=False))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00" * 64, r"m\.tflite is not a \.tflite flatbuffer \(no 'TFL3' identifier\)"),
        (b"\x00" * 4 + b"TFL3" + b"\xff" * 56, r"m\.tflite is not a loadable \.tflite model"),
    ],
)
def test_not_a_model_is_rejected(tmp_path, content, message):
    (tmp_path / "m.tflite").write_bytes(content)
    with pytest.raises(ModelError, match=message):
        OnDeviceModel(tmp_path / "m.tflite")


@pytest.mark.parametrize(
    ("x_shape", "y", "message"),
    [
        ((4, 8, 8), np.arange(3), "x holds 4 examples but y holds 3 labels"),
        ((4, 8, 9), np.arange(4), r"x has shape \(4, 8, 9\); the model expects \(batch, 8, 8\)"),
        ((4, 64), np.arange(4), r"x has shape \(4, 64\)"),
        ((4, 8, 8), np.array([0, 1, 2, 10]), r"labels must be in \[0, 10\), got min 0 max 10"),
        ((4, 8, 8), np.array([0, -1, 2, 3]), r"labels must be in \[0, 10\), got min -1"),
        ((4, 8, 8), np.zeros(4, np.float32), "1-D array of integer labels"),
    ],
)
def test_bad_batches_fail_before_invoking(mlp, x_shape, y, message):
    w = mlp.get_weights()
    with pytest.raises(InputError, match=message):
        mlp.train_step(np.zeros(x_shape, np.float32), y)
    assert all(mlp.get_weights()[n].tobytes() == w[n].tobytes() for n in w)


def test_non_finite_loss_is_reported(mlp):
    x = np.full((4, 8, 8), np.nan, np.float32)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\)"):
        mlp.train_step(x, np.arange(4))
    with pytest.raises(TrainingError, match="non-finite"):
        mlp.fit(x, np.arange(4))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda w, p: w.pop("output/bias"), r"missing tensors \['output/bias'\]"),
        (
            lambda w, p: w.update({"hidden1/kernel": np.zeros((64, 100), np.float32)}),
            r"'hidden1/kernel' has shape \(64, 100\), the model expects \(64, 128\)",
        ),
        (
            lambda w, p: w.update({"output/bias": np.zeros(10, np.int32)}),
            "'output/bias' has dtype int32, the model expects float32",
        ),
    ],
)
def test_mismatched_checkpoint_is_named_and_weights_unchanged(mlp, tmp_path, corrupt, message):
    before = mlp.get_weights()
    bad = {n: np.ones_like(a) for n, a in before.items()}
    corrupt(bad, tmp_path)
    write_checkpoint(tmp_path / "bad.ckpt", bad)

    with pytest.raises(CheckpointError, match=message):
        mlp.set_weights(read_checkpoint(tmp_path / "bad.ckpt"))
    with pytest.raises(CheckpointError, match=message):
        mlp.set_weights(bad)
    assert all(mlp.get_weights()[n].tobytes() == before[n].tobytes() for n in before)


@pytest.mark.skipif(FLEX, reason="TF 2.18 in this process lends LiteRT its Flex delegate")
def test_a_flex_op_failing_in_litert_says_to_install_the_flex_extra():
    # What LiteRT itself says when it meets a Flex op (here on invoke, bypassing the check
    # OnDeviceModel makes first), and what fl_ondevice makes of it.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=guide_file(flex=True))
    path = np.array(b"/tmp/x", dtype=np.bytes_)
    with pytest.raises(RuntimeError) as raised:
        interpreter.get_signature_runner(SAVE)(checkpoint_path=path)
    assert FLEX_MISSING in str(raised.value)  # the real message of a Flex-less interpreter

    err = explain_load_error(raised.value, "m.tflite")

    assert isinstance(err, RuntimeUnsupportedError)
    assert "pip install -e '.[flex]'" in str(err) and "Flex" in str(err)


def test_scratch_of_ended_processes_is_removed_and_live_ones_kept(tmp_path):
    # Ray ends its workers without atexit; their /dev/shm checkpoint directories stayed behind.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale = tmp_path / f"fl_ondevice-{ended.pid}-abc"
    live = tmp_path / f"fl_ondevice-{os.getpid()}-def"
    other = tmp_path / "not-ours-1"
    for d in (stale, live, other):
        d.mkdir()
        (d / "weights.ckpt").write_bytes(b"x" * 100)

    remove_stale_scratch(str(tmp_path))

    assert not stale.exists()
    assert live.exists() and other.exists()
