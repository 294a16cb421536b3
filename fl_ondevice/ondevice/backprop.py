"""Forward passes and their hand-written gradients, from TFLite builtin ops only.

The building blocks of :mod:`fl_ondevice.ondevice.architectures`: dense ReLU stacks, softmax
cross-entropy, 2x2 max-pooling and convolutions as matrix products. A ``tf.GradientTape``'s graph
of the same forward pass holds ops TFLite runs only through the Flex delegate
(``BroadcastGradientArgs`` for a dynamic batch, ``ReluGrad``, ``Conv2DBackpropFilter``,
``MaxPoolGrad``); these give the same values (tested) with builtin ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf


def dense_forward(ws: Sequence[tf.Tensor], x: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """Logits of dense ReLU layers and the output layer (kernel, bias pairs in ``ws``) on ``x``
    flattened, and each layer's input (batch, fan_in), which the backward pass needs."""
    h = tf.reshape(x, [-1, ws[0].shape[0]])  # (batch, fan_in)
    inputs = []
    for i in range(0, len(ws) - 2, 2):
        inputs.append(h)
        h = tf.nn.relu(tf.matmul(h, ws[i]) + ws[i + 1])
    inputs.append(h)
    return tf.matmul(h, ws[-2]) + ws[-1], inputs


def loss_and_logit_gradient(
    logits: tf.Tensor, y: tf.Tensor, num_classes: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean softmax cross-entropy and its gradient at the logits, (softmax - one_hot) / batch."""
    log_p = tf.nn.log_softmax(logits)
    one_hot = tf.one_hot(y, num_classes)
    loss = -tf.reduce_mean(tf.reduce_sum(one_hot * log_p, axis=-1))
    batch = tf.cast(tf.shape(logits)[0], tf.float32)
    return loss, (tf.exp(log_p) - one_hot) / batch


def dense_backward(
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


def _ge(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """1.0 where a >= b, else 0.0; from SUB/RELU/SIGN, which the interpreter runs ~4x faster
    than GREATER_EQUAL + CAST (or SELECT). Exact for finite inputs: b - a > 0 iff b > a."""
    return 1.0 - tf.sign(tf.nn.relu(b - a))


def max_pool_grad(z: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
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


def windows_of(a: tf.Tensor, kernel: int, padding: str) -> tf.Tensor:
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


def conv(a: tf.Tensor, kernel: tf.Tensor, padding: str) -> tf.Tensor:
    """``conv2d(a, kernel, 1, padding)`` for inference: (batch, h, w, co)."""
    k, _, ci, co = kernel.shape
    if ci == 1:  # an image: its windows are cheap, and gathering single floats is not
        return conv_windows(windows_of(a, k, padding), kernel, a.shape[1:3], padding)
    h, w = _out_size(a.shape[1:3], k, padding)
    z = tf.matmul(_patches(a, k, padding), tf.reshape(kernel, [-1, co]))  # (batch*h*w, co)
    return tf.reshape(z, [-1, h, w, co])


def conv_windows(
    windows: tf.Tensor, kernel: tf.Tensor, size: Sequence[int], padding: str
) -> tf.Tensor:
    """``conv2d(a, kernel, 1, padding)`` from ``a``'s windows (``windows``); ``size`` is
    ``a``'s (H, W). Returns (batch, h, w, co)."""
    k, _, _, co = kernel.shape
    h, w = _out_size(size, k, padding)
    z = tf.matmul(windows, tf.reshape(kernel, [-1, co]), transpose_a=True)  # (batch*h*w, co)
    return tf.reshape(z, [-1, h, w, co])


def conv_filter_grad(windows: tf.Tensor, g: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """Gradient of the convolution w.r.t. its kernel of ``shape`` (k, k, ci, co), given the
    input's windows and the output gradient ``g`` (batch, h, w, co):
    kernel[i, j, ci, co] = sum_{b,y,x} a_pad[b, y+i, x+j, ci] * g[b, y, x, co], the windows
    (k*k*ci, batch*h*w) times g as (batch*h*w, co)."""
    co = int(shape[-1])
    return tf.reshape(tf.matmul(windows, tf.reshape(g, [-1, co])), shape)


def conv_input_grad(g: tf.Tensor, kernel: tf.Tensor, a: tf.Tensor, padding: str) -> tf.Tensor:
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
