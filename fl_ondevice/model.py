"""Trainable tf.Module models exposing the on-device signatures train/infer/save/restore."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from fl_ondevice.config import ModelConfig
from fl_ondevice.errors import ConfigError

# The four signatures of TFLite on-device training, plus `reset`, which zeroes optimizer slots
# and the step counter. Why a signature and not slots in the checkpoint: the checkpoint is what
# crosses the wire (the server averages it), and FedAvg averages weights, not optimizer state;
# a client starts every round from fresh optimizer state, as a new local training session on a
# phone would. A pooled interpreter calls `reset` between clients so no momentum leaks.
SIGNATURES = ("train", "infer", "save", "restore")
RESET_SIGNATURE = "reset"

Layer = tuple[str, tuple[int, ...]]  # (weight name, shape)


class TrainableModel(tf.Module):
    """A classifier whose weights and optimizer live in plain ``tf.Variable``s.

    Plain variables (not a Keras model) so the converter cannot drop them (Keras 3 pitfall in
    DESIGN.md) and so checkpoint keys are our own unique names, e.g. ``"conv1/kernel"``.

    Parameters
    ----------
    name
        One of ``mlp``, ``2nn``, ``cnn``, ``simple_cnn``.
    input_shape
        Image shape ``(H, W)`` of one example.
    num_classes
        Number of output classes.
    optimizer
        Optimizer settings (``sgd`` with momentum, or ``adam``), baked into the ``train`` graph.
    seed
        Seed of the Glorot-uniform initial kernels (biases start at zero).
    """

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, int],
        num_classes: int,
        optimizer: ModelConfig,
        seed: int = 0,
    ) -> None:
        super().__init__(name=name.replace("2nn", "two_nn"))
        self.arch = name
        self.input_shape_ = (int(input_shape[0]), int(input_shape[1]))
        self.num_classes = int(num_classes)
        self.opt = optimizer
        layers, self._forward = _ARCHITECTURES[name](self.input_shape_, self.num_classes)
        rng = np.random.default_rng(seed)
        self.weight_names = [n for n, _ in layers]
        self.weights_ = [tf.Variable(_init(n, s, rng), name=n) for n, s in layers]
        # Optimizer state: slots per weight and a step counter (Adam's bias correction).
        n_slots = 2 if optimizer.optimizer == "adam" else int(optimizer.momentum > 0)
        self.slots = [
            [tf.Variable(tf.zeros_like(w), name=f"slot{k}") for w in self.weights_]
            for k in range(n_slots)
        ]
        self.step = tf.Variable(0.0, name="step")

        x_spec = tf.TensorSpec([None, *self.input_shape_], tf.float32, name="x")
        y_spec = tf.TensorSpec([None], tf.int32, name="y")
        path_spec = tf.TensorSpec([], tf.string, name="checkpoint_path")
        self.train = tf.function(self._train, input_signature=[x_spec, y_spec])
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.save = tf.function(self._save, input_signature=[path_spec])
        self.restore = tf.function(self._restore, input_signature=[path_spec])
        self.reset = tf.function(self._reset, input_signature=[])

    # -- signatures ---------------------------------------------------------------------------
    def _train(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = _cross_entropy(self._forward(self.weights_, x), y, self.num_classes)
        grads = tape.gradient(loss, self.weights_)
        self._apply(grads)
        return {"loss": loss}

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self._forward(self.weights_, x)
        return {"output": tf.nn.softmax(logits), "logits": logits}

    def _save(self, checkpoint_path: tf.Tensor) -> dict[str, tf.Tensor]:
        tf.raw_ops.Save(
            filename=checkpoint_path,
            tensor_names=self.weight_names,
            data=[w.read_value() for w in self.weights_],
            name="save",
        )
        return {"checkpoint_path": checkpoint_path}

    def _restore(self, checkpoint_path: tf.Tensor) -> dict[str, tf.Tensor]:
        restored = {}
        for name, w in zip(self.weight_names, self.weights_, strict=True):
            t = tf.raw_ops.Restore(file_pattern=checkpoint_path, tensor_name=name, dt=w.dtype)
            t.set_shape(w.shape)  # Restore's output shape is unknown; assign needs it
            w.assign(t)
            restored[name] = t
        return restored

    def _reset(self) -> dict[str, tf.Tensor]:
        for slot in self.slots:
            for s in slot:
                s.assign(tf.zeros_like(s))
        self.step.assign(0.0)
        return {"step": self.step.read_value()}

    # -- optimizer ----------------------------------------------------------------------------
    def _apply(self, grads: Sequence[tf.Tensor]) -> None:
        o = self.opt
        lr = float(o.learning_rate)
        self.step.assign_add(1.0)
        if o.optimizer == "adam":
            # Keras 3 Adam, same update order and epsilon placement.
            b1, b2 = float(o.beta_1), float(o.beta_2)
            alpha = lr * tf.sqrt(1.0 - tf.pow(b2, self.step)) / (1.0 - tf.pow(b1, self.step))
            for w, g, m, v in zip(self.weights_, grads, *self.slots, strict=True):
                m.assign_add((g - m) * (1.0 - b1))
                v.assign_add((tf.square(g) - v) * (1.0 - b2))
                w.assign_sub(m * alpha / (tf.sqrt(v) + float(o.epsilon)))
        elif o.momentum > 0:
            # Keras SGD with momentum: v <- momentum * v - lr * g; w <- w + v.
            for w, g, v in zip(self.weights_, grads, self.slots[0], strict=True):
                v.assign(float(o.momentum) * v - lr * g)
                w.assign_add(v)
        else:
            for w, g in zip(self.weights_, grads, strict=True):
                w.assign_sub(lr * g)


def _cross_entropy(logits: tf.Tensor, y: tf.Tensor, num_classes: int) -> tf.Tensor:
    # Mean softmax cross-entropy from builtin ops (LOG_SOFTMAX, ONE_HOT); the fused
    # SparseSoftmaxCrossEntropyWithLogits op would be a Flex op.
    log_p = tf.nn.log_softmax(logits)
    return -tf.reduce_mean(tf.reduce_sum(tf.one_hot(y, num_classes) * log_p, axis=-1))


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name.endswith("/bias"):
        return np.zeros(shape, np.float32)
    receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    limit = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform, Keras' default
    return rng.uniform(-limit, limit, shape).astype(np.float32)


# -- architectures: (input_shape, num_classes) -> (weights, forward(weights, x) -> logits) ------
Forward = Callable[[Sequence[tf.Variable], tf.Tensor], tf.Tensor]


def _dense_stack(names: Sequence[str], sizes: Sequence[int]) -> list[Layer]:
    layers: list[Layer] = []
    for name, fan_in, fan_out in zip(names, sizes[:-1], sizes[1:], strict=True):
        layers += [(f"{name}/kernel", (fan_in, fan_out)), (f"{name}/bias", (fan_out,))]
    return layers


def _mlp_forward(ws: Sequence[tf.Variable], x: tf.Tensor) -> tf.Tensor:
    h = tf.reshape(x, [-1, ws[0].shape[0]])  # (batch, H*W)
    for i in range(0, len(ws) - 2, 2):
        h = tf.nn.relu(tf.matmul(h, ws[i]) + ws[i + 1])
    return tf.matmul(h, ws[-2]) + ws[-1]


def _mlp(hidden: Sequence[int]) -> Callable[[tuple[int, int], int], tuple[list[Layer], Forward]]:
    def build(input_shape: tuple[int, int], num_classes: int) -> tuple[list[Layer], Forward]:
        names = [f"hidden{i + 1}" for i in range(len(hidden))] + ["output"]
        sizes = [math.prod(input_shape), *hidden, num_classes]
        return _dense_stack(names, sizes), _mlp_forward

    return build


def _cnn(
    convs: Sequence[int], dense: Sequence[int], padding: str
) -> Callable[[tuple[int, int], int], tuple[list[Layer], Forward]]:
    """5x5 conv + ReLU + 2x2 max-pool blocks, then dense ReLU layers, then the output layer."""

    def build(input_shape: tuple[int, int], num_classes: int) -> tuple[list[Layer], Forward]:
        h, w = input_shape
        layers: list[Layer] = []
        channels = 1
        for i, c in enumerate(convs):
            layers += [(f"conv{i + 1}/kernel", (5, 5, channels, c)), (f"conv{i + 1}/bias", (c,))]
            if padding == "VALID":
                h, w = h - 4, w - 4
            h, w = (h + 1) // 2, (w + 1) // 2  # 2x2 pool, SAME padding
            channels = c
            if h < 1 or w < 1:
                raise ConfigError(
                    f"model has 5x5 '{padding.lower()}' convolutions that need larger images than "
                    f"{input_shape}; use model=mlp, model=2nn or model=cnn for this dataset"
                )
        names = [f"fc{i + 1}" for i in range(len(dense))] + ["output"]
        layers += _dense_stack(names, [h * w * channels, *dense, num_classes])
        n_conv = 2 * len(convs)

        def forward(ws: Sequence[tf.Variable], x: tf.Tensor) -> tf.Tensor:
            a = tf.expand_dims(x, -1)  # (batch, H, W, 1)
            for i in range(0, n_conv, 2):
                a = tf.nn.relu(tf.nn.conv2d(a, ws[i], 1, padding) + ws[i + 1])
                a = tf.nn.max_pool2d(a, 2, 2, "SAME")
            return _mlp_forward(ws[n_conv:], a)

        return layers, forward

    return build


_ARCHITECTURES = {
    # TFLite on-device training guide: Flatten -> Dense(128, ReLU) -> Dense(classes).
    "mlp": _mlp([128]),
    # arXiv:1602.05629, "2NN": two hidden layers of 200 ReLU units.
    "2nn": _mlp([200, 200]),
    # arXiv:1602.05629, "CNN": 5x5 conv 32, pool, 5x5 conv 64, pool, dense 512, softmax
    # (1,663,370 parameters on 28x28 inputs).
    "cnn": _cnn([32, 64], [512], "SAME"),
    # NIID-Bench (Li et al., ICDE 2022): conv 6, pool, conv 16, pool, 120, 84, classes.
    "simple_cnn": _cnn([6, 16], [120, 84], "VALID"),
}


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, int], num_classes: int, seed: int = 0
) -> TrainableModel:
    """Build the trainable model named by ``cfg.name`` for images of ``input_shape``."""
    if cfg.name not in _ARCHITECTURES:
        raise ConfigError(
            f"model.name={cfg.name!r} cannot be built here; choose one of {sorted(_ARCHITECTURES)}"
        )
    return TrainableModel(cfg.name, input_shape, num_classes, cfg, seed)
