"""SavedModel -> .tflite conversion, verified and cached; baking trained weights into a file.

TensorFlow (~660 MiB resident), and ``fl_ondevice.ondevice.model`` and ``.transfer``, which build
on it, are imported by the functions that build, convert or bake a model, not with this
module: a run whose converted model is in the cache never loads TensorFlow before its end.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fl_ondevice.config import DatasetConfig, ModelConfig
from fl_ondevice.errors import ModelError
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.interpreters import LITERT, flex_ops
from fl_ondevice.ondevice.layouts import (
    GUIDE,
    OWN_GUIDE_SIGNATURES,
    OWN_PERSONALIZATION_SIGNATURES,
    PERSONALIZATION,
)

if TYPE_CHECKING:
    import tensorflow as tf

    from fl_ondevice.ondevice.model import TrainableModel
    from fl_ondevice.ondevice.transfer import TransferHead

log = logging.getLogger(__name__)

# Bump when model.py changes the graph or the initial weights, so stale cache entries are ignored.
MODEL_CODE_VERSION = 4

# ModelConfig keys that only model=transfer reads.
TRANSFER_KEYS = (
    "trainable",
    "pretrained",
    "base_classes",
    "pretrain_epochs",
    "pretrain_learning_rate",
)


def convert(module: tf.Module, signatures: Sequence[str] | None = None) -> bytes:
    """Convert a trainable module to a ``.tflite`` flatbuffer with the named signatures.

    ``signatures`` name the module's ``tf.function`` attributes (with input signatures) to
    export; None: the guide layout's and ours (``layouts.OWN_GUIDE_SIGNATURES``). TFLite builtin ops
    only (no ``SELECT_TF_OPS``: the file needs no Flex delegate, so LiteRT and a plain LiteRT
    app runtime run it; the converter fails on any TF op instead), and resource variables (the
    weights are variables the signatures read and assign).
    """
    import tensorflow as tf  # TensorFlow: see the module docstring

    names = OWN_GUIDE_SIGNATURES if signatures is None else signatures
    functions = {name: getattr(module, name).get_concrete_function() for name in names}
    # The SavedModel/converter INFO lines (renamed resources, assets) say nothing to a user.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fl_ondevice-savedmodel-") as saved:
        tf.saved_model.save(module, saved, signatures=functions)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return bytes(converter.convert())


def verify(tflite: bytes, module: TrainableModel | TransferHead) -> OnDeviceModel:
    """Check a conversion: signatures present and typed, and ``save`` returns the TF weights.

    A converter can silently drop variables (the Keras 3 pitfall); the file then looks fine
    until training. Raises ``ModelError`` naming the first tensor that did not survive, or the
    Flex ops the file should not have.
    """
    from fl_ondevice.ondevice.transfer import TransferHead  # TensorFlow: see the module docstring

    flex = flex_ops(tflite)
    if flex:
        raise ModelError(f"converted model has Flex ops {flex}; fl_ondevice's models have none")
    device = OnDeviceModel(tflite)  # checks the layout's signatures and their inputs
    if device.runtime.name != LITERT:
        raise ModelError(f"converted model runs on {device.runtime.name}, not {LITERT}")
    layout = PERSONALIZATION.name if isinstance(module, TransferHead) else GUIDE.name
    if device.layout.name != layout:
        raise ModelError(f"converted model has the {device.layout.name} layout, not {layout}")
    if device.x_shape != module.input_shape_ or device.num_classes != module.num_classes:
        raise ModelError(
            f"converted model takes {device.x_shape} -> {device.num_classes} classes, "
            f"the TF model {module.input_shape_} -> {module.num_classes}"
        )
    saved = device.get_weights()
    expected = {n: w.numpy() for n, w in zip(module.weight_names, module.weights_, strict=True)}
    if sorted(saved) != sorted(expected):
        raise ModelError(
            f"conversion lost weights: save wrote {sorted(saved)}, the model has {sorted(expected)}"
        )
    for name, value in expected.items():
        if not np.array_equal(saved[name], value):
            raise ModelError(f"conversion changed weight '{name}': save output != TF weights")
    return device


# The pip distributions that install the `tensorflow` package, the usual ones first.
TENSORFLOW_DISTRIBUTIONS = (
    "tensorflow",
    "tensorflow-cpu",
    "tensorflow-intel",
    "tensorflow-macos",
    "tf-nightly",
    "tf-nightly-cpu",
)


@functools.lru_cache(maxsize=1)
def tensorflow_version() -> str:
    """The installed TensorFlow's version (``tf.__version__`` of a release), from its package
    metadata: looking a model up in the cache needs it, and importing TensorFlow for it would
    cost the run ~660 MiB."""
    for name in TENSORFLOW_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    import tensorflow as tf  # installed without pip's metadata (a source build): ask it

    return str(tf.__version__)


def cache_key(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    dataset: DatasetConfig | None = None,
) -> str:
    """Hash of everything that determines the converted file's bytes; for model=transfer that
    includes the data its base is pretrained on (``base_key``)."""
    model = asdict(cfg)
    if cfg.name != "transfer":  # keys only model=transfer reads: other models' keys unchanged
        for key in TRANSFER_KEYS:
            model.pop(key)
    spec = {
        "model": model,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "seed": seed,
        "tensorflow": tensorflow_version(),
        "code": MODEL_CODE_VERSION,
    }
    if cfg.name == "transfer":
        from fl_ondevice.ondevice.transfer import base_key  # TensorFlow: see the module docstring

        assert dataset is not None  # build_tflite checks it
        spec["base"] = base_key(cfg, dataset, seed)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_tflite(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    cache_dir: str | os.PathLike[str],
    dataset: DatasetConfig | None = None,
) -> Path:
    """The ``.tflite`` for a model config, converted and verified once, then read from the cache.

    ``model=tflite`` returns the user's file unchanged (its checks happen when it is opened).
    ``model=transfer`` needs ``dataset`` (its base is pretrained on it, also cached) and writes
    the pretraining report (``fl_ondevice.ondevice.transfer.PretrainedBase.report``) beside the
    file as ``<file>.json``.
    """
    if cfg.name == "transfer" and dataset is None:
        raise ModelError("model=transfer pretrains its base on the dataset: pass dataset=")
    if cfg.name == "tflite":
        assert cfg.path is not None  # ModelConfig guarantees it
        path = Path(cfg.path)
        if not path.is_file():
            raise ModelError(f"model.path={cfg.path!r}: no such file")
        return path
    key = cache_key(cfg, input_shape, num_classes, seed, dataset)
    out = Path(cache_dir) / f"{cfg.name}-{key}.tflite"
    if out.is_file():
        log.debug("conversion cache hit: %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # TensorFlow: see the module docstring
    from fl_ondevice.ondevice.model import build_model
    from fl_ondevice.ondevice.transfer import build_transfer, pretrained_base

    if cfg.name == "transfer":
        assert dataset is not None
        base = pretrained_base(cfg, dataset, seed, cache_dir)
        module = build_transfer(cfg, input_shape, num_classes, seed, base.weights)
        tflite = convert_and_verify(module)
        report = json.dumps(base.report, indent=2).encode()
        tmp_json = out.with_suffix(f".tmp-{os.getpid()}.json")
        tmp_json.write_bytes(report)
        os.replace(tmp_json, out.with_suffix(".json"))
    else:
        module = build_model(cfg, input_shape, num_classes, seed)
        tflite = convert_and_verify(module)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_bytes(tflite)
    os.replace(tmp, out)  # atomic: parallel sweep jobs may convert the same model
    log.info("converted %s (%d KiB) -> %s", cfg.name, len(tflite) // 1024, out)
    return out


def convert_and_verify(module: tf.Module) -> bytes:
    """Convert a model module with the signatures of its layout and check the result."""
    # TensorFlow: see the module docstring
    from fl_ondevice.ondevice.model import TrainableModel
    from fl_ondevice.ondevice.transfer import TransferHead

    if isinstance(module, TransferHead):
        tflite = convert(module, OWN_PERSONALIZATION_SIGNATURES)
    else:
        assert isinstance(module, TrainableModel)
        tflite = convert(module)
    verify(tflite, module)
    return tflite


def bake(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    weights: dict[str, np.ndarray],
    base: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> bytes:
    """A ``.tflite`` whose initial weights are ``weights``: all signatures intact, ready for an app.

    The model is rebuilt, its variables set, converted and verified (``save`` returns exactly
    ``weights``), so an app that loads the file starts from the trained global model.
    model=transfer with trainable=head also needs its frozen ``base`` (``weights`` is the head);
    its ``initialize`` still sets the head the original file starts from (give the run's
    ``seed``, which determines that start).
    """
    # TensorFlow: see the module docstring
    from fl_ondevice.ondevice.model import TrainableModel, build_model
    from fl_ondevice.ondevice.transfer import build_transfer

    if cfg.name == "transfer" and cfg.trainable == "head":
        if base is None:
            raise ModelError("bake: model=transfer trainable=head needs the frozen base= weights")
        module: tf.Module = build_transfer(cfg, input_shape, num_classes, seed, base, weights)
    else:
        module = build_model(cfg, input_shape, num_classes)
        assert isinstance(module, TrainableModel)
        module.assign(weights)
    return convert_and_verify(module)
