"""Trainable tf.Module models exposing the on-device signatures train/infer/save/restore."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from fl_ondevice.config import ModelConfig
from fl_ondevice.errors import ConfigError, ModelError
from fl_ondevice.ondevice.layouts import GUIDE, PROXIMAL_SIGNATURE, RESET_SIGNATURE

# The guide layout's four signatures (weights as tensors), plus `train_proximal` (FedProx) and
# `reset` (see fl_ondevice.ondevice.layouts for what each is for).
SIGNATURES = (*GUIDE.required, PROXIMAL_SIGNATURE, RESET_SIGNATURE)
# What `restore` returns: a constant. A `restore` with no output at all is converted to nothing
# (the converter drops its assignments); returning the weights read back would copy them once
# more on every restore.
RESTORED = "restored"

Layer = tuple[str, tuple[int, ...]]  # (weight name, shape)


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
        layers, self._forward, self._gradients = _ARCHITECTURES[name](
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
        hand (the same values as ``tf.GradientTape`` of ``_forward``, tested): a tape's graph
        holds ops that TFLite runs only through the Flex delegate (``BroadcastGradientArgs``
        for a dynamic batch, ``ReluGrad``, ``Conv2DBackpropFilter``, ``MaxPoolGrad``).
        """
        ws = [w.read_value() for w in self.weights_] if values is None else list(values)
        return self._gradients(ws, x, y, self.num_classes)

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self._forward(self.weights_, x)
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


# -- architectures: (input_shape, num_classes) -> (weights, forward, gradients) -----------------
# forward(weights, x) -> logits; gradients(weights, x, y, num_classes) -> (loss, grads).
Forward = Callable[[Sequence[tf.Tensor], tf.Tensor], tf.Tensor]
Gradients = Callable[
    [Sequence[tf.Tensor], tf.Tensor, tf.Tensor, int], tuple[tf.Tensor, list[tf.Tensor]]
]
Architecture = tuple[list[Layer], Forward, Gradients]


def _dense_stack(names: Sequence[str], sizes: Sequence[int]) -> list[Layer]:
    layers: list[Layer] = []
    for name, fan_in, fan_out in zip(names, sizes[:-1], sizes[1:], strict=True):
        layers += [(f"{name}/kernel", (fan_in, fan_out)), (f"{name}/bias", (fan_out,))]
    return layers


def _mlp_forward(ws: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    return _dense_forward(ws, x)[0]


def _dense_forward(ws: Sequence[tf.Tensor], x: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """Logits of dense ReLU layers and the output layer (kernel, bias pairs in ``ws``) on ``x``
    flattened, and each layer's input (batch, fan_in), which the backward pass needs."""
    h = tf.reshape(x, [-1, ws[0].shape[0]])  # (batch, fan_in)
    inputs = []
    for i in range(0, len(ws) - 2, 2):
        inputs.append(h)
        h = tf.nn.relu(tf.matmul(h, ws[i]) + ws[i + 1])
    inputs.append(h)
    return tf.matmul(h, ws[-2]) + ws[-1], inputs


def _loss_and_logit_gradient(
    logits: tf.Tensor, y: tf.Tensor, num_classes: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean softmax cross-entropy and its gradient at the logits, (softmax - one_hot) / batch."""
    log_p = tf.nn.log_softmax(logits)
    one_hot = tf.one_hot(y, num_classes)
    loss = -tf.reduce_mean(tf.reduce_sum(one_hot * log_p, axis=-1))
    batch = tf.cast(tf.shape(logits)[0], tf.float32)
    return loss, (tf.exp(log_p) - one_hot) / batch


def _dense_backward(
    ws: Sequence[tf.Tensor], inputs: Sequence[tf.Tensor], g: tf.Tensor
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """Gradients of the dense stack given ``g`` at its logits: the gradient at its input
    (batch, fan_in) and the weights' gradients (kernel, bias per layer, in ``ws`` order).

    A hidden layer's input is a ReLU's output h, and ReLU's gradient is 1 exactly where h > 0,
    which is sign(h) (h >= 0). The stack's own input gets no mask: the caller knows what it is.
    """
    grads: list[tf.Tensor] = []
    for k in reversed(range(len(inputs))):
        h = inputs[k]
        grads[:0] = [tf.matmul(h, g, transpose_a=True), tf.reduce_sum(g, 0)]
        g = tf.matmul(g, ws[2 * k], transpose_b=True)  # (batch, fan_in of layer k)
        if k > 0:
            g = g * tf.sign(h)
    return g, grads


def _mlp_gradients(
    ws: Sequence[tf.Tensor], x: tf.Tensor, y: tf.Tensor, num_classes: int
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    logits, inputs = _dense_forward(ws, x)
    loss, g = _loss_and_logit_gradient(logits, y, num_classes)
    return loss, _dense_backward(ws, inputs, g)[1]


def _mlp(hidden: Sequence[int]) -> Callable[[tuple[int, int], int], Architecture]:
    def build(input_shape: tuple[int, int], num_classes: int) -> Architecture:
        names = [f"hidden{i + 1}" for i in range(len(hidden))] + ["output"]
        sizes = [math.prod(input_shape), *hidden, num_classes]
        return _dense_stack(names, sizes), _mlp_forward, _mlp_gradients

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
                a = tf.nn.relu(tf.nn.max_pool2d(_conv(a, ws[i], padding) + ws[i + 1], 2, 2, "SAME"))
            return _mlp_forward(ws[n_conv:], a)

        def gradients(
            ws: Sequence[tf.Tensor], x: tf.Tensor, y: tf.Tensor, num_classes: int
        ) -> tuple[tf.Tensor, list[tf.Tensor]]:
            # Forward with max-pool before ReLU: max_pool(relu(z)) == relu(max_pool(z)), and the
            # ReLU gradient then masks the 4x smaller pooled tensor.
            a = tf.expand_dims(x, -1)  # (batch, H, W, 1)
            blocks = []  # (block input's windows, conv output before pooling, block output)
            for i in range(0, n_conv, 2):
                windows = _windows(a, kernel, padding)  # kept: the kernel's gradient needs them
                z = _conv_windows(windows, ws[i], a.shape[1:3], padding) + ws[i + 1]
                out = tf.nn.relu(tf.nn.max_pool2d(z, 2, 2, "SAME"))  # (batch, h/2, w/2, c)
                blocks.append((windows, z, out))
                a = out
            logits, inputs = _dense_forward(ws[n_conv:], a)
            loss, g = _loss_and_logit_gradient(logits, y, num_classes)
            g, dense_grads = _dense_backward(ws[n_conv:], inputs, g)
            g = tf.reshape(g, tf.shape(a))  # (batch, h, w, c) of the last block's output
            conv_grads: list[tf.Tensor] = []
            for k in reversed(range(len(blocks))):
                windows, z, out = blocks[k]
                g = g * tf.sign(out)  # ReLU gradient: out > 0 exactly where relu's input is
                g = _max_pool_grad(z, g)  # (batch, h, w, c)
                conv_grads[:0] = [
                    _conv_filter_grad(windows, g, ws[2 * k].shape),
                    tf.reduce_sum(g, [0, 1, 2]),
                ]
                if k > 0:  # the gradient at the block's input; not needed for the image
                    g = _conv_input_grad(g, ws[2 * k], blocks[k - 1][2], padding)
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


# -- convolutions as matrix products -------------------------------------------------------------
# Stride 1, odd k x k kernels, SAME or VALID padding. The interpreter runs CONV_2D and
# TRANSPOSE_CONV whose filter is a variable (not a constant) with generic kernels, 2x slower than
# TF 2.18's interpreter ran them, and TF's own filter gradient (Conv2DBackpropFilter, or a
# convolution with the batch as input channels) is a Flex op with a dynamic batch. As matrix
# products over the input's k x k windows (im2col) they run as BATCH_MATMUL, which the
# interpreter's XNNPack delegate multiplies fast. Two layouts of the windows, as each product
# reads its operands fastest (measured in experiments/bench_device.md):
# - windows (k*k*c, batch*h*w), channel-major, from k*k strided slices: the training pass's
#   forward product and, reused, the kernel's gradient (windows @ g);
# - patches (batch*h*w, k*k*c), one row per output position, from one GATHER of c-channel rows:
#   inference (patches @ kernel) and the input's gradient.
MIN_GEMM_CHANNELS = 1024  # ci*co from which the input gradient's product beats TRANSPOSE_CONV


def _pad(a: tf.Tensor, kernel: int, padding: str) -> tf.Tensor:
    if padding == "VALID":
        return a
    half = (kernel - 1) // 2  # SAME, odd k, stride 1: (k - 1) / 2 zeros on each side
    return tf.pad(a, [[0, 0], [half, half], [half, half], [0, 0]])


def _windows(a: tf.Tensor, kernel: int, padding: str) -> tf.Tensor:
    """The k x k windows of ``a`` (batch, H, W, c) a convolution reads, channel-major:
    (k*k*c, batch*h*w), row ``(i*k + j)*c + ci`` holding channel ci shifted by (i, j)."""
    a = _pad(a, kernel, padding)
    _, hp, wp, c = a.shape
    h, w = hp - kernel + 1, wp - kernel + 1
    a_t = tf.transpose(a, [3, 0, 1, 2])  # (c, batch, h + k - 1, w + k - 1)
    rows = [
        tf.reshape(a_t[:, :, i : i + h, j : j + w], [c, -1])  # (c, batch*h*w)
        for i in range(kernel)
        for j in range(kernel)
    ]
    return tf.concat(rows, axis=0)


def _patches(a: tf.Tensor, kernel: int, padding: str) -> tf.Tensor:
    """The same windows one row per output position: (batch*h*w, k*k*c), columns in the
    kernel's (i, j, c) order; ``a`` has c > 1 channels (one GATHER of c-float rows)."""
    a = _pad(a, kernel, padding)
    _, hp, wp, c = a.shape
    h, w = hp - kernel + 1, wp - kernel + 1
    y, x, i, j = np.meshgrid(*(np.arange(n) for n in (h, w, kernel, kernel)), indexing="ij")
    rows = ((y + i) * wp + (x + j)).reshape(-1).astype(np.int32)  # (h*w*k*k,) of one image
    first = tf.range(tf.shape(a)[0]) * (hp * wp)  # each image's first row in the flat input
    index = tf.reshape(first[:, None] + tf.constant(rows)[None, :], [-1])
    return tf.reshape(tf.gather(tf.reshape(a, [-1, c]), index), [-1, kernel * kernel * c])


def _out_size(size: Sequence[int], kernel: int, padding: str) -> tuple[int, int]:
    shrink = 0 if padding == "SAME" else kernel - 1
    return int(size[0]) - shrink, int(size[1]) - shrink


def _conv(a: tf.Tensor, kernel: tf.Tensor, padding: str) -> tf.Tensor:
    """``conv2d(a, kernel, 1, padding)`` for inference: (batch, h, w, co)."""
    k, _, ci, co = kernel.shape
    if ci == 1:  # an image: its windows are cheap, and gathering single floats is not
        return _conv_windows(_windows(a, k, padding), kernel, a.shape[1:3], padding)
    h, w = _out_size(a.shape[1:3], k, padding)
    z = tf.matmul(_patches(a, k, padding), tf.reshape(kernel, [-1, co]))  # (batch*h*w, co)
    return tf.reshape(z, [-1, h, w, co])


def _conv_windows(
    windows: tf.Tensor, kernel: tf.Tensor, size: Sequence[int], padding: str
) -> tf.Tensor:
    """``conv2d(a, kernel, 1, padding)`` from ``a``'s windows (``_windows``); ``size`` is
    ``a``'s (H, W). Returns (batch, h, w, co)."""
    k, _, _, co = kernel.shape
    h, w = _out_size(size, k, padding)
    z = tf.matmul(windows, tf.reshape(kernel, [-1, co]), transpose_a=True)  # (batch*h*w, co)
    return tf.reshape(z, [-1, h, w, co])


def _conv_filter_grad(windows: tf.Tensor, g: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """Gradient of the convolution w.r.t. its kernel of ``shape`` (k, k, ci, co), given the
    input's windows and the output gradient ``g`` (batch, h, w, co):
    kernel[i, j, ci, co] = sum_{b,y,x} a_pad[b, y+i, x+j, ci] * g[b, y, x, co], the windows
    (k*k*ci, batch*h*w) times g as (batch*h*w, co)."""
    co = int(shape[-1])
    return tf.reshape(tf.matmul(windows, tf.reshape(g, [-1, co])), shape)


def _conv_input_grad(g: tf.Tensor, kernel: tf.Tensor, a: tf.Tensor, padding: str) -> tf.Tensor:
    """Gradient of the convolution w.r.t. its input ``a`` (batch, H, W, ci), given the output
    gradient ``g`` (batch, h, w, co): a convolution of ``g``, padded to a "full" one, with the
    kernel flipped in space and its channels swapped (TRANSPOSE_CONV for few channels)."""
    k, _, ci, co = kernel.shape
    if ci * co < MIN_GEMM_CHANNELS:
        return tf.nn.conv2d_transpose(g, kernel, tf.shape(a), 1, padding)
    pad = (k - 1) // 2 if padding == "SAME" else k - 1
    g = tf.pad(g, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    flipped = tf.reshape(tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2]), [-1, ci])
    d = tf.matmul(_patches(g, k, "VALID"), flipped)  # (batch*H*W, ci)
    return tf.reshape(d, tf.shape(a))


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
    # fl_ondevice.ondevice.transfer's whole network (trainable=all): its base (3x3 conv 16, pool,
    # 3x3 conv 32, pool, dense 64 = the bottleneck) and its head (dense classes).
    "transfer": _cnn([16, 32], [64], "SAME", kernel=3),
}


def architecture_layers(name: str, input_shape: tuple[int, int], num_classes: int) -> list[Layer]:
    """The weights (names, shapes), in forward order, of architecture ``name`` (``model.name``)
    for images of ``input_shape`` and ``num_classes`` classes."""
    layers, _, _ = _ARCHITECTURES[name](input_shape, num_classes)
    return list(layers)


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
