"""The architectures ``model.name`` selects: their weights, forward pass and gradients.

An architecture maps ``(input_shape, num_classes)`` to ``(layers, forward, gradients)``:
``layers`` the weights' (name, shape) in forward order, ``forward(weights, x) -> logits``,
``gradients(weights, x, y, num_classes) -> (loss, grads)`` written by hand
(:mod:`fl_ondevice.ondevice.backprop`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf

from fl_ondevice.errors import ConfigError
from fl_ondevice.ondevice.backprop import (
    conv,
    conv_filter_grad,
    conv_input_grad,
    conv_windows,
    dense_backward,
    dense_forward,
    loss_and_logit_gradient,
    max_pool_grad,
    windows_of,
)

Layer = tuple[str, tuple[int, ...]]  # (weight name, shape)
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
    return dense_forward(ws, x)[0]


def _mlp_gradients(
    ws: Sequence[tf.Tensor], x: tf.Tensor, y: tf.Tensor, num_classes: int
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    logits, inputs = dense_forward(ws, x)
    loss, g = loss_and_logit_gradient(logits, y, num_classes)
    return loss, dense_backward(ws, inputs, g)[1]


def _mlp(hidden: Sequence[int]) -> Callable[[tuple[int, ...], int], Architecture]:
    def build(input_shape: tuple[int, ...], num_classes: int) -> Architecture:
        names = [f"hidden{i + 1}" for i in range(len(hidden))] + ["output"]
        sizes = [math.prod(input_shape), *hidden, num_classes]
        return _dense_stack(names, sizes), _mlp_forward, _mlp_gradients

    return build


def _nhwc(x: tf.Tensor) -> tf.Tensor:
    """Images as (batch, H, W, C): grey (batch, H, W) images get a channel axis of 1."""
    return tf.expand_dims(x, -1) if len(x.shape) == 3 else x


def _cnn(
    convs: Sequence[int], dense: Sequence[int], padding: str, kernel: int = 5
) -> Callable[[tuple[int, ...], int], Architecture]:
    """kxk conv + ReLU + 2x2 max-pool blocks, then dense ReLU layers, then the output layer.

    Longer than a screen: ``forward`` and ``gradients`` are closures over the layer shapes the
    builder computes, and the backward pass reads best beside its forward pass.
    """

    def build(input_shape: tuple[int, ...], num_classes: int) -> Architecture:
        # Grey images (H, W) are one channel; colour images (H, W, C) bring their own.
        h, w = input_shape[0], input_shape[1]
        channels = input_shape[2] if len(input_shape) == 3 else 1
        layers: list[Layer] = []
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
            a = _nhwc(x)  # (batch, H, W, C)
            for i in range(0, n_conv, 2):
                a = tf.nn.relu(tf.nn.max_pool2d(conv(a, ws[i], padding) + ws[i + 1], 2, 2, "SAME"))
            return _mlp_forward(ws[n_conv:], a)

        def gradients(
            ws: Sequence[tf.Tensor], x: tf.Tensor, y: tf.Tensor, num_classes: int
        ) -> tuple[tf.Tensor, list[tf.Tensor]]:
            # Forward with max-pool before ReLU: max_pool(relu(z)) == relu(max_pool(z)), and the
            # ReLU gradient then masks the 4x smaller pooled tensor.
            a = _nhwc(x)  # (batch, H, W, C)
            blocks = []  # (block input's windows, conv output before pooling, block output)
            for i in range(0, n_conv, 2):
                windows = windows_of(a, kernel, padding)  # kept: the kernel's gradient needs them
                z = conv_windows(windows, ws[i], a.shape[1:3], padding) + ws[i + 1]
                out = tf.nn.relu(tf.nn.max_pool2d(z, 2, 2, "SAME"))  # (batch, h/2, w/2, c)
                blocks.append((windows, z, out))
                a = out
            logits, inputs = dense_forward(ws[n_conv:], a)
            loss, g = loss_and_logit_gradient(logits, y, num_classes)
            g, dense_grads = dense_backward(ws[n_conv:], inputs, g)
            g = tf.reshape(g, tf.shape(a))  # (batch, h, w, c) of the last block's output
            conv_grads: list[tf.Tensor] = []
            for k in reversed(range(len(blocks))):
                windows, z, out = blocks[k]
                g = g * tf.sign(out)  # ReLU gradient: out > 0 exactly where relu's input is
                g = max_pool_grad(z, g)  # (batch, h, w, c)
                conv_grads[:0] = [
                    conv_filter_grad(windows, g, ws[2 * k].shape),
                    tf.reduce_sum(g, [0, 1, 2]),
                ]
                if k > 0:  # the gradient at the block's input; not needed for the image
                    g = conv_input_grad(g, ws[2 * k], blocks[k - 1][2], padding)
            return loss, [*conv_grads, *dense_grads]

        return layers, forward, gradients

    return build


ARCHITECTURES = {
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


def architecture_layers(name: str, input_shape: tuple[int, ...], num_classes: int) -> list[Layer]:
    """The weights (names, shapes), in forward order, of architecture ``name`` (``model.name``)
    for images of ``input_shape`` and ``num_classes`` classes."""
    layers, _, _ = ARCHITECTURES[name](input_shape, num_classes)
    return list(layers)
