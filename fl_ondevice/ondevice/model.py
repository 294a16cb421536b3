"""Trainable tf.Module models exposing the on-device signatures train/infer/save/restore."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from fl_ondevice.config import ModelConfig
from fl_ondevice.errors import ConfigError, ModelError
from fl_ondevice.ondevice.architectures import ARCHITECTURES, Layer

# What `restore` returns: a constant. A `restore` with no output at all is converted to nothing
# (the converter drops its assignments); returning the weights read back would copy them once
# more on every restore.
RESTORED = "restored"


def save_variables(names: Sequence[str], variables: Sequence[tf.Variable]) -> dict[str, tf.Tensor]:
    """A ``save`` signature's body: the variables' values, ``{name: tensor}``."""
    return {n: v.read_value() for n, v in zip(names, variables, strict=True)}


def restore_variables(
    tensors: Sequence[tf.Tensor], variables: Sequence[tf.Variable]
) -> dict[str, tf.Tensor]:
    """A ``restore`` signature's body: assign each variable its tensor (same order)."""
    for t, v in zip(tensors, variables, strict=True):
        v.assign(t)
    return {RESTORED: tf.constant(len(variables))}


def weight_specs(layers: Sequence[Layer]) -> list[tf.TensorSpec]:
    """``restore``'s inputs: one float32 tensor per weight, named after it (``conv1/kernel``)."""
    return [tf.TensorSpec(shape, tf.float32, name=name) for name, shape in layers]


class TrainableModel(tf.Module):
    """A classifier whose weights and optimizer live in plain ``tf.Variable``s.

    Plain variables (not a Keras model) so the converter cannot drop them (Keras 3 pitfall in
    DESIGN.md) and so the weights' names are our own and unique, e.g. ``"conv1/kernel"``: the
    names of ``save``'s outputs, ``restore``'s inputs and the server's checkpoint tensors.
    Every signature is made of TFLite builtin ops (gradients written by hand), so the file runs
    in any LiteRT runtime, without the Flex delegate.

    Parameters
    ----------
    name
        One of ``mlp``, ``2nn``, ``cnn``, ``simple_cnn``, ``transfer`` (the whole transfer
        network, ``fl_ondevice.ondevice.transfer``).
    input_shape
        Image shape ``(H, W)`` of one example.
    num_classes
        Number of output classes.
    optimizer
        Optimizer settings (``sgd`` with momentum, or ``adam``), baked into the ``train`` graph.
    seed
        Seed of the Glorot-uniform initial kernels (biases start at zero).
    initial
        Initial values by weight name that replace the seeded ones (a pretrained base).
    """

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        optimizer: ModelConfig,
        seed: int = 0,
        initial: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(name=name.replace("2nn", "two_nn"))
        self.arch = name
        self.input_shape_ = tuple(int(d) for d in input_shape)  # (H, W) or (H, W, C)
        self.num_classes = int(num_classes)
        self.opt = optimizer
        layers, self.forward, self._gradients = ARCHITECTURES[name](
            self.input_shape_, self.num_classes
        )
        rng = np.random.default_rng(seed)
        self.weight_names = [n for n, _ in layers]
        values = [initial_weight(n, s, rng) for n, s in layers]
        for i, (n, s) in enumerate(layers):
            if initial is not None and n in initial:
                if tuple(initial[n].shape) != s:
                    raise ModelError(
                        f"initial value of {n!r} has shape {initial[n].shape}, the model {s}"
                    )
                values[i] = np.asarray(initial[n], np.float32)
        self.weights_ = [tf.Variable(v, name=n) for (n, _), v in zip(layers, values, strict=True)]
        # The anchor of the proximal term. Same initial values as the weights: the converter
        # stores identical constants once, so the file grows by the extra signature only.
        self.global_weights = [
            tf.Variable(v, name=f"global/{n}") for (n, _), v in zip(layers, values, strict=True)
        ]
        # Optimizer state: slots per weight and a step counter (Adam's bias correction).
        n_slots = 2 if optimizer.optimizer == "adam" else int(optimizer.momentum > 0)
        self.slots = [
            [tf.Variable(tf.zeros_like(w), name=f"slot{k}") for w in self.weights_]
            for k in range(n_slots)
        ]
        self.step = tf.Variable(0.0, name="step")

        x_spec = tf.TensorSpec([None, *self.input_shape_], tf.float32, name="x")
        y_spec = tf.TensorSpec([None], tf.int32, name="y")
        mu_spec = tf.TensorSpec([], tf.float32, name="mu")
        self.train = tf.function(self._train, input_signature=[x_spec, y_spec])
        self.train_proximal = tf.function(
            self._train_proximal, input_signature=[x_spec, y_spec, mu_spec]
        )
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.save = tf.function(self._save, input_signature=[])
        self.restore = tf.function(self._restore, input_signature=[weight_specs(layers)])
        self.reset = tf.function(self._reset, input_signature=[])

    # -- signatures ---------------------------------------------------------------------------
    def _train(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        # Read each weight once, for the step and its update: assign_sub would read it again,
        # a second copy of the 6.4 MB cnn dense kernel in the interpreter.
        values = [w.read_value() for w in self.weights_]
        loss, grads = self.loss_and_gradients(x, y, values)
        self._apply(values, grads)
        return {"loss": loss}

    def _train_proximal(self, x: tf.Tensor, y: tf.Tensor, mu: tf.Tensor) -> dict[str, tf.Tensor]:
        # loss is the data loss alone (comparable with train's); the step also descends on
        # mu/2 * ||w - w_global||^2, whose gradient is mu * (w - w_global).
        values = [w.read_value() for w in self.weights_]
        loss, grads = self.loss_and_gradients(x, y, values)
        grads = [
            g + mu * (v - anchor.read_value())
            for g, v, anchor in zip(grads, values, self.global_weights, strict=True)
        ]
        self._apply(values, grads)
        return {"loss": loss}

    def loss_and_gradients(
        self, x: tf.Tensor, y: tf.Tensor, values: Sequence[tf.Tensor] | None = None
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Mean cross-entropy of a batch and its gradients, one per weight in ``weights_`` order.

        ``values`` are the weights' values (default: read them). The gradients are written by
        hand (the same values as ``tf.GradientTape`` of ``forward``, tested): a tape's graph
        holds ops that TFLite runs only through the Flex delegate (``BroadcastGradientArgs``
        for a dynamic batch, ``ReluGrad``, ``Conv2DBackpropFilter``, ``MaxPoolGrad``).
        """
        ws = [w.read_value() for w in self.weights_] if values is None else list(values)
        return self._gradients(ws, x, y, self.num_classes)

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self.forward(self.weights_, x)
        return {"output": tf.nn.softmax(logits), "logits": logits}

    def _save(self) -> dict[str, tf.Tensor]:
        return save_variables(self.weight_names, self.weights_)

    def _restore(self, tensors: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        # The proximal term's w_global is what a session starts from: the restored weights.
        restore_variables(tensors, self.global_weights)
        return restore_variables(tensors, self.weights_)

    def assign(self, weights: dict[str, np.ndarray]) -> None:
        """Set the weights (and the proximal anchor, as ``restore`` does) from ``{name: array}``."""
        for name, w, anchor in zip(
            self.weight_names, self.weights_, self.global_weights, strict=True
        ):
            w.assign(weights[name])
            anchor.assign(weights[name])

    def _reset(self) -> dict[str, tf.Tensor]:
        for slot in self.slots:
            for s in slot:
                s.assign(tf.zeros_like(s))
        self.step.assign(0.0)
        return {"step": self.step.read_value()}

    # -- optimizer ----------------------------------------------------------------------------
    def _apply(self, values: Sequence[tf.Tensor], grads: Sequence[tf.Tensor]) -> None:
        # `values` are the weights as read for this step (nothing assigned them since), so
        # w.assign(value - u) is w.assign_sub(u) without a second read.
        o = self.opt
        lr = float(o.learning_rate)
        self.step.assign_add(1.0)
        if o.optimizer == "adam":
            # Keras 3 Adam, same update order and epsilon placement.
            b1, b2 = float(o.beta_1), float(o.beta_2)
            alpha = lr * tf.sqrt(1.0 - tf.pow(b2, self.step)) / (1.0 - tf.pow(b1, self.step))
            for w, w0, g, m, v in zip(self.weights_, values, grads, *self.slots, strict=True):
                m_new = m + (g - m) * (1.0 - b1)
                v_new = v + (tf.square(g) - v) * (1.0 - b2)
                m.assign(m_new)
                v.assign(v_new)
                w.assign(w0 - m_new * alpha / (tf.sqrt(v_new) + float(o.epsilon)))
        elif o.momentum > 0:
            # Keras SGD with momentum: v <- momentum * v - lr * g; w <- w + v.
            for w, w0, g, v in zip(self.weights_, values, grads, self.slots[0], strict=True):
                v_new = float(o.momentum) * v - lr * g
                v.assign(v_new)
                w.assign(w0 + v_new)
        else:
            for w, w0, g in zip(self.weights_, values, grads, strict=True):
                w.assign(w0 - lr * g)


def initial_weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A weight's seeded starting value: zeros for a ``*/bias``, else Glorot uniform (Keras'
    default) drawn from ``rng``."""
    if name.endswith("/bias"):
        return np.zeros(shape, np.float32)
    receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    limit = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform, Keras' default
    return rng.uniform(-limit, limit, shape).astype(np.float32)


def build_model(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    initial: Mapping[str, np.ndarray] | None = None,
) -> TrainableModel:
    """Build the trainable model named by ``cfg.name`` for images of ``input_shape``; weights
    named in ``initial`` start from those values instead of the seeded ones."""
    if cfg.name not in ARCHITECTURES:
        raise ConfigError(
            f"model.name={cfg.name!r} cannot be built here; choose one of {sorted(ARCHITECTURES)}"
        )
    return TrainableModel(cfg.name, input_shape, num_classes, cfg, seed, initial)
