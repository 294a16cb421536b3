"""The TFLite on-device training guide's model, written as a user would (no project code)."""

from __future__ import annotations

import tempfile

import keras
import tensorflow as tf


def to_tflite(module: tf.Module, signatures: dict) -> bytes:
    """The guide's conversion recipe, written out here so no project code is involved."""
    with tempfile.TemporaryDirectory() as saved:
        tf.saved_model.save(module, saved, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS,
            tf.lite.OpsSet.SELECT_TF_OPS,
        ]
        converter.experimental_enable_resource_variables = True
        return converter.convert()


class GuideModel(tf.Module):
    """The TFLite on-device training guide's model: Keras layers, one-hot labels, Keras SGD.

    As the guide, except the weights and optimizer variables are tracked on the module and
    weights are named by ``v.path``: Keras 3's ``v.name`` is not unique and the converter drops
    untracked variables (DESIGN.md).
    """

    def __init__(self, with_save: bool = True) -> None:
        self.model = keras.Sequential(
            [
                keras.layers.Input((8, 8)),
                keras.layers.Flatten(),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        self.model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self.vars = [v.value for v in self.model.weights]
        self.names = [v.path for v in self.model.weights]
        self.optimizer_vars = [v.value for v in self.model.optimizer.variables]

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 8, 8], tf.float32),
            tf.TensorSpec([None, 10], tf.float32),
        ]
    )
    def train(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.model.loss(y, self.model(x))
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.model.optimizer.apply_gradients(
            zip(grads, self.model.trainable_variables, strict=True)
        )
        return {"loss": loss}

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8], tf.float32)])
    def infer(self, x):
        logits = self.model(x)
        return {"output": tf.nn.softmax(logits, axis=-1), "logits": logits}

    @tf.function(input_signature=[tf.TensorSpec(shape=[], dtype=tf.string)])
    def save(self, checkpoint_path):
        tf.raw_ops.Save(
            filename=checkpoint_path,
            tensor_names=self.names,
            data=[v.read_value() for v in self.vars],
            name="save",
        )
        return {"checkpoint_path": checkpoint_path}

    @tf.function(input_signature=[tf.TensorSpec(shape=[], dtype=tf.string)])
    def restore(self, checkpoint_path):
        restored = {}
        for name, var in zip(self.names, self.vars, strict=True):
            t = tf.raw_ops.Restore(file_pattern=checkpoint_path, tensor_name=name, dt=var.dtype)
            t.set_shape(var.shape)
            var.assign(t)
            restored[name] = t
        return restored


def guide_tflite_bytes() -> bytes:
    """The guide model with its four signatures, converted by the guide's recipe."""
    m = GuideModel()
    sigs = {k: getattr(m, k).get_concrete_function() for k in ("train", "infer", "save", "restore")}
    return to_tflite(m, sigs)
