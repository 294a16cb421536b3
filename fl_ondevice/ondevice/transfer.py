"""model=transfer: a conv base pretrained centrally, and a head the clients federate on new classes.

The on-device personalization use case: a frozen pretrained base and a small head retrained on
the phone. The base (3x3 conv 16 + ReLU + 2x2 max-pool, 3x3 conv 32 + ReLU + 2x2 max-pool,
flatten, dense 64 + ReLU = the bottleneck; SAME padding, so 8x8 digits and 28x28 images both
fit) is pretrained centrally on ``model.base_classes`` of the run's dataset (its train split),
with a temporary head; the clients then train a new head (dense 64 -> classes) on
``dataset.classes``, which the base has never seen (the config keeps the two disjoint).

``model.trainable=head`` builds TensorFlow's model_personalization layout:

- ``load(feature) -> {bottleneck}``: the frozen base on images (batch, H, W);
- ``train(bottleneck, label) -> {loss, gradient/<weight>...}``: one SGD step of the head on
  one-hot float32 labels (batch, classes);
- ``infer(feature) -> {output}``: base + head, softmax probabilities;
- ``save() -> {output/kernel, output/bias}`` / ``restore(output/kernel, output/bias)``: the
  head's weights only, as tensors (the app's own file passes a checkpoint path to TF's Save and
  Restore ops, which only the Flex delegate runs);
- ``initialize() -> {weights}``: sets the head to its seeded starting weights.

The base is constants in the file (frozen: nothing can change it); plain SGD has no state, so
there is no ``reset``. ``model.trainable=all`` builds the whole network in the guide layout
(``fl_ondevice.ondevice.model``'s ``transfer`` architecture) starting from the same base and head,
to compare with full-model FL; ``model.pretrained=false`` starts from a random base instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from fl_ondevice import seeds
from fl_ondevice.config import DatasetConfig, ModelConfig
from fl_ondevice.data.dataset import Dataset
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.ondevice.architectures import Layer, architecture_layers
from fl_ondevice.ondevice.model import (
    TrainableModel,
    build_model,
    initial_weight,
    restore_variables,
    save_variables,
    weight_specs,
)

log = logging.getLogger(__name__)

# Bump when the base's graph or the pretraining changes, so stale cached bases are ignored.
BASE_CODE_VERSION = 1
HEAD = ("output/kernel", "output/bias")  # the names of architecture_layers("transfer")'s head
BOTTLENECK = 64  # units of the base's dense layer
PRETRAIN_BATCH = 32
PRETRAIN_MOMENTUM = 0.9

Weights = dict[str, np.ndarray]


def base_layers(input_shape: tuple[int, ...]) -> list[Layer]:
    """The base's weights (names, shapes) for images of ``input_shape``, in forward order."""
    layers = architecture_layers("transfer", input_shape, 2)
    return [(name, shape) for name, shape in layers if name not in HEAD]


def bottleneck(base: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """The base on images ``x`` (batch, H, W): (batch, 64), the same ops as the whole
    network's forward pass up to its head (``model``'s ``transfer`` architecture)."""
    a = tf.expand_dims(x, -1)  # (batch, H, W, 1)
    for i in (0, 2):
        a = tf.nn.relu(tf.nn.conv2d(a, base[i], 1, "SAME") + base[i + 1])
        a = tf.nn.max_pool2d(a, 2, 2, "SAME")
    a = tf.reshape(a, [-1, base[4].shape[0]])  # (batch, h/4 * w/4 * 32)
    return tf.nn.relu(tf.matmul(a, base[4]) + base[5])


def random_base(input_shape: tuple[int, ...], seed: int) -> Weights:
    """Glorot-uniform kernels and zero biases from ``seed``: the same values the whole
    network (``TrainableModel("transfer", ...)``) draws for its base layers."""
    rng = np.random.default_rng(seed)
    return {name: initial_weight(name, shape, rng) for name, shape in base_layers(input_shape)}


def head_init(num_classes: int, seed: int) -> Weights:
    """The head's starting weights: Glorot-uniform kernel (64, classes), zero bias.

    A random stream of its own (``(seed, seeds.TRANSFER_HEAD)``), so the head starts the same
    whether the base is pretrained or random, and in both layouts.
    """
    rng = np.random.default_rng((seed, seeds.TRANSFER_HEAD))
    return {
        HEAD[0]: initial_weight(HEAD[0], (BOTTLENECK, num_classes), rng),
        HEAD[1]: np.zeros(num_classes, np.float32),
    }


# -- pretraining ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainedBase:
    """A base's weights and how they were made.

    Attributes
    ----------
    weights : dict of str to np.ndarray
        The base's weights by name (``conv1/kernel`` ... ``fc1/bias``).
    report : dict
        ``dataset``, ``base_classes``, ``pretrained``, ``epochs``, ``accuracy`` (of the base
        with its temporary head on the base classes' test split; None for a random base).
    """

    weights: Weights
    report: dict[str, Any]


def pretrain(
    dataset: Dataset, epochs: int, learning_rate: float, seed: int
) -> tuple[Weights, float]:
    """Train the base plus a temporary head on ``dataset`` centrally, in TensorFlow.

    SGD with momentum 0.9, batches of 32, the examples shuffled each epoch by a numpy
    generator from ``seed``; the starting weights come from ``seed`` too, and no TF random op
    runs, so on one machine the result is the same bytes every time.

    Parameters
    ----------
    dataset : Dataset
        The base classes only (labels 0..k-1), e.g. ``load_dataset`` with ``classes``.
    epochs, learning_rate, seed
        Passes over the train split, SGD step size, seed of the weights and the shuffles.

    Returns
    -------
    (dict of str to np.ndarray, float)
        The base's weights, and the accuracy of base + temporary head on the test split.
    """
    start = {**random_base(dataset.input_shape, seed), **head_init(dataset.num_classes, seed)}
    names = [n for n, _ in base_layers(dataset.input_shape)] + list(HEAD)
    ws = [tf.Variable(start[n], name=n) for n in names]
    velocity = [tf.Variable(tf.zeros_like(w)) for w in ws]

    def logits(x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(bottleneck(ws[:6], x), ws[6]) + ws[7]

    h, w = dataset.input_shape

    @tf.function(
        input_signature=[tf.TensorSpec([None, h, w], tf.float32), tf.TensorSpec([None], tf.int64)]
    )
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits(x))
            )
        for var, v, g in zip(ws, velocity, tape.gradient(loss, ws), strict=True):
            v.assign(PRETRAIN_MOMENTUM * v - learning_rate * g)  # Keras SGD's momentum form
            var.assign_add(v)
        return loss

    rng = np.random.default_rng((seed, seeds.TRANSFER_PRETRAIN))
    n = len(dataset.y_train)
    for _ in range(epochs):
        order = rng.permutation(n)
        for begin in range(0, n, PRETRAIN_BATCH):
            batch = order[begin : begin + PRETRAIN_BATCH]
            step(dataset.x_train[batch], dataset.y_train[batch])
    predicted = np.argmax(logits(tf.constant(dataset.x_test)).numpy(), axis=1)
    accuracy = float(np.mean(predicted == dataset.y_test))
    return {n: w.numpy() for n, w in zip(names[:6], ws[:6], strict=True)}, accuracy


def base_key(model: ModelConfig, dataset: DatasetConfig, seed: int) -> str:
    """Hash of everything that determines the pretrained base's bytes: the data it learns from
    (dataset, its digits split, the base classes), the pretraining settings, seed and code."""
    spec = {
        "dataset": dataset.name,
        "test_fraction": dataset.test_fraction if dataset.name == "digits" else None,
        "base_classes": list(model.base_classes),
        "pretrained": model.pretrained,
        "epochs": model.pretrain_epochs,
        "learning_rate": model.pretrain_learning_rate,
        "seed": seed,
        "tensorflow": tf.__version__,
        "code": BASE_CODE_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(
    model: ModelConfig,
    dataset: DatasetConfig,
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PretrainedBase:
    """The base for ``model`` on ``dataset``: pretrained once, then read from ``cache_dir``.

    With ``model.pretrained=false`` a random base from ``seed`` (nothing is trained or cached).
    The cache holds ``transfer-base-<key>.npz`` (the weights) and ``.json`` (the report).
    """
    base_data = load_dataset(replace(dataset, classes=list(model.base_classes)), seed)
    if not model.pretrained:
        report = _report(model, dataset, None)
        return PretrainedBase(random_base(base_data.input_shape, seed), report)
    key = base_key(model, dataset, seed)
    cached = Path(cache_dir) / f"transfer-base-{key}" if cache_dir else None
    if cached is not None and cached.with_suffix(".npz").is_file():
        with np.load(cached.with_suffix(".npz"), allow_pickle=False) as npz:
            weights = {n: npz[n] for n in npz.files}
        report = json.loads(cached.with_suffix(".json").read_text())
        return PretrainedBase(weights, report)
    weights, accuracy = pretrain(
        base_data, model.pretrain_epochs, model.pretrain_learning_rate, seed
    )
    report = _report(model, dataset, accuracy)
    log.info(
        "pretrained the transfer base on %s classes %s: central accuracy %.4f on their test split",
        dataset.name,
        list(model.base_classes),
        accuracy,
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cached.with_suffix(".json"), json.dumps(report, indent=2).encode())
        tmp = cached.with_suffix(f".tmp-{os.getpid()}.npz")
        np.savez(tmp, **weights)  # type: ignore[arg-type]  # numpy stubs: names as kwargs
        os.replace(tmp, cached.with_suffix(".npz"))  # last: its presence means both are there
    return PretrainedBase(weights, report)


def _report(model: ModelConfig, dataset: DatasetConfig, accuracy: float | None) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "base_classes": list(model.base_classes),
        "pretrained": model.pretrained,
        "epochs": model.pretrain_epochs if model.pretrained else 0,
        "learning_rate": model.pretrain_learning_rate,
        "accuracy": accuracy,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the personalization layout ------------------------------------------------------------------
class TransferHead(tf.Module):
    """A frozen base (constants) and a trainable softmax head (plain ``tf.Variable``s) with
    TensorFlow's model_personalization signatures (see the module docstring).

    Parameters
    ----------
    input_shape
        Image shape ``(H, W)`` of one example.
    num_classes
        Classes of the head.
    base
        The base's weights by name (``base_layers``).
    start
        The head's seeded starting weights, which ``initialize`` assigns.
    learning_rate
        SGD step size of ``train``.
    head
        The head's initial values in the file (default ``start``); ``bake`` puts trained ones here.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        base: Mapping[str, np.ndarray],
        start: Mapping[str, np.ndarray],
        learning_rate: float,
        head: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(name="transfer_head")
        self.input_shape_ = (int(input_shape[0]), int(input_shape[1]))
        self.num_classes = int(num_classes)
        self.learning_rate = float(learning_rate)
        # Constants, not variables: the converter folds them into the graph, and no signature
        # can change them (frozen by construction).
        self.base = [tf.constant(base[n], name=n) for n, _ in base_layers(self.input_shape_)]
        self.start = {n: np.asarray(start[n], np.float32) for n in HEAD}
        values = self.start if head is None else head
        self.weight_names = list(HEAD)
        self.weights_ = [tf.Variable(np.asarray(values[n], np.float32), name=n) for n in HEAD]

        feature = tf.TensorSpec([None, *self.input_shape_], tf.float32, name="feature")
        self.load = tf.function(self._load, input_signature=[feature])
        self.train = tf.function(
            self._train,
            input_signature=[
                tf.TensorSpec([None, BOTTLENECK], tf.float32, name="bottleneck"),
                tf.TensorSpec([None, self.num_classes], tf.float32, name="label"),
            ],
        )
        self.infer = tf.function(self._infer, input_signature=[feature])
        self.save = tf.function(self._save, input_signature=[])
        head_layers = [(n, tuple(w.shape)) for n, w in zip(HEAD, self.weights_, strict=True)]
        self.restore = tf.function(self._restore, input_signature=[weight_specs(head_layers)])
        self.initialize = tf.function(self._initialize, input_signature=[])

    def _load(self, feature: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"bottleneck": bottleneck(self.base, feature)}

    def _train(self, bottleneck: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        kernel, bias = (w.read_value() for w in self.weights_)
        logits = tf.matmul(bottleneck, kernel) + bias  # (batch, classes)
        # Mean cross-entropy from builtin ops (LOG_SOFTMAX); label is one-hot float32.
        log_p = tf.nn.log_softmax(logits)
        loss = -tf.reduce_mean(tf.reduce_sum(label * log_p, axis=-1))
        # Its gradient by hand: d loss / d logits = (softmax - label) / batch. A tape would add
        # the Flex op BroadcastGradientArgs for the bias; these are builtin ops only.
        batch = tf.cast(tf.shape(label)[0], tf.float32)
        d_logits = (tf.exp(log_p) - label) / batch
        grads = [tf.matmul(bottleneck, d_logits, transpose_a=True), tf.reduce_sum(d_logits, 0)]
        for w, value, g in zip(self.weights_, (kernel, bias), grads, strict=True):
            w.assign(value - self.learning_rate * g)
        return {"loss": loss, **{f"gradient/{n}": g for n, g in zip(HEAD, grads, strict=True)}}

    def _infer(self, feature: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = tf.matmul(bottleneck(self.base, feature), self.weights_[0]) + self.weights_[1]
        return {"output": tf.nn.softmax(logits)}

    def _save(self) -> dict[str, tf.Tensor]:
        return save_variables(self.weight_names, self.weights_)

    def _restore(self, tensors: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        return restore_variables(tensors, self.weights_)

    def _initialize(self) -> dict[str, tf.Tensor]:
        # Constants computed in Python at build time: the same start on every phone.
        for name, w in zip(self.weight_names, self.weights_, strict=True):
            w.assign(tf.constant(self.start[name]))
        pairs = zip(self.weight_names, self.weights_, strict=True)
        return {name: w.read_value() for name, w in pairs}


def build_transfer(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    base: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray] | None = None,
) -> TransferHead | TrainableModel:
    """The model=transfer module for ``cfg.trainable``: ``TransferHead`` (head) or the whole
    network in the guide layout (all), starting from ``base`` and the seeded head, or from
    ``trained`` weights (head only, or all of them) when given."""
    start = head_init(num_classes, seed)
    if cfg.trainable == "head":
        return TransferHead(input_shape, num_classes, base, start, cfg.learning_rate, trained)
    module = build_model(cfg, input_shape, num_classes, seed, initial={**base, **start})
    if trained is not None:
        module.assign(dict(trained))
    return module


__all__ = [
    "BOTTLENECK",
    "HEAD",
    "PretrainedBase",
    "TransferHead",
    "base_key",
    "base_layers",
    "bottleneck",
    "build_transfer",
    "head_init",
    "pretrain",
    "pretrained_base",
    "random_base",
]
