"""Trainable tf.Module models exposing the on-device signatures train/infer/save/restore."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from fl_ondevice.config import ModelConfig
from fl_ondevice.errors import ConfigError, ModelError
from fl_ondevice.layouts import GUIDE

# The four signatures of TFLite on-device training, plus `reset`, which zeroes optimizer slots
# and the step counter. Why a signature and not slots in the checkpoint: the checkpoint is what
# crosses the wire (the server averages it), and FedAvg averages weights, not optimizer state;
# a client starts every round from fresh optimizer state, as a new local training session on a
# phone would. A pooled interpreter calls `reset` between clients so no momentum leaks.
SIGNATURES = GUIDE.required
RESET_SIGNATURE = "reset"
# FedProx (arXiv:1812.06127) on the device: `train_proximal(x, y, mu)` is `train` whose gradient
# also has mu * (w - w_global), the gradient of mu/2 * ||w - w_global||^2. w_global is what
# `restore` last loaded (the round's global model), kept in variables of its own. A separate
# signature, not a third input of `train`, so FedAvg's step costs nothing extra and `train(x, y)`
# keeps the layout of TensorFlow's on-device training guide.
PROXIMAL_SIGNATURE = "train_proximal"

Layer = tuple[str, tuple[int, ...]]  # (weight name, shape)


def save_variables(
    checkpoint_path: tf.Tensor, names: Sequence[str], variables: Sequence[tf.Variable]
) -> dict[str, tf.Tensor]:
    """A ``save`` signature's body: the variables, under ``names``, in a V1 TF checkpoint."""
    tf.raw_ops.Save(
        filename=checkpoint_path,
        tensor_names=list(names),
        data=[v.read_value() for v in variables],
        name="save",
    )
    return {"checkpoint_path": checkpoint_path}


def restore_variables(
    checkpoint_path: tf.Tensor, names: Sequence[str], variables: Sequence[tf.Variable]
) -> dict[str, tf.Tensor]:
    """A ``restore`` signature's body: assign each variable its tensor from the checkpoint and
    return them ``{name: tensor}``, in ``names`` order."""
    restored = {}
    for name, v in zip(names, variables, strict=True):
        t = tf.raw_ops.Restore(file_pattern=checkpoint_path, tensor_name=name, dt=v.dtype)
        t.set_shape(v.shape)  # Restore's output shape is unknown; assign needs it
        v.assign(t)
        restored[name] = t
    return restored


class TrainableModel(tf.Module):
    """A classifier whose weights and optimizer live in plain ``tf.Variable``s.

    Plain variables (not a Keras model) so the converter cannot drop them (Keras 3 pitfall in
    DESIGN.md) and so checkpoint keys are our own unique names, e.g. ``"conv1/kernel"``.

    Parameters
    ----------
    name
        One of ``mlp``, ``2nn``, ``cnn``, ``simple_cnn``, ``transfer`` (the whole transfer
        network, ``fl_ondevice.transfer``).
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
        input_shape: tuple[int, int],
        num_classes: int,
        optimizer: ModelConfig,
        seed: int = 0,
        initial: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(name=name.replace("2nn", "two_nn"))
        self.arch = name
        self.input_shape_ = (int(input_shape[0]), int(input_shape[1]))
        self.num_classes = int(num_classes)
        self.opt = optimizer
        layers, self._forward, gradients = _ARCHITECTURES[name](self.input_shape_, self.num_classes)
        # Hand-written backward pass (conv models) or None: differentiate `_forward` by tape.
        self._gradients = gradients
        rng = np.random.default_rng(seed)
        self.weight_names = [n for n, _ in layers]
        values = [_init(n, s, rng) for n, s in layers]
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
        path_spec = tf.TensorSpec([], tf.string, name="checkpoint_path")
        mu_spec = tf.TensorSpec([], tf.float32, name="mu")
        self.train = tf.function(self._train, input_signature=[x_spec, y_spec])
        self.train_proximal = tf.function(
            self._train_proximal, input_signature=[x_spec, y_spec, mu_spec]
        )
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.save = tf.function(self._save, input_signature=[path_spec])
        self.restore = tf.function(self._restore, input_signature=[path_spec])
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

        ``values`` are the weights' values (default: read them). The conv models compute the
        gradients by hand (same values as ``tf.GradientTape`` of ``_forward``, see ``_cnn``)
        because the converted tape graph is slow in the interpreter.
        """
        ws = [w.read_value() for w in self.weights_] if values is None else list(values)
        if self._gradients is not None:
            return self._gradients(ws, x, y, self.num_classes)
        with tf.GradientTape() as tape:
            tape.watch(ws)
            loss = _cross_entropy(self._forward(ws, x), y, self.num_classes)
        return loss, tape.gradient(loss, ws)

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self._forward(self.weights_, x)
        return {"output": tf.nn.softmax(logits), "logits": logits}

    def _save(self, checkpoint_path: tf.Tensor) -> dict[str, tf.Tensor]:
        return save_variables(checkpoint_path, self.weight_names, self.weights_)

    def _restore(self, checkpoint_path: tf.Tensor) -> dict[str, tf.Tensor]:
        restored = restore_variables(checkpoint_path, self.weight_names, self.weights_)
        for t, anchor in zip(restored.values(), self.global_weights, strict=True):
            anchor.assign(t)  # the proximal term's w_global: the weights a session starts from
        return restored

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


# -- architectures: (input_shape, num_classes) -> (weights, forward, gradients) -----------------
# forward(weights, x) -> logits; gradients(weights, x, y, num_classes) -> (loss, grads) or None.
Forward = Callable[[Sequence[tf.Tensor], tf.Tensor], tf.Tensor]
Gradients = Callable[
    [Sequence[tf.Tensor], tf.Tensor, tf.Tensor, int], tuple[tf.Tensor, list[tf.Tensor]]
]
Architecture = tuple[list[Layer], Forward, Gradients | None]


def _dense_stack(names: Sequence[str], sizes: Sequence[int]) -> list[Layer]:
    layers: list[Layer] = []
    for name, fan_in, fan_out in zip(names, sizes[:-1], sizes[1:], strict=True):
        layers += [(f"{name}/kernel", (fan_in, fan_out)), (f"{name}/bias", (fan_out,))]
    return layers


def _mlp_forward(ws: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    h = tf.reshape(x, [-1, ws[0].shape[0]])  # (batch, H*W)
    for i in range(0, len(ws) - 2, 2):
        h = tf.nn.relu(tf.matmul(h, ws[i]) + ws[i + 1])
    return tf.matmul(h, ws[-2]) + ws[-1]


def _mlp(hidden: Sequence[int]) -> Callable[[tuple[int, int], int], Architecture]:
    def build(input_shape: tuple[int, int], num_classes: int) -> Architecture:
        names = [f"hidden{i + 1}" for i in range(len(hidden))] + ["output"]
        sizes = [math.prod(input_shape), *hidden, num_classes]
        return _dense_stack(names, sizes), _mlp_forward, None

    return build


def _cnn(
    convs: Sequence[int], dense: Sequence[int], padding: str, kernel: int = 5
) -> Callable[[tuple[int, int], int], Architecture]:
    """kxk conv + ReLU + 2x2 max-pool blocks, then dense ReLU layers, then the output layer."""

    def build(input_shape: tuple[int, int], num_classes: int) -> Architecture:
        h, w = input_shape
        layers: list[Layer] = []
        channels = 1
        for i, c in enumerate(convs):
            layers += [
                (f"conv{i + 1}/kernel", (kernel, kernel, channels, c)),
                (f"conv{i + 1}/bias", (c,)),
            ]
            if padding == "VALID":
                h, w = h - kernel + 1, w - kernel + 1
            h, w = (h + 1) // 2, (w + 1) // 2  # 2x2 pool, SAME padding
            channels = c
            if h < 1 or w < 1:
                raise ConfigError(
                    f"model has {kernel}x{kernel} '{padding.lower()}' convolutions that need "
                    f"larger images than "
                    f"{input_shape}; use model=mlp, model=2nn or model=cnn for this dataset"
                )
        names = [f"fc{i + 1}" for i in range(len(dense))] + ["output"]
        layers += _dense_stack(names, [h * w * channels, *dense, num_classes])
        n_conv = 2 * len(convs)

        def forward(ws: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
            a = tf.expand_dims(x, -1)  # (batch, H, W, 1)
            for i in range(0, n_conv, 2):
                a = tf.nn.relu(tf.nn.conv2d(a, ws[i], 1, padding) + ws[i + 1])
                a = tf.nn.max_pool2d(a, 2, 2, "SAME")
            return _mlp_forward(ws[n_conv:], a)

        def gradients(
            ws: Sequence[tf.Tensor], x: tf.Tensor, y: tf.Tensor, num_classes: int
        ) -> tuple[tf.Tensor, list[tf.Tensor]]:
            # Forward with max-pool before ReLU: max_pool(relu(z)) == relu(max_pool(z)), and the
            # ReLU gradient then masks the 4x smaller pooled tensor.
            a = tf.expand_dims(x, -1)  # (batch, H, W, 1)
            blocks = []  # (block input, conv output before pooling, block output) per block
            for i in range(0, n_conv, 2):
                z = tf.nn.conv2d(a, ws[i], 1, padding) + ws[i + 1]  # (batch, h, w, c)
                out = tf.nn.relu(tf.nn.max_pool2d(z, 2, 2, "SAME"))  # (batch, h/2, w/2, c)
                blocks.append((a, z, out))
                a = out
            # The dense part is cheap in the interpreter as the tape converts it: keep the tape,
            # and take the gradient at the conv output too.
            with tf.GradientTape() as tape:
                tape.watch([a, *ws[n_conv:]])
                loss = _cross_entropy(_mlp_forward(ws[n_conv:], a), y, num_classes)
            g, *dense_grads = tape.gradient(loss, [a, *ws[n_conv:]])
            conv_grads: list[tf.Tensor] = []
            for k in reversed(range(len(blocks))):
                a_in, z, out = blocks[k]
                g = g * tf.sign(out)  # ReLU gradient: out > 0 exactly where relu's input is
                g = _max_pool_grad(z, g)  # (batch, h, w, c)
                conv_grads[:0] = [
                    _conv_filter_grad(a_in, g, padding, kernel),
                    tf.reduce_sum(g, [0, 1, 2]),
                ]
                if k > 0:  # input gradient (TRANSPOSE_CONV); not needed for the image
                    g = tf.nn.conv2d_transpose(g, ws[2 * k], tf.shape(a_in), 1, padding)
            return loss, [*conv_grads, *dense_grads]

        return layers, forward, gradients

    return build


def _ge(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """1.0 where a >= b, else 0.0; from SUB/RELU/SIGN, which the interpreter runs ~4x faster
    than GREATER_EQUAL + CAST (or SELECT). Exact for finite inputs: b - a > 0 iff b > a."""
    return 1.0 - tf.sign(tf.nn.relu(b - a))


def _max_pool_grad(z: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """Gradient of ``max_pool2d(z, 2, 2, "SAME")`` given ``g``, the gradient at its output.

    Equals TF's MaxPoolGrad bitwise, ties included: each window's gradient goes to exactly one
    position, the first maximum in row-major window order (a, b / c, d), as TF picks it.
    Builtin ops only: the Flex MaxPoolGrad runs TF's generic kernel, ~2.5x slower.
    """
    _, h, w, c = z.shape  # (batch, h, w, c); h, w known from the input shape
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    if h % 2 or w % 2:  # SAME pooling pads bottom/right; a padded value never wins
        z = tf.pad(z, [[0, 0], [0, h % 2], [0, w % 2], [0, 0]], constant_values=-np.inf)
    r = tf.reshape(z, [-1, 2, w2, 2, c])  # (batch*h2, window row, w2, window col, c), 5-D max
    left, right = r[:, :, :, 0:1], r[:, :, :, 1:2]  # (batch*h2, 2, w2, 1, c)
    row_max = tf.maximum(left, right)
    top = _ge(row_max[:, 0:1], row_max[:, 1:2])  # top row wins ties: (batch*h2, 1, w2, 1, c)
    g_rows = tf.reshape(g, [-1, 1, w2, 1, c]) * tf.concat([top, 1.0 - top], axis=1)
    g_left = g_rows * _ge(left, right)  # left column wins ties
    # g - g * 1 and g - g * 0 are exact, so each window's gradient lands whole in one place.
    grad = tf.reshape(tf.concat([g_left, g_rows - g_left], axis=3), [-1, 2 * h2, 2 * w2, c])
    return grad[:, :h, :w] if h % 2 or w % 2 else grad


def _conv_filter_grad(a: tf.Tensor, g: tf.Tensor, padding: str, kernel: int = 5) -> tf.Tensor:
    """Gradient of ``conv2d(a, kernel, 1, padding)`` w.r.t. its kxk kernel (k odd), given output
    grad g.

    The filter gradient is itself a convolution over the batch: kernel[i, j, ci, co] =
    sum_b,y,x a_pad[b, y+i, x+j, ci] * g[b, y, x, co], i.e. a VALID conv2d of a_pad as
    (ci, H+k-1, W+k-1, batch) with g as a (y, x, batch, co) filter. Its filter has the dynamic batch
    as input channels, so the converter keeps it a Flex Conv2D (TF's Eigen conv); in the
    interpreter that beats Flex Conv2DBackpropFilter for conv1 (B=32, single-op models: ~2.4 vs
    3.5 ms) and ties with it for the cnn's conv2 (~11.6 ms).
    """
    if padding == "SAME":  # odd k, stride 1: (k - 1) / 2 zeros on each side
        half = (kernel - 1) // 2
        a = tf.pad(a, [[0, 0], [half, half], [half, half], [0, 0]])
    k = tf.nn.conv2d(tf.transpose(a, [3, 1, 2, 0]), tf.transpose(g, [1, 2, 0, 3]), 1, "VALID")
    return tf.transpose(k, [1, 2, 0, 3])  # (ci, k, k, co) -> (k, k, ci, co)


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
    # fl_ondevice.transfer's whole network (trainable=all): its base (3x3 conv 16, pool,
    # 3x3 conv 32, pool, dense 64 = the bottleneck) and its head (dense classes).
    "transfer": _cnn([16, 32], [64], "SAME", kernel=3),
}


def build_model(
    cfg: ModelConfig,
    input_shape: tuple[int, int],
    num_classes: int,
    seed: int = 0,
    initial: Mapping[str, np.ndarray] | None = None,
) -> TrainableModel:
    """Build the trainable model named by ``cfg.name`` for images of ``input_shape``; weights
    named in ``initial`` start from those values instead of the seeded ones."""
    if cfg.name not in _ARCHITECTURES:
        raise ConfigError(
            f"model.name={cfg.name!r} cannot be built here; choose one of {sorted(_ARCHITECTURES)}"
        )
    return TrainableModel(cfg.name, input_shape, num_classes, cfg, seed, initial)
