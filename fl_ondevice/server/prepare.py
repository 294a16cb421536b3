"""Prepare a run: everything that can fail on bad input, checked before any engine starts."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from flwr.serverapp.strategy import Strategy

from fl_ondevice.config import Config
from fl_ondevice.console import native_stderr_to_log
from fl_ondevice.data import (
    Partition,
    make_partitions,
)
from fl_ondevice.data.dataset import Dataset
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.devicetime.calibration import (
    CALIBRATION_JSON,
    Calibration,
    batch_sizes_needed,
    read_calibration,
)
from fl_ondevice.devicetime.clock import DeviceClock, device_classes
from fl_ondevice.devicetime.measure import load_or_measure
from fl_ondevice.errors import ConfigError
from fl_ondevice.ondevice.convert import build_tflite
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.server.privacy import Privacy, plan_privacy, with_target_noise
from fl_ondevice.server.resume import (
    ResumePoint,
    load_resume_point,
    state_file,
)
from fl_ondevice.server.strategy import make_strategy, nodes_needed, setting
from fl_ondevice.wire.mods import client_mods
from fl_ondevice.wire.node import model_sha256


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs that can fail on bad input, built before any engine starts."""

    cfg: Config
    dataset: Dataset
    partitions: list[Partition]
    model_file: Path
    server_model: OnDeviceModel
    strategy: Strategy
    resumed: ResumePoint | None  # where an interrupted run (``cfg.resume``) continues
    clock: DeviceClock | None  # the phones' simulated clock (``device``), None without phones
    privacy: Privacy | None = None  # the (epsilon, delta) accounting of a DP run


def prepare(cfg: Config) -> Prepared:
    """Load data, partition it, convert (or open) the model, build the strategy, and check that
    they fit together.

    Raises ``ConfigError``/``DataError``/``ModelError`` with the fix in the message.
    """
    check_output_dir(Path(cfg.output_dir))
    if cfg.resume:
        state_file(Path(cfg.resume))  # fail before converting models or starting engines
    strategy = make_strategy(cfg)
    solved = with_target_noise(cfg, strategy)
    if solved is not cfg:  # dp.target_epsilon: the noise is set before the strategy is built
        cfg, strategy = solved, make_strategy(solved)
    mods = client_mods(cfg)  # a bad mod fails here, not on every worker
    privacy = plan_privacy(cfg, strategy, mods)
    dataset = load_dataset(cfg.dataset, cfg.seed, cfg.cache_dir)
    partitions = make_partitions(dataset, cfg.num_clients, cfg.partition, cfg.seed)
    model_file = build_tflite(
        cfg.model,
        dataset.input_shape,
        dataset.num_classes,
        cfg.seed,
        os.path.expanduser(cfg.cache_dir),
        cfg.dataset,
    )
    model = OnDeviceModel(model_file)
    if model.x_shape != dataset.input_shape:
        raise ConfigError(
            f"model.path={cfg.model.path!r} takes inputs of shape {model.x_shape} but "
            f"dataset.name={cfg.dataset.name!r} has images of shape {dataset.input_shape}; "
            "use a model built for this dataset"
        )
    if model.num_classes != dataset.num_classes:
        raise ConfigError(
            f"model.path={cfg.model.path!r} predicts {model.num_classes} classes but "
            f"dataset.name={cfg.dataset.name!r} has {dataset.num_classes}"
        )
    model.check_proximal(float(setting(strategy, "proximal_mu")))
    resumed = load_resume_point(Path(cfg.resume), model.weight_spec) if cfg.resume else None
    if resumed is not None and privacy is not None and privacy.accountant is not None:
        privacy.accountant.replay(resumed.rows)  # the releases of the rounds already run
    clock = _device_clock(cfg, dataset, partitions, model_file, strategy)
    if clock is not None and resumed is not None and resumed.rows:
        clock.now = float(resumed.rows[-1].get("sim_elapsed_seconds") or 0.0)
    return Prepared(cfg, dataset, partitions, model_file, model, strategy, resumed, clock, privacy)


def model_key(cfg: Config, dataset: Dataset, model_file: Path) -> str:
    """What a calibration is valid for: the architecture, optimizer and data shapes of a built
    model (its file differs by a few bytes between conversions), a user's file by content."""
    if cfg.model.name == "tflite":
        return f"tflite {model_sha256(model_file.read_bytes())[:16]}"
    shape = "x".join(str(d) for d in dataset.input_shape)
    name = cfg.model.name
    if name == "transfer":  # a head step and a whole-network step differ in cost
        name = f"transfer-{cfg.model.trainable}"
    return f"{name} {cfg.model.optimizer} {shape} -> {dataset.num_classes}"


def _device_clock(
    cfg: Config,
    dataset: Dataset,
    partitions: list[Partition],
    model_file: Path,
    strategy: Strategy,
) -> DeviceClock | None:
    # The phones' clock, with the step times this run uses: the resumed run's own, a given
    # file's, or this host's (measured once per model and machine, then cached).
    if not cfg.device.enabled:
        return None
    classes = device_classes(cfg.device)
    key = model_key(cfg, dataset, model_file)
    sizes = [len(p.train_indices) for p in partitions]
    own = Path(cfg.resume) / CALIBRATION_JSON if cfg.resume else None
    calibration: Calibration
    if own is not None and own.is_file():
        calibration = read_calibration(own, key)
    elif cfg.device.calibration:
        calibration = read_calibration(Path(cfg.device.calibration).expanduser(), key)
    else:
        with native_stderr_to_log():
            calibration = load_or_measure(
                os.path.expanduser(cfg.cache_dir),
                key,
                model_file,
                dataset.train_x(),  # float32 while measuring only: the dataset keeps uint8
                dataset.y_train,
                batch_sizes_needed(cfg.client.batch_size, sizes),
                cfg.client.num_threads,
            )
    clock = DeviceClock(
        classes,
        cfg.num_clients,
        cfg.seed,
        calibration,
        sizes,
        cfg.client.batch_size,
        cfg.client.local_epochs,
    )
    clock.when_online(nodes_needed(strategy))  # fails now if too few phones are ever online
    return clock


def check_output_dir(out: Path, need_mib: float = 64.0) -> None:
    """Fail at start, not hours later, if the run directory is unwritable or the disk is full."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"output_dir={str(out)!r} is not writable ({err.strerror}); choose another with "
            "hydra.run.dir=DIR"
        ) from None
    free_mib = shutil.disk_usage(out).free / 2**20
    if free_mib < need_mib:
        raise ConfigError(
            f"output_dir={str(out)!r} has {free_mib:.0f} MiB free; a run needs at least "
            f"{need_mib:.0f} MiB for checkpoints, models and metrics"
        )
