"""SavedModel -> .tflite conversion, verified and cached; a CLI that describes the result."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tensorflow as tf

from fl_ondevice.config import ModelConfig
from fl_ondevice.device import OnDeviceModel
from fl_ondevice.errors import ModelError
from fl_ondevice.model import (
    PROXIMAL_SIGNATURE,
    RESET_SIGNATURE,
    SIGNATURES,
    TrainableModel,
    build_model,
)

log = logging.getLogger(__name__)

# Bump when model.py changes the graph or the initial weights, so stale cache entries are ignored.
MODEL_CODE_VERSION = 3

# Image shape and class count per dataset, so a model can be exported without loading the data.
DATASET_SHAPES: dict[str, tuple[tuple[int, int], int]] = {
    "digits": ((8, 8), 10),
    "fashion_mnist": ((28, 28), 10),
    "mnist": ((28, 28), 10),
}


def convert(module: TrainableModel) -> bytes:
    """Convert a trainable module to a ``.tflite`` flatbuffer with all its signatures.

    Uses ``TFLITE_BUILTINS + SELECT_TF_OPS`` (Save/Restore and some gradients are TF ops) and
    resource variables (the weights are variables the signatures read and assign).
    """
    signatures = {
        name: getattr(module, name).get_concrete_function()
        for name in (*SIGNATURES, PROXIMAL_SIGNATURE, RESET_SIGNATURE)
    }
    # The SavedModel/converter INFO lines (renamed resources, assets) say nothing to a user.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fl_ondevice-savedmodel-") as saved:
        tf.saved_model.save(module, saved, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS,
            tf.lite.OpsSet.SELECT_TF_OPS,
        ]
        converter.experimental_enable_resource_variables = True
        return bytes(converter.convert())


def verify(tflite: bytes, module: TrainableModel) -> OnDeviceModel:
    """Check a conversion: signatures present and typed, and ``save`` returns the TF weights.

    A converter can silently drop variables (the Keras 3 pitfall); the file then looks fine
    until training. Raises ``ModelError`` naming the first tensor that did not survive.
    """
    device = OnDeviceModel(tflite)  # checks the four signatures and their inputs
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


def cache_key(cfg: ModelConfig, input_shape: tuple[int, int], num_classes: int, seed: int) -> str:
    """Hash of everything that determines the converted file's bytes."""
    spec = {
        "model": asdict(cfg),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "seed": seed,
        "tensorflow": tf.__version__,
        "code": MODEL_CODE_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_tflite(
    cfg: ModelConfig,
    input_shape: tuple[int, int],
    num_classes: int,
    seed: int,
    cache_dir: str | os.PathLike[str],
) -> Path:
    """The ``.tflite`` for a model config, converted and verified once, then read from the cache.

    ``model=tflite`` returns the user's file unchanged (its checks happen when it is opened).
    """
    if cfg.name == "tflite":
        assert cfg.path is not None  # ModelConfig guarantees it
        path = Path(cfg.path)
        if not path.is_file():
            raise ModelError(f"model.path={cfg.path!r}: no such file")
        return path
    out = Path(cache_dir) / f"{cfg.name}-{cache_key(cfg, input_shape, num_classes, seed)}.tflite"
    if out.is_file():
        log.debug("conversion cache hit: %s", out)
        return out
    module = build_model(cfg, input_shape, num_classes, seed)
    tflite = convert(module)
    verify(tflite, module)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_bytes(tflite)
    os.replace(tmp, out)  # atomic: parallel sweep jobs may convert the same model
    log.info("converted %s (%d KiB) -> %s", cfg.name, len(tflite) // 1024, out)
    return out


def _tensors(details: dict[str, dict]) -> str:
    return ", ".join(
        f"{k}: {np.dtype(v['dtype']).name}{[int(d) for d in v['shape_signature']]}"
        for k, v in details.items()
    )


def describe(device: OnDeviceModel) -> str:
    """What an app developer needs: signatures with their tensors, file size, weight sizes."""
    lines = [f"{device.source}: {len(device.model_bytes) / 1024:.1f} KiB", "signatures:"]
    for name in sorted(device.signatures):
        runner = device.interpreter.get_signature_runner(name)
        ins = _tensors(runner.get_input_details())
        outs = _tensors(runner.get_output_details())
        lines.append(f"  {name}({ins}) -> {{{outs}}}")
    lines.append(f"weights ({device.weight_spec.num_bytes / 1024:.1f} KiB per checkpoint):")
    for t in device.weight_spec.tensors:
        kib = int(np.prod(t.shape)) * t.dtype.itemsize / 1024
        lines.append(f"  {t.name:24s} {np.dtype(t.dtype).name}{list(t.shape)}  {kib:.1f} KiB")
    return "\n".join(lines)


def _main_impl(cfg: object) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from fl_ondevice.config import DatasetConfig, to_dataclass

    assert isinstance(cfg, DictConfig)
    dataset = to_dataclass(DatasetConfig, cfg.dataset, "dataset")
    model = to_dataclass(ModelConfig, cfg.model, "model")
    input_shape, num_classes = DATASET_SHAPES[dataset.name]
    path = build_tflite(model, input_shape, num_classes, int(cfg.seed), cfg.cache_dir)
    out = Path(HydraConfig.get().runtime.output_dir) / "model.tflite"
    out.write_bytes(path.read_bytes())
    print(describe(OnDeviceModel(out)))


if __name__ == "__main__":
    import hydra

    hydra.main(config_path="../conf", config_name="config", version_base=None)(_main_impl)()


def bake(
    cfg: ModelConfig, input_shape: tuple[int, int], num_classes: int, weights: dict[str, np.ndarray]
) -> bytes:
    """A ``.tflite`` whose initial weights are ``weights``: all signatures intact, ready for an app.

    The model is rebuilt, its variables set, converted and verified (``save`` returns exactly
    ``weights``), so an app that loads the file starts from the trained global model.
    """
    module = build_model(cfg, input_shape, num_classes)
    module.assign(weights)
    tflite = convert(module)
    verify(tflite, module)
    return tflite
