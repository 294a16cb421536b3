"""Parity of the converted models with the TF models they came from, and of our optimizers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from fl_ondevice.config import ModelConfig
from fl_ondevice.errors import ConfigError
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.layouts import INFER, TRAIN_PROXIMAL
from fl_ondevice.ondevice.model import build_model


def _batches(shape: tuple[int, int], steps: int, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.random((batch, *shape), dtype=np.float32)
        yield x, rng.integers(0, 10, batch).astype(np.int32)


def _cross_entropy(logits: tf.Tensor, y: np.ndarray) -> tf.Tensor:
    # TF's fused op: shares nothing with the model's hand-written loss and gradient.
    labels = tf.constant(y, tf.int32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def _tf_weights(module) -> dict[str, np.ndarray]:
    return {n: w.numpy() for n, w in zip(module.weight_names, module.weights_, strict=True)}


@pytest.mark.parametrize(
    ("name", "opt"),
    [
        ("mlp", {"learning_rate": 0.1}),
        ("mlp", {"learning_rate": 0.05, "momentum": 0.9}),
        ("mlp", {"optimizer": "adam", "learning_rate": 1e-3}),
        ("2nn", {"learning_rate": 0.05, "momentum": 0.9}),
        ("2nn", {"optimizer": "adam", "learning_rate": 1e-3}),
    ],
)
def test_100_interpreter_steps_match_tf(converted, name, opt):
    # Prepare: TF module and its .tflite from the same initial weights.
    module, tflite = converted(name, (28, 28), **opt)
    device = OnDeviceModel(tflite)
    d_loss, d_w = [], 0.0
    # Execute: the same 100 batches through both.
    for x, y in _batches((28, 28), 100, 32):
        tf_loss = float(module.train(x, y)["loss"])
        d_loss.append(abs(tf_loss - device.train_step(x, y)))
    lite = device.get_weights()
    d_w = max(float(np.abs(lite[n] - w).max()) for n, w in _tf_weights(module).items())
    # Assert: DESIGN.md measured 4.8e-7 / 4.6e-7 for the MLP; the bound is 1e-5.
    assert max(d_loss) <= 1e-5
    assert d_w <= 1e-5


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (8, 8)),
        ("2nn", (15, 14)),
        ("cnn", (28, 28)),
        ("simple_cnn", (28, 28)),
        ("cnn", (9, 11)),
        ("simple_cnn", (15, 14)),
        ("transfer", (8, 8)),  # 3x3 kernels
        ("transfer", (15, 14)),
        ("simple_cnn", (32, 32, 3)),  # colour: CIFAR-10's shape, NIID-Bench's model
        ("cnn", (9, 11, 3)),
    ],
)
def test_hand_written_gradients_equal_the_tapes_with_ties(name, shape):
    # Prepare: ties whose position matters. Conv kernels keep only their centre tap, so equal
    # pixels give equal conv outputs although their neighbourhoods (which the kernel gradient
    # sees) differ; pixels on a 0.25 grid, a zero top half and a constant left strip make such
    # ties common, and non-zero biases (as after training) make tied maxima positive, so ReLU
    # does not mask them. Odd shapes exercise SAME pooling's padded windows.
    module = build_model(ModelConfig(name=name, learning_rate=0.05), shape, 10, seed=1)
    rng = np.random.default_rng(0)
    for n, w in zip(module.weight_names, module.weights_, strict=True):
        if n.startswith("conv") and n.endswith("/kernel"):
            centre = np.zeros(w.shape, np.float32)
            c = w.shape[0] // 2
            centre[c, c] = 3.0 * w.numpy()[c, c]
            w.assign(centre)
        elif n.endswith("/bias"):
            w.assign(rng.normal(0.0, 0.1, w.shape).astype(np.float32))
    x = np.round(rng.random((16, *shape)) * 4).astype(np.float32) / 4
    x[:, : shape[0] // 2] = 0.0
    x[:, :, : shape[1] // 3] = 1.0
    y = rng.integers(0, 10, 16).astype(np.int32)
    # Execute: the tape through the plain forward (conv -> ReLU -> pool) vs the hand-written pass.
    with tf.GradientTape() as tape:
        want_loss = _cross_entropy(module.forward(module.weights_, x), y)
    want = tape.gradient(want_loss, module.weights_)
    loss, grads = tf.function(module.loss_and_gradients)(x, y)
    # Assert: same loss; gradients equal up to summation order (a misrouted tie is ~1e-2 off).
    assert abs(float(loss) - float(want_loss)) <= 1e-6
    for n, g, w in zip(module.weight_names, grads, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-6, rtol=0, err_msg=n)


@pytest.mark.parametrize(
    ("opt", "keras_opt"),
    [
        ({"learning_rate": 0.05, "momentum": 0.9}, lambda: keras.optimizers.SGD(0.05, 0.9)),
        (
            {"optimizer": "adam", "learning_rate": 0.01},
            lambda: keras.optimizers.Adam(0.01, epsilon=1e-7),
        ),
    ],
)
def test_optimizer_updates_equal_keras_optimizers(opt, keras_opt):
    # Our hand-written optimizer against Keras' own on the same loss and weights: 5 steps.
    module = build_model(ModelConfig(name="mlp", **opt), (8, 8), 10, seed=3)
    twins = [tf.Variable(w.numpy()) for w in module.weights_]
    optimizer = keras_opt()
    for x, y in _batches((8, 8), 5, 16):
        module.train(x, y)
        with tf.GradientTape() as tape:
            h = tf.nn.relu(tf.reshape(x, [-1, 64]) @ twins[0] + twins[1])
            logits = h @ twins[2] + twins[3]
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
        optimizer.apply_gradients(zip(tape.gradient(loss, twins), twins, strict=True))
    for ours, theirs in zip(module.weights_, twins, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)


def test_restore_then_infer_matches_tf_logits(converted):
    module, tflite = converted("2nn", (28, 28), learning_rate=0.1)
    device = OnDeviceModel(tflite)
    rng = np.random.default_rng(7)
    new = {
        n: rng.normal(0, 0.1, w.shape).astype(np.float32) for n, w in _tf_weights(module).items()
    }
    for n, w in zip(module.weight_names, module.weights_, strict=True):
        w.assign(new[n])
    x = rng.random((50, 28, 28), dtype=np.float32)

    device.set_weights(new)
    lite_logits = device.interpreter.get_signature_runner(INFER)(x=x)["logits"]

    np.testing.assert_allclose(lite_logits, module.infer(x)["logits"].numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn", (28, 28)),
        ("simple_cnn", (28, 28)),
        ("cnn", (9, 11)),
        ("transfer", (15, 14)),
        ("simple_cnn", (32, 32, 3)),  # colour images: the channels are the first conv's input
        ("cnn", (32, 32, 3)),
    ],
)
def test_forward_equals_tf_convolution_pooling_and_dense_layers(name, shape):
    # The models convolve by matrix products over shifted windows; TF's own ops, written out
    # here, are the reference: conv -> ReLU -> 2x2 SAME max-pool blocks, then dense layers.
    module = build_model(ModelConfig(name=name), shape, 10, seed=2)
    ws = [w.numpy() for w in module.weights_]
    x = np.random.default_rng(4).random((6, *shape), dtype=np.float32)
    padding = "VALID" if name == "simple_cnn" else "SAME"
    convs = sum(1 for n in module.weight_names if n.startswith("conv")) // 2
    a = x if len(shape) == 3 else x[..., None]  # (batch, H, W, C)
    for i in range(convs):
        a = tf.nn.relu(tf.nn.conv2d(a, ws[2 * i], 1, padding) + ws[2 * i + 1])
        a = tf.nn.max_pool2d(a, 2, 2, "SAME")

    got = module.infer(x)["logits"].numpy()

    np.testing.assert_allclose(got, _mlp_logits(ws[2 * convs :], a.numpy()), atol=1e-5)


def test_mcmahan_cnn_has_the_papers_parameter_count():
    module = build_model(ModelConfig(name="cnn"), (28, 28), 10)
    # arXiv:1602.05629, Section 3: "1,663,370 total parameters".
    assert sum(int(np.prod(w.shape)) for w in module.weights_) == 1_663_370


def test_simple_cnn_rejects_images_too_small_for_its_valid_convolutions():
    with pytest.raises(ConfigError, match="larger images than"):
        build_model(ModelConfig(name="simple_cnn"), (8, 8), 10)


def _mlp_logits(ws: list[tf.Variable], x: np.ndarray) -> tf.Tensor:
    # The MLPs written out here, so the reference shares no code with model.py.
    h = tf.reshape(x, [len(x), -1])
    for i in range(0, len(ws) - 2, 2):
        h = tf.nn.relu(h @ ws[i] + ws[i + 1])
    return h @ ws[-2] + ws[-1]


@pytest.mark.parametrize(
    ("name", "opt"),
    [
        ("mlp", {"learning_rate": 0.1}),
        ("mlp", {"learning_rate": 0.05, "momentum": 0.9}),
        ("mlp", {"optimizer": "adam", "learning_rate": 0.01}),
        ("2nn", {"optimizer": "adam", "learning_rate": 0.01}),
    ],
)
def test_one_fedprox_step_in_the_interpreter_equals_a_tf_reference_step(converted, name, opt):
    # Prepare: the round's global weights are restored (the proximal anchor), then one plain
    # step moves the weights away from them, so the proximal term has a gradient to add.
    module, tflite = converted(name, (8, 8), **opt)
    device = OnDeviceModel(tflite)
    rng = np.random.default_rng(5)
    anchor = {
        n: rng.normal(0, 0.1, w.shape).astype(np.float32) for n, w in _tf_weights(module).items()
    }
    device.set_weights(anchor)
    (x1, y1), (x2, y2) = _batches((8, 8), 2, 16, seed=9)
    device.train_step(x1, y1)
    device.reset_optimizer()  # the FedProx step starts from zero optimizer state, as Keras' does
    start = device.get_weights()
    mu = 0.7
    # Execute: one FedProx step in the interpreter; the reference minimises
    # CE + mu/2 * sum ||w - w_global||^2 by tape with Keras' optimizer.
    lite_loss = device.train_step(x2, y2, proximal_mu=mu)
    names = module.weight_names
    twins = [tf.Variable(start[n]) for n in names]
    with tf.GradientTape() as tape:
        data_loss = _cross_entropy(_mlp_logits(twins, x2), y2)
        prox = sum(
            tf.reduce_sum(tf.square(w - anchor[n])) for w, n in zip(twins, names, strict=True)
        )
        objective = data_loss + mu / 2 * prox
    _keras_optimizer(opt).apply_gradients(zip(tape.gradient(objective, twins), twins, strict=True))
    # Assert: same data loss and weights within 1e-5, and the proximal term mattered.
    lite = device.get_weights()
    assert abs(lite_loss - float(data_loss)) <= 1e-5
    for n, w in zip(names, twins, strict=True):
        np.testing.assert_allclose(lite[n], w.numpy(), atol=1e-5, rtol=0, err_msg=n)
    plain = OnDeviceModel(tflite)
    plain.set_weights(start)
    plain.train_step(x2, y2)
    assert max(float(np.abs(plain.get_weights()[n] - lite[n]).max()) for n in names) > 1e-4


@pytest.mark.parametrize(
    ("name", "shape"), [("cnn", (28, 28)), ("simple_cnn", (28, 28)), ("transfer", (8, 8))]
)
def test_fedprox_step_adds_mu_times_the_distance_to_the_restored_weights(converted, name, shape):
    # The conv models' FedProx step against their own plain step (same forward pass, so the
    # same max-pool routing): with SGD, w_prox = w_plain - lr * mu * (w - w_global).
    lr, mu = 0.05, 0.7
    _, tflite = converted(name, shape, learning_rate=lr, trainable="all")
    (x1, y1), (x2, y2) = _batches(shape, 2, 16, seed=9)
    device = OnDeviceModel(tflite)
    anchor = device.get_weights()
    device.train_step(x1, y1)  # moves the weights away from the anchor restore set
    start = device.get_weights()
    plain = OnDeviceModel(tflite)
    plain.set_weights(start)
    plain.train_step(x2, y2)

    device.train_step(x2, y2, proximal_mu=mu)

    prox, want = device.get_weights(), plain.get_weights()
    for n in anchor:
        expected = want[n] - lr * mu * (start[n] - anchor[n])
        np.testing.assert_allclose(prox[n], expected, atol=1e-6, rtol=0, err_msg=n)
    assert max(float(np.abs(prox[n] - want[n]).max()) for n in anchor) > 1e-4


def test_fedprox_step_with_mu_zero_is_fedavgs_step_bitwise(converted):
    _, tflite = converted("mlp", (8, 8), learning_rate=0.05, momentum=0.9)
    (x1, y1), (x2, y2) = _batches((8, 8), 2, 16, seed=4)
    devices = [OnDeviceModel(tflite), OnDeviceModel(tflite)]
    for d in devices:
        d.train_step(x1, y1)  # weights differ from the anchor: the term is 0 * (w - w_global)

    devices[0].train_step(x2, y2)
    runner = devices[1].interpreter.get_signature_runner(TRAIN_PROXIMAL)
    runner(x=x2, y=y2.astype(np.int32), mu=np.float32(0.0))

    a, b = (d.get_weights() for d in devices)
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


def _keras_optimizer(opt: dict) -> keras.optimizers.Optimizer:
    if opt.get("optimizer") == "adam":
        return keras.optimizers.Adam(opt["learning_rate"], epsilon=1e-7)
    return keras.optimizers.SGD(opt["learning_rate"], opt.get("momentum", 0.0))


def _exact_convolutions(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with the conv layers' values moved to multiples of 1/8 in [-1/4, 1/4].

    With images on a 1/4 grid in [0, 1], every conv output is then exact in float32 whatever
    the summation order (products on a 2^-8 grid, sums < 2^11), so TF and the interpreter see
    the same max-pool inputs. Otherwise two values of a window that differ by ~1e-7 can be
    ordered differently by two conv implementations, which sends that window's gradient to
    another pixel (~1e-4 in the kernel gradients): the max-pool gradient is discontinuous
    there, in TF's own MaxPoolGrad as well.
    """
    return {
        n: np.clip(np.round(w * 8) / 8, -0.25, 0.25).astype(np.float32)
        if n.startswith("conv")
        else w
        for n, w in weights.items()
    }


@pytest.mark.parametrize(
    ("name", "shape", "opt"),
    [
        ("mlp", (28, 28), {"learning_rate": 0.1}),
        ("mlp", (28, 28), {"learning_rate": 0.05, "momentum": 0.9}),
        ("mlp", (28, 28), {"optimizer": "adam", "learning_rate": 1e-3}),
        ("2nn", (28, 28), {"learning_rate": 0.1}),
        ("2nn", (28, 28), {"learning_rate": 0.05, "momentum": 0.9}),
        ("2nn", (28, 28), {"optimizer": "adam", "learning_rate": 1e-3}),
        ("cnn", (28, 28), {"learning_rate": 0.05}),
        ("cnn", (28, 28), {"learning_rate": 0.05, "momentum": 0.9}),
        ("cnn", (28, 28), {"optimizer": "adam", "learning_rate": 1e-3}),
        ("simple_cnn", (28, 28), {"learning_rate": 0.05}),
        ("simple_cnn", (28, 28), {"learning_rate": 0.01, "momentum": 0.9}),
        ("simple_cnn", (28, 28), {"optimizer": "adam", "learning_rate": 1e-3}),
        # CIFAR-10's 32x32x3 with NIID-Bench's optimizer (SGD lr 0.01, momentum 0.9).
        ("simple_cnn", (32, 32, 3), {"learning_rate": 0.01, "momentum": 0.9}),
        # The whole transfer network (model.trainable=all); head-only: tests/test_transfer.py.
        ("transfer", (8, 8), {"learning_rate": 0.1, "trainable": "all"}),
        ("transfer", (8, 8), {"learning_rate": 0.05, "momentum": 0.9, "trainable": "all"}),
        ("transfer", (8, 8), {"optimizer": "adam", "learning_rate": 1e-3, "trainable": "all"}),
    ],
)
def test_each_interpreter_step_equals_a_tape_and_keras_optimizer(converted, name, shape, opt):
    # Prepare: the .tflite on LiteRT and, sharing only the initial weights and the forward
    # pass, a reference that differentiates by tape and steps with Keras' own optimizer.
    module, tflite = converted(name, shape, **opt)
    device = OnDeviceModel(tflite)
    names = module.weight_names
    twins = [tf.Variable(w.numpy()) for w in module.weights_]
    optimizer = _keras_optimizer(opt)
    rng = np.random.default_rng(2)
    # Execute: two full batches, then a partial last batch of 7 (a dynamic batch dimension).
    for batch in (16, 16, 7):
        x = np.round(rng.random((batch, *shape)) * 4).astype(np.float32) / 4
        y = rng.integers(0, 10, batch).astype(np.int32)
        start = _exact_convolutions({n: w.numpy() for n, w in zip(names, twins, strict=True)})
        device.set_weights(start)  # restore keeps the optimizer state of the steps before
        for n, w in zip(names, twins, strict=True):
            w.assign(start[n])
        lite_loss = device.train_step(x, y)
        with tf.GradientTape() as tape:
            loss = _cross_entropy(module.forward(twins, x), y)
        optimizer.apply_gradients(zip(tape.gradient(loss, twins), twins, strict=True))
        # Assert: the same loss and weights after every step (the bound: 1e-5).
        assert abs(lite_loss - float(loss)) <= 1e-5
        lite = device.get_weights()
        for n, w in zip(names, twins, strict=True):
            np.testing.assert_allclose(lite[n], w.numpy(), atol=1e-5, rtol=0, err_msg=n)
