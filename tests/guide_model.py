"""The TFLite on-device training guide's model, written as a user would (no project code).

``GuideModel`` is the guide's own: a Keras model trained by tape, ``save`` / ``restore`` by
checkpoint path through TF's Save/Restore ops, converted with ``SELECT_TF_OPS``: its file needs
the Flex delegate (TF 2.18.1's interpreter, the ``flex`` extra). ``BuiltinGuideModel`` is the same
network as a user would write it for LiteRT without Flex: the gradient written by hand, the
Keras optimizer's update (builtin ops), and the weights as ``save`` / ``restore`` tensors.
"""

from __future__ import annotations

import tempfile

import keras
import tensorflow as tf


def to_tflite(module: tf.Module, signatures: dict, flex: bool = True) -> bytes:
    """The guide's conversion recipe, written out here so no project code is involved;
    ``flex=False`` converts with TFLite builtin ops only (no ``SELECT_TF_OPS``)."""
    with tempfile.TemporaryDirectory() as saved:
        tf.saved_model.save(module, saved, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if flex:
            converter.target_spec.supported_ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
        converter.experimental_enable_resource_variables = True
        return converter.convert()


class GuideModel(tf.Module):
    """The TFLite on-device training guide's model: Keras layers, one-hot labels, Keras SGD.

    As the guide, except the weights and optimizer variables are tracked on the module and
    weights are named by ``v.path``: Keras 3's ``v.name`` is not unique and the converter drops
    untracked variables (DESIGN.md).
    """

    def __init__(self, with_save: bool = True) -> None:
        # Seeded, as the other layout models: unseeded, the initial weights (and how far 3 rounds
        # of FedAvg get from them) depended on what the process had drawn before.
        keras.utils.set_random_seed(2)
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


def dense_relu_dense_gradients(
    ws: list, x: tf.Tensor, y_one_hot: tf.Tensor, softmax_output: bool = False
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """Mean categorical cross-entropy of Flatten -> Dense(ReLU) -> Dense and its gradients by
    hand, builtin ops only (a tape brings the Flex ops BroadcastGradientArgs and ReluGrad).

    ``softmax_output``: the last layer ends in a softmax (Flower's Android example), whose
    loss Keras computes from the probabilities; the gradient at the scores is the same.
    """
    k1, b1, k2, b2 = ws
    h0 = tf.reshape(x, [-1, k1.shape[0]])
    h1 = tf.nn.relu(tf.matmul(h0, k1) + b1)
    scores = tf.matmul(h1, k2) + b2
    log_p = tf.nn.log_softmax(scores)
    loss = -tf.reduce_mean(tf.reduce_sum(y_one_hot * log_p, axis=-1))
    d = (tf.exp(log_p) - y_one_hot) / tf.cast(tf.shape(x)[0], tf.float32)
    dh = tf.matmul(d, k2, transpose_b=True) * tf.sign(h1)
    grads = [
        tf.matmul(h0, dh, transpose_a=True),
        tf.reduce_sum(dh, 0),
        tf.matmul(h1, d, transpose_a=True),
        tf.reduce_sum(d, 0),
    ]
    return loss, grads


class BuiltinGuideModel(GuideModel):
    """The guide's layout without Flex ops: hand-written gradient, weights as tensors."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 8, 8], tf.float32),
            tf.TensorSpec([None, 10], tf.float32),
        ]
    )
    def train(self, x, y):
        weights = self.model.trainable_variables
        loss, grads = dense_relu_dense_gradients([w.value for w in weights], x, y)
        self.model.optimizer.apply_gradients(zip(grads, weights, strict=True))
        return {"loss": loss}

    @tf.function(input_signature=[])
    def save(self):
        return {name: v.read_value() for name, v in zip(self.names, self.vars, strict=True)}

    def restore_signature(self):
        """``restore(weights...)``: one input per weight, named after it (as ``save``'s outputs)."""
        pairs = zip(self.names, self.vars, strict=True)
        specs = [tf.TensorSpec(v.shape, v.dtype, name=n) for n, v in pairs]
        return tf.function(self._restore, input_signature=[specs]).get_concrete_function()

    def _restore(self, weights):
        for tensor, v in zip(weights, self.vars, strict=True):
            v.assign(tensor)
        return {"restored": tf.constant(len(self.vars))}  # not {}: see guide_tflite_bytes


def guide_tflite_bytes(flex: bool = True) -> bytes:
    """The guide model with its four signatures: the guide's own (``flex``, its recipe), or the
    Flex-free variant converted with builtin ops only.

    The Flex-free ``restore`` returns a constant: a signature with no output at all is
    converted to nothing (its assignments are dropped).
    """
    m = GuideModel() if flex else BuiltinGuideModel()
    sigs = {k: getattr(m, k).get_concrete_function() for k in ("train", "infer", "save")}
    sigs["restore"] = m.restore.get_concrete_function() if flex else m.restore_signature()
    return to_tflite(m, sigs, flex=flex)
