"""Conversion: verified, cached by model config, and described for app developers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fl_ondevice.config import ModelConfig
from fl_ondevice.errors import ModelError
from fl_ondevice.export import describe
from fl_ondevice.ondevice.convert import build_tflite, cache_key, verify
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.model import build_model

MLP = ModelConfig(name="mlp", learning_rate=0.1)


def test_conversion_is_cached_by_model_config(tmp_path):
    first = build_tflite(MLP, (8, 8), 10, 0, tmp_path)
    stamp = first.stat().st_mtime_ns

    again = build_tflite(MLP, (8, 8), 10, 0, tmp_path)

    assert again == first and again.stat().st_mtime_ns == stamp  # not converted again
    assert cache_key(MLP, (8, 8), 10, 0) != cache_key(MLP, (8, 8), 10, 1)
    other = ModelConfig(name="mlp", learning_rate=0.2)
    assert cache_key(MLP, (8, 8), 10, 0) != cache_key(other, (8, 8), 10, 0)
    assert cache_key(MLP, (8, 8), 10, 0) != cache_key(MLP, (28, 28), 10, 0)


def test_converted_weights_equal_the_tf_weights_bitwise(tmp_path):
    module = build_model(MLP, (8, 8), 10, seed=4)
    device = OnDeviceModel(build_tflite(MLP, (8, 8), 10, 4, tmp_path))
    saved = device.get_weights()
    for name, var in zip(module.weight_names, module.weights_, strict=True):
        assert saved[name].tobytes() == var.numpy().tobytes()


def test_verify_catches_weights_that_did_not_survive(converted):
    _, tflite = converted("mlp", (8, 8), learning_rate=0.1)
    other_seed = build_model(MLP, (8, 8), 10, seed=99)  # same graph, other weights

    with pytest.raises(ModelError, match="conversion changed weight"):
        verify(tflite, other_seed)


def test_describe_lists_signatures_and_tensor_sizes(converted):
    device = OnDeviceModel(converted("mlp", (8, 8), learning_rate=0.1)[1])

    text = describe(device)

    assert "train(x: float32[-1, 8, 8], y: int32[-1]) -> {loss: float32[]}" in text
    assert (
        "infer(x: float32[-1, 8, 8]) -> {logits: float32[-1, 10], output: float32[-1, 10]}" in text
    )
    assert "save() -> {hidden1/bias: float32[128], hidden1/kernel: float32[64, 128]," in text
    assert "restore(hidden1/bias: float32[128], hidden1/kernel: float32[64, 128]," in text
    assert "reset()" in text and "runs on ai-edge-litert" in text
    assert "hidden1/kernel           float32[64, 128]  32.0 KiB" in text
    assert f"weights ({(64 * 128 + 128 + 128 * 10 + 10) * 4 / 1024:.1f} KiB)" in text


def test_export_command_writes_a_model_an_app_can_train(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_ondevice.export",
            "model=2nn",
            "dataset=fashion_mnist",
            f"hydra.run.dir={tmp_path}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train(x: float32[-1, 28, 28], y: int32[-1])" in proc.stdout
    device = OnDeviceModel(tmp_path / "model.tflite")
    x = np.random.default_rng(0).random((16, 28, 28), dtype=np.float32)
    y = np.arange(16) % 10
    first = device.train_step(x, y)
    for _ in range(20):
        last = device.train_step(x, y)
    assert last < first


# Every model fl_ondevice builds, and each optimizer at least once (the head-only transfer model
# has plain SGD only; tests/test_model.py steps every model with every optimizer); shapes as
# small as the architecture allows.
BUILT_IN = [
    ("mlp", (8, 8), {"learning_rate": 0.1}),
    ("2nn", (8, 8), {"learning_rate": 0.05, "momentum": 0.9}),
    ("cnn", (8, 8), {"optimizer": "adam", "learning_rate": 1e-3}),
    ("simple_cnn", (28, 28), {"learning_rate": 0.05, "momentum": 0.9}),
    ("simple_cnn", (32, 32, 3), {"learning_rate": 0.01, "momentum": 0.9}),  # CIFAR-10
    ("transfer", (8, 8), {"learning_rate": 0.1, "trainable": "all", "pretrained": False}),
    ("transfer", (8, 8), {"learning_rate": 0.1, "trainable": "head", "pretrained": False}),
]


@pytest.mark.parametrize(("name", "shape", "opt"), BUILT_IN)
def test_every_baked_global_model_is_flex_free_and_trains_saves_restores_in_litert(
    name, shape, opt
):
    # Prepare: global_model.tflite as a run bakes it, from weights other than the initial ones.
    # (build_tflite's own conversions are checked for Flex ops by verify, on every conversion.)
    from fl_ondevice.config import DatasetConfig
    from fl_ondevice.ondevice.convert import bake
    from fl_ondevice.ondevice.interpreters import LITERT, operators
    from fl_ondevice.ondevice.transfer import HEAD, head_init, pretrained_base

    cfg = ModelConfig(name=name, **opt)
    classes = 5 if name == "transfer" else 10
    rng = np.random.default_rng(1)
    base = None
    if name == "transfer" and cfg.trainable == "head":
        base = pretrained_base(cfg, DatasetConfig(classes=[5, 6, 7, 8, 9]), 0).weights
        start = head_init(classes, 0)
        assert sorted(start) == sorted(HEAD)
    else:
        module = build_model(cfg, shape, classes, seed=0)
        start = {n: w.numpy() for n, w in zip(module.weight_names, module.weights_, strict=True)}
    trained = {n: (w + rng.normal(0, 0.01, w.shape)).astype(np.float32) for n, w in start.items()}
    baked = bake(cfg, shape, classes, trained, base=base)

    # Execute: LiteRT opens it, starts from the baked weights, trains, restores, trains again.
    device = OnDeviceModel(baked)
    got = device.get_weights()
    x = rng.random((12, *shape), dtype=np.float32)
    y = np.arange(12) % classes
    first = device.train_step(device.load(x), y)
    device.reset_optimizer()
    device.set_weights(trained)
    again = device.train_step(device.load(x), y)

    # Assert: builtin ops only, LiteRT, the baked weights bit for bit, a repeatable step.
    assert not [op for op in operators(baked) if op.startswith("Flex")]
    assert device.runtime.name == LITERT
    assert all(got[n].tobytes() == trained[n].tobytes() for n in trained)
    assert again == first and np.isfinite(first)
