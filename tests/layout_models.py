"""The two app layouts, written as their public examples build them (no project code).

- ``PersonalizationModel``: TensorFlow's model_personalization app (its converter's
  ``TransferLearningModel``): a frozen Keras base run by ``load`` and ``infer``, a softmax head
  in plain variables ``ws`` and ``bs`` trained by ``train(bottleneck, label)`` with Keras SGD,
  ``save`` / ``restore`` of the head by checkpoint path under the variables' names (``ws:0``),
  and ``initialize()``. The app's base is ImageNet's MobileNetV2; here (8x8 digits, no
  download) it is a fixed random ReLU projection, which a softmax head learns digits on.
- ``AndroidModel``: Flower's ``examples/android-kotlin``: a Keras model whose last layer is a
  softmax, ``train(x, y one-hot) -> {loss}``, ``infer(x) -> {logits}`` (the softmax output
  under that name), ``parameters() -> {a0..aN}`` and ``restore(a0..aN)``. The example's
  ``train`` calls Keras' ``train_step``; here the same step is written out with a tape.

Both are converted by :func:`guide_model.to_tflite`, the examples' converter flags
(``TFLITE_BUILTINS + SELECT_TF_OPS``, resource variables): their files need the Flex delegate.
``BuiltinPersonalizationModel`` and ``BuiltinAndroidModel`` are the same layouts as a user would
write them for LiteRT without Flex (gradients by hand, the personalization head's weights as
``save`` / ``restore`` tensors), converted with builtin ops only. As in ``guide_model``, the
Keras variables are tracked on the module (Keras 3 drops them otherwise).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from guide_model import dense_relu_dense_gradients, to_tflite

SHAPE = (8, 8)
CLASSES = 10
FEATURES = 64


class PersonalizationModel(tf.Module):
    """model_personalization's layout on 8x8 images."""

    def __init__(self, learning_rate: float = 0.1) -> None:
        keras.utils.set_random_seed(3)
        self.base = keras.Sequential(
            [
                keras.layers.Input(SHAPE),
                keras.layers.Flatten(),
                keras.layers.Dense(FEATURES, activation="relu", trainable=False),
            ]
        )
        self.base_vars = [v.value for v in self.base.weights]
        self.ws = tf.Variable(tf.zeros((FEATURES, CLASSES)), name="ws", trainable=True)
        self.bs = tf.Variable(tf.zeros((1, CLASSES)), name="bs", trainable=True)
        self.loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True)
        self.optimizer = keras.optimizers.SGD(learning_rate)
        self.optimizer.build([self.ws, self.bs])
        self.optimizer_vars = [v.value for v in self.optimizer.variables]

    @tf.function(input_signature=[tf.TensorSpec([None, *SHAPE], tf.float32)])
    def load(self, feature):
        return {"bottleneck": tf.reshape(self.base(feature, training=False), (-1, FEATURES))}

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, FEATURES], tf.float32),
            tf.TensorSpec([None, CLASSES], tf.float32),
        ]
    )
    def train(self, bottleneck, label):
        with tf.GradientTape() as tape:
            logits = tf.matmul(bottleneck, self.ws) + self.bs
            loss = self.loss_fn(label, logits)
        gradients = tape.gradient(loss, [self.ws, self.bs])
        self.optimizer.apply_gradients(zip(gradients, [self.ws, self.bs], strict=True))
        return {"loss": loss, "ws_gradient": gradients[0], "bs_gradient": gradients[1]}

    @tf.function(input_signature=[tf.TensorSpec([None, *SHAPE], tf.float32)])
    def infer(self, feature):
        bottleneck = tf.reshape(self.base(feature, training=False), (-1, FEATURES))
        logits = tf.matmul(bottleneck, self.ws) + self.bs
        return {"output": tf.nn.softmax(logits)}

    @tf.function(input_signature=[tf.TensorSpec(shape=[], dtype=tf.string)])
    def save(self, checkpoint_path):
        tf.raw_ops.Save(
            filename=checkpoint_path,
            tensor_names=[self.ws.name, self.bs.name],
            data=[self.ws.read_value(), self.bs.read_value()],
            name="save",
        )
        return {"checkpoint_path": checkpoint_path}

    @tf.function(input_signature=[tf.TensorSpec(shape=[], dtype=tf.string)])
    def restore(self, checkpoint_path):
        restored = {}
        for var in (self.ws, self.bs):
            t = tf.raw_ops.Restore(
                file_pattern=checkpoint_path, tensor_name=var.name, dt=np.float32
            )
            t.set_shape(var.shape)
            var.assign(t)
            restored[var.name.split(":")[0]] = t
        return restored

    @tf.function(input_signature=[])
    def initialize(self):
        # The app draws uniform [0, 1) weights; a seed (and a smaller range) keeps runs equal.
        self.ws.assign(tf.random.uniform((FEATURES, CLASSES), -0.05, 0.05, seed=1))
        self.bs.assign(tf.zeros((1, CLASSES)))
        return {"ws": self.ws.read_value(), "bs": self.bs.read_value()}


class BuiltinPersonalizationModel(PersonalizationModel):
    """model_personalization's layout without Flex ops: the head's gradient by hand (a tape
    adds BroadcastGradientArgs for ``bs``), its weights as ``save`` / ``restore`` tensors."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, FEATURES], tf.float32),
            tf.TensorSpec([None, CLASSES], tf.float32),
        ]
    )
    def train(self, bottleneck, label):
        log_p = tf.nn.log_softmax(tf.matmul(bottleneck, self.ws) + self.bs)
        loss = -tf.reduce_mean(tf.reduce_sum(label * log_p, axis=-1))
        d = (tf.exp(log_p) - label) / tf.cast(tf.shape(label)[0], tf.float32)
        gradients = [tf.matmul(bottleneck, d, transpose_a=True), tf.reduce_sum(d, 0, keepdims=True)]
        self.optimizer.apply_gradients(zip(gradients, [self.ws, self.bs], strict=True))
        return {"loss": loss, "ws_gradient": gradients[0], "bs_gradient": gradients[1]}

    @tf.function(input_signature=[])
    def save(self):
        return {"ws": self.ws.read_value(), "bs": self.bs.read_value()}

    @tf.function(
        input_signature=[
            tf.TensorSpec((FEATURES, CLASSES), tf.float32, name="ws"),
            tf.TensorSpec((1, CLASSES), tf.float32, name="bs"),
        ]
    )
    def restore(self, ws, bs):
        self.ws.assign(ws)
        self.bs.assign(bs)
        return {"restored": tf.constant(2)}  # not {}: the converter would drop the assignments


def personalization_tflite_bytes(flex: bool = True) -> bytes:
    """The app's layout as its converter builds it (``flex``), or without Flex ops."""
    m = PersonalizationModel() if flex else BuiltinPersonalizationModel()
    names = ("load", "train", "infer", "save", "restore", "initialize")
    return to_tflite(m, {k: getattr(m, k).get_concrete_function() for k in names}, flex=flex)


class AndroidModel(tf.Module):
    """Flower android-kotlin's layout on 8x8 images."""

    def __init__(self, learning_rate: float = 0.1, activation: str | None = "softmax") -> None:
        keras.utils.set_random_seed(4)
        self.model = keras.Sequential(
            [
                keras.layers.Input(SHAPE),
                keras.layers.Flatten(),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(CLASSES, activation=activation),
            ]
        )
        self.model.compile(
            optimizer=keras.optimizers.SGD(learning_rate),
            loss=keras.losses.CategoricalCrossentropy(from_logits=activation is None),
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self.vars = [v.value for v in self.model.weights]
        self.optimizer_vars = [v.value for v in self.model.optimizer.variables]

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, *SHAPE], tf.float32),
            tf.TensorSpec([None, CLASSES], tf.float32),
        ]
    )
    def train(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.model.loss(y, self.model(x, training=True))
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.model.optimizer.apply_gradients(
            zip(grads, self.model.trainable_variables, strict=True)
        )
        return {"loss": loss}

    @tf.function(input_signature=[tf.TensorSpec([None, *SHAPE], tf.float32)])
    def infer(self, x):
        return {"logits": self.model(x)}

    @tf.function(input_signature=[])
    def parameters(self):
        return {f"a{i}": v.read_value() for i, v in enumerate(self.vars)}

    @tf.function
    def restore(self, **parameters):
        for i, v in enumerate(self.vars):
            v.assign(parameters[f"a{i}"])
        return self.parameters()


class BuiltinAndroidModel(AndroidModel):
    """android-kotlin's layout without Flex ops: Keras' train_step written out, gradient by hand."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, *SHAPE], tf.float32),
            tf.TensorSpec([None, CLASSES], tf.float32),
        ]
    )
    def train(self, x, y):
        weights = self.model.trainable_variables
        loss, grads = dense_relu_dense_gradients([w.value for w in weights], x, y)
        self.model.optimizer.apply_gradients(zip(grads, weights, strict=True))
        return {"loss": loss}


def android_tflite_bytes(activation: str | None = "softmax", flex: bool = True) -> bytes:
    """``activation=None``: a variant whose ``logits`` are scores (no softmax at the end);
    ``flex=False``: the layout without Flex ops."""
    m = AndroidModel(activation=activation) if flex else BuiltinAndroidModel(activation=activation)
    restore = m.restore.get_concrete_function(
        **{f"a{i}": tf.TensorSpec(v.shape, v.dtype, name=f"a{i}") for i, v in enumerate(m.vars)}
    )
    sigs = {
        "train": m.train.get_concrete_function(),
        "infer": m.infer.get_concrete_function(),
        "parameters": m.parameters.get_concrete_function(),
        "restore": restore,
    }
    return to_tflite(m, sigs, flex=flex)
