"""Flower ServerApp: initial weights from the model's save, FedAvg, central evaluation, outputs."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fl_ondevice.checkpoint import write_checkpoint
from fl_ondevice.client_app import MODEL_FILE, NUM_EXAMPLES, from_arrays, to_arrays
from fl_ondevice.config import Config, ConfigError, from_run_config, to_run_config
from fl_ondevice.data import Dataset, load_dataset
from fl_ondevice.device import OnDeviceModel
from fl_ondevice.export import bake, build_tflite
from fl_ondevice.partition import Partition, make_partitions, write_partition_report
from fl_ondevice.results import ACCURACY_PNG, MetricsLog, plot_accuracy, summarize
from fl_ondevice.strategy import RoundStats, SeededFedAvg

log = logging.getLogger(__name__)

GLOBAL_CKPT = "global_model.ckpt"
GLOBAL_TFLITE = "global_model.tflite"
RESOLVED_CONFIG = "config.yaml"  # every value this run used, defaults included


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs that can fail on bad input, built before any engine starts."""

    cfg: Config
    dataset: Dataset
    partitions: list[Partition]
    model_file: Path
    server_model: OnDeviceModel


def prepare(cfg: Config) -> Prepared:
    """Load data, partition it, convert (or open) the model and check they fit together.

    Raises ``ConfigError``/``DataError``/``ModelError`` with the fix in the message.
    """
    dataset = load_dataset(cfg.dataset, cfg.seed)
    partitions = make_partitions(dataset, cfg.num_clients, cfg.partition, cfg.seed)
    model_file = build_tflite(
        cfg.model,
        dataset.input_shape,
        dataset.num_classes,
        cfg.seed,
        os.path.expanduser(cfg.cache_dir),
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
    return Prepared(cfg, dataset, partitions, model_file, model)


def run_server(grid: Grid, prep: Prepared, overrides: dict[str, Any] | None = None) -> dict:
    """Run FedAvg for ``cfg.num_rounds`` rounds and write the run's outputs; return its summary."""
    cfg, dataset, model = prep.cfg, prep.dataset, prep.server_model
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(asdict(cfg)))
    write_partition_report(
        prep.partitions,
        dataset.y_train,
        dataset.num_classes,
        out,
        f"{cfg.dataset.name}, {cfg.partition.name}, {cfg.num_clients} clients, seed {cfg.seed}",
    )
    metrics = MetricsLog(
        out,
        {
            "config": asdict(cfg),
            "overrides": overrides or {},
            "target_accuracy": cfg.target_accuracy,
            "model_file": str(prep.model_file),
        },
    )
    strategy = SeededFedAvg(
        num_clients=cfg.num_clients,
        seed=cfg.seed,
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=cfg.strategy.min_train_nodes,
        min_evaluate_nodes=cfg.strategy.min_evaluate_nodes,
        min_available_nodes=1,
        weighted_by_key=NUM_EXAMPLES,
    )
    t_start = time.perf_counter()

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        weights = from_arrays(arrays)
        model.set_weights(weights)
        result = model.evaluate(dataset.x_test, dataset.y_test, batch_size=cfg.eval_batch_size)
        write_checkpoint(out / GLOBAL_CKPT, weights)  # every round: an interrupted run keeps it
        stats = strategy.stats.get(server_round, RoundStats())
        now = time.perf_counter()
        row = {
            "round": server_round,
            "accuracy": result["accuracy"],
            "loss": result["loss"],
            "train_loss": stats.train_loss,
            "client_eval_accuracy": stats.client_eval_accuracy,
            "clients_sampled": stats.sampled,
            "clients_replied": stats.replied,
            "clients_failed": stats.failed,
            "examples": stats.examples,
            "bytes_down": stats.bytes_down,
            "bytes_up": stats.bytes_up,
            "client_seconds": stats.client_seconds,
            "train_seconds": stats.train_seconds,
            "seconds": now - stats.start if server_round else 0.0,
            "elapsed_seconds": now - t_start,
        }
        metrics.append(row)
        _progress(row, cfg.num_rounds)
        return MetricRecord({"accuracy": result["accuracy"], "loss": result["loss"]})

    train_config = ConfigRecord({**to_run_config(cfg), MODEL_FILE: str(prep.model_file)})
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrays(model.get_weights()),
        num_rounds=cfg.num_rounds,
        train_config=train_config,
        evaluate_config=train_config,
        evaluate_fn=central_evaluation,
    )
    final = from_arrays(result.arrays) if result.arrays is not None else model.get_weights()
    write_checkpoint(out / GLOBAL_CKPT, final)
    _write_global_tflite(prep, final, out / GLOBAL_TFLITE)
    plot_accuracy(
        metrics.rows,
        out / ACCURACY_PNG,
        f"{cfg.model.name} on {cfg.dataset.name}, {cfg.partition.name}, "
        f"{cfg.num_clients} clients, seed {cfg.seed}",
    )
    return summarize(metrics.rows, {"target_accuracy": cfg.target_accuracy})


def _write_global_tflite(prep: Prepared, weights: dict, path: Path) -> None:
    cfg = prep.cfg
    if cfg.model.name == "tflite":
        # A foreign .tflite cannot be rebuilt with new weights: ship the checkpoint instead.
        log.warning(
            "model=tflite: %s not written; load %s into your model with its restore signature",
            path.name,
            GLOBAL_CKPT,
        )
        return
    tflite = bake(cfg.model, prep.dataset.input_shape, prep.dataset.num_classes, weights)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(tflite)
    os.replace(tmp, path)


def _progress(row: dict, num_rounds: int) -> None:
    r = row["round"]
    if r == 0:
        log.info(
            "round 0/%d  accuracy %.4f  loss %.4f  (initial model)",
            num_rounds,
            row["accuracy"],
            row["loss"],
        )
        return
    per_round = row["elapsed_seconds"] / r
    eta = per_round * (num_rounds - r)
    train_loss = row["train_loss"]
    log.info(
        "round %d/%d  accuracy %.4f  loss %.4f  train-loss %s  clients %d/%d  %.2f s  ETA %s",
        r,
        num_rounds,
        row["accuracy"],
        row["loss"],
        "n/a" if math.isnan(train_loss) else f"{train_loss:.4f}",
        row["clients_replied"],
        row["clients_sampled"],
        row["seconds"],
        _duration(eta),
    )


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def make_server_app(
    prep: Prepared | None = None, overrides: dict[str, Any] | None = None
) -> ServerApp:
    """A ServerApp for one run: ``prep`` from simulate.py, or built from Flower's run config.

    Under ``flwr run`` the run config (kebab-case keys of ``to_run_config``, declared in
    pyproject.toml) is the configuration.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        prepared = prep or prepare(from_run_config(dict(context.run_config)))
        summary = run_server(grid, prepared, overrides)
        server_app.summary = summary  # type: ignore[attr-defined]

    return server_app


app = make_server_app()
