"""`python -m fl_ondevice.export model=...`: build (or take from the cache) the configured model's
``.tflite``, copy it into Hydra's run directory and describe it for app developers."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl_ondevice.config import DATASET_CLASSES, DATASET_SHAPES, Config, parse_config
from fl_ondevice.data import load_dataset
from fl_ondevice.ondevice import OnDeviceModel
from fl_ondevice.ondevice.convert import build_tflite


def _tensors(details: dict[str, dict]) -> str:
    return ", ".join(
        f"{k}: {np.dtype(v['dtype']).name}{[int(d) for d in v['shape_signature']]}"
        for k, v in details.items()
    )


def describe(device: OnDeviceModel) -> str:
    """What an app developer needs: signatures with their tensors, file size, weight sizes."""
    runtime = f"{device.runtime.name} {device.runtime.version}"
    lines = [
        f"{device.source}: {len(device.model_bytes) / 1024:.1f} KiB, runs on {runtime}",
        "signatures:",
    ]
    for name in sorted(device.signatures):
        runner = device.interpreter.get_signature_runner(name)
        ins = _tensors(runner.get_input_details())
        outs = _tensors(runner.get_output_details())
        lines.append(f"  {name}({ins}) -> {{{outs}}}")
    lines.append(f"weights ({device.weight_spec.num_bytes / 1024:.1f} KiB):")
    for t in device.weight_spec.tensors:
        kib = int(np.prod(t.shape)) * t.dtype.itemsize / 1024
        lines.append(f"  {t.name:24s} {np.dtype(t.dtype).name}{list(t.shape)}  {kib:.1f} KiB")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Build the composed config's model, write it as ``model.tflite`` in the run directory and
    print its description (and, for model=transfer, the base's pretraining report)."""

    run = parse_config(cfg)  # the whole config: model=transfer's checks span dataset and model
    input_shape, num_classes = _data_shape(run)
    cache_dir = os.path.expanduser(run.cache_dir)
    path = build_tflite(run.model, input_shape, num_classes, run.seed, cache_dir, run.dataset)
    out = Path(HydraConfig.get().runtime.output_dir) / "model.tflite"
    out.write_bytes(path.read_bytes())
    print(describe(OnDeviceModel(out)))
    report = path.with_suffix(".json")
    if report.is_file():
        print(f"pretraining ({report}): {report.read_text()}")


def _data_shape(run: Config) -> tuple[tuple[int, ...], int]:
    """Image shape and class count: from the tables, or a files dataset's file."""
    name, classes = run.dataset.name, run.dataset.classes
    if name not in DATASET_SHAPES:
        data = load_dataset(run.dataset, run.seed)
        return data.input_shape, data.num_classes
    return DATASET_SHAPES[name], DATASET_CLASSES[name] if classes is None else len(classes)


if __name__ == "__main__":
    main()
