"""One federated run on the server: prepare it, run its rounds, record each, write outputs."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid import InMemoryGrid
from omegaconf import OmegaConf

from fl_ondevice import cluster
from fl_ondevice.calibration import (
    CALIBRATION_JSON,
    Calibration,
    batch_sizes_needed,
    load_or_measure,
    read_calibration,
    write_calibration,
)
from fl_ondevice.client import bottleneck_dir
from fl_ondevice.client_app import client_app
from fl_ondevice.clock import DeviceClock, device_classes
from fl_ondevice.config import Config, ConfigError, to_run_config
from fl_ondevice.console import native_stderr_to_log
from fl_ondevice.data import Dataset, load_dataset
from fl_ondevice.device import OnDeviceModel, evaluate_split
from fl_ondevice.export import bake, build_tflite
from fl_ondevice.message import (
    EVAL_ACCURACY,
    EVAL_ACCURACY_PERSONAL,
    TRAIN_LOSS,
    from_arrays,
    to_arrays,
)
from fl_ondevice.node import model_sha256
from fl_ondevice.partition import (
    Partition,
    label_counts,
    make_partitions,
    write_partition_report,
)
from fl_ondevice.results import (
    ACCURACY_PNG,
    CLIENTS_CSV,
    LOCAL_ACCURACIES,
    PERSONALIZATION_PNG,
    ClientRecord,
    MetricsLog,
    plot_accuracy,
    plot_personalization,
    process_tree_rss_mib,
    resumed_clients,
    spread,
    summarize,
    write_clients,
)
from fl_ondevice.resume import (
    RESOLVED_CONFIG,
    ResumePoint,
    last_round_weights,
    load_resume_point,
    restore_strategy_state,
    save_round,
    state_file,
)
from fl_ondevice.rounds import RoundResult, run_rounds
from fl_ondevice.strategy import layers, make_strategy, nodes_needed, setting
from fl_ondevice.transport import ClientGrid, RoundTraffic
from fl_ondevice.weights import Weights

log = logging.getLogger(__name__)

GLOBAL_CKPT = "global_model.ckpt"
GLOBAL_TFLITE = "global_model.tflite"
# How often the server asks for replies: the simulation's in-memory link state answers in
# microseconds; a deployed SuperLink (Flower's own grid waits 3 s) is asked twice a second.
REPLY_PULL_SECONDS = 0.005
DEPLOYED_REPLY_PULL_SECONDS = 0.5


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


def prepare(cfg: Config) -> Prepared:
    """Load data, partition it, convert (or open) the model, build the strategy, and check that
    they fit together.

    Raises ``ConfigError``/``DataError``/``ModelError`` with the fix in the message.
    """
    check_output_dir(Path(cfg.output_dir))
    if cfg.resume:
        state_file(Path(cfg.resume))  # fail before converting models or starting engines
    strategy = make_strategy(cfg)
    client_app(cfg)  # builds the clients' mods: a bad one fails here, not on every worker
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
    model.check_proximal(float(setting(strategy, "proximal_mu", 0.0)))
    resumed = load_resume_point(Path(cfg.resume), model.weight_spec) if cfg.resume else None
    clock = _device_clock(cfg, dataset, partitions, model_file, strategy)
    if clock is not None and resumed is not None and resumed.rows:
        clock.now = float(resumed.rows[-1].get("sim_elapsed_seconds") or 0.0)
    return Prepared(cfg, dataset, partitions, model_file, model, strategy, resumed, clock)


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


def run_server(
    grid: Grid,
    prep: Prepared,
    overrides: dict[str, Any] | None = None,
    nodes_own_data: bool = False,
    model_files: bool = True,
) -> dict:
    """Run the configured strategy for ``cfg.num_rounds`` rounds over ``grid``'s nodes, write
    the run's outputs, and return its summary.

    ``nodes_own_data``: ``grid``'s nodes are SuperNodes, each owning the partition its node
    config names (``flwr run``); else they train the clients the server names (the simulation).
    ``model_files=False`` leaves ``global_model.ckpt`` and ``global_model.tflite`` to the caller
    (:func:`write_model_files`), which can stop the engine first.

    A resumed run (``cfg.resume``) continues after its last completed round, with the global
    weights, the strategy's state and the metrics that round left on disk.
    """
    cfg, resumed = prep.cfg, prep.resumed
    if resumed:
        restore_strategy_state(prep.strategy, resumed.strategy_state)
    metrics = _start_outputs(prep, overrides, resumed)
    tflite = prep.model_file.read_bytes()
    clients = ClientGrid(
        grid,
        num_clients=cfg.num_clients,
        seed=cfg.seed,
        weight_spec=prep.server_model.weight_spec,
        model=(model_sha256(tflite), tflite),
        run_config=ConfigRecord(to_run_config(cfg)),  # type: ignore[arg-type]
        workers=cluster.workers(cfg),
        clients_per_message=cfg.client.clients_per_message,
        client_sizes=[len(p.train_indices) for p in prep.partitions],
        dropout_rate=cfg.client.dropout_rate,
        pull_seconds=pull_seconds(grid),
        nodes_own_data=nodes_own_data,
        update_encoding=cfg.client.update_encoding,
        clock=prep.clock,
        overcommit=cfg.round.overcommit,
        deadline_s=cfg.round.deadline_s,
    )
    recorder = RoundRecorder(prep, clients, metrics)
    if resumed:
        initial, first = resumed.weights, resumed.round + 1
    else:
        initial, first = prep.server_model.initial_weights(), 1
        recorder.record(0, initial)
    final = run_rounds(
        prep.strategy,
        clients,
        to_arrays(initial),
        range(first, cfg.num_rounds + 1),
        ConfigRecord(),  # what each strategy adds to it (server-round, proximal-mu, ...)
        cfg.seed,
        recorder.after_round,
        min_updates=cfg.round.min_updates,
    )
    _finish_outputs(prep, from_arrays(final), metrics, recorder.clients_seen, model_files)
    # The clients' bottlenecks (personalization layout) are of this run only.
    shutil.rmtree(bottleneck_dir(cfg, grid.run.run_id), ignore_errors=True)
    return summarize(metrics.rows, metrics.run_info)


def pull_seconds(grid: Grid) -> float:
    """How often to ask ``grid`` for replies."""
    return REPLY_PULL_SECONDS if isinstance(grid, InMemoryGrid) else DEPLOYED_REPLY_PULL_SECONDS


def _start_outputs(
    prep: Prepared, overrides: dict[str, Any] | None, resumed: ResumePoint | None
) -> MetricsLog:
    cfg, out = prep.cfg, Path(prep.cfg.output_dir)
    (out / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(asdict(cfg)))
    if prep.clock is not None:
        write_calibration(prep.clock.calibration, out / CALIBRATION_JSON)
    write_partition_report(
        prep.partitions,
        prep.dataset.y_train,
        prep.dataset.num_classes,
        out,
        f"{cfg.dataset.name}, {cfg.partition.name}, {cfg.num_clients} clients, seed {cfg.seed}",
    )
    run_info = {
        "config": asdict(cfg),
        "overrides": overrides or {},
        "target_accuracy": cfg.target_accuracy,
        "model_file": str(prep.model_file),
        "model_bytes": prep.model_file.stat().st_size,  # the .tflite a phone downloads
        # The interpreter the clients run (the server opens the same file the same way).
        "runtime": asdict(prep.server_model.runtime),
    }
    return MetricsLog(out, run_info, rows=resumed.rows if resumed else ())


def _finish_outputs(
    prep: Prepared,
    weights: Weights,
    metrics: MetricsLog,
    clients: list[ClientRecord],
    model_files: bool,
) -> None:
    cfg, out = prep.cfg, Path(prep.cfg.output_dir)
    if model_files:
        write_model_files(prep, weights)
    title = (
        f"{cfg.model.name} on {cfg.dataset.name}, {cfg.partition.name}, "
        f"{cfg.num_clients} clients, {_strategy_name(prep.strategy)}, seed {cfg.seed}"
    )
    plot_accuracy(metrics.rows, out / ACCURACY_PNG, title)
    if cfg.personalize.epochs > 0:
        title += f", personalize.epochs={cfg.personalize.epochs}"
        plot_personalization(clients, out / PERSONALIZATION_PNG, title)


def write_model_files(prep: Prepared, weights: Weights | None = None) -> None:
    """Write the run's ``global_model.ckpt`` and ``global_model.tflite`` from ``weights``, or
    when None from the last completed round's weights in the run directory.

    TensorFlow writes the checkpoint and bakes the ``.tflite``: it is imported here, at the end,
    not with this module, so that a run whose model is cached spends its rounds without its
    ~660 MiB. ``simulate`` calls this after it has stopped the engine, so that TensorFlow and
    the Ray workers are not resident at once.
    """
    out = Path(prep.cfg.output_dir)
    if weights is None:
        weights = last_round_weights(out)
    # Often the run's first TensorFlow import: its C++ start-up lines go to the log file.
    with native_stderr_to_log():
        from fl_ondevice.checkpoint import write_checkpoint

        write_checkpoint(out / GLOBAL_CKPT, weights)
        _write_global_tflite(prep, weights, out / GLOBAL_TFLITE)


def _strategy_name(strategy: Strategy) -> str:
    return " / ".join(type(s).__name__ for _, s in layers(strategy))


class RoundRecorder:
    """After each round: evaluate the global model centrally (``infer`` on the test set), add
    the round's row to the metrics, save what a resume needs, and log a progress line."""

    def __init__(self, prep: Prepared, clients: ClientGrid, metrics: MetricsLog) -> None:
        self.prep, self.clients, self.metrics = prep, clients, metrics
        cfg = prep.cfg
        # Central evaluation runs while the workers wait: one interpreter per worker's core.
        self.evaluators = [prep.server_model] + [
            OnDeviceModel(prep.model_file) for _ in range(cfg.workers - 1)
        ]
        done = metrics.rows[-1]["elapsed_seconds"] if metrics.rows else 0.0
        self.t_start = time.perf_counter() - done
        self.t_last = time.perf_counter()
        self.clients_seen = client_records(prep)  # clients.csv, updated after every round
        if prep.resumed is not None and cfg.resume:
            self.clients_seen = resumed_clients(
                self.clients_seen, Path(cfg.resume) / CLIENTS_CSV, prep.resumed.round
            )

    def after_round(self, result: RoundResult) -> None:
        """Record round ``result.round`` of the run."""
        self.record(result.round, from_arrays(result.arrays), result)

    def record(self, r: int, weights: Weights, result: RoundResult | None = None) -> None:
        """Evaluate ``weights`` as the global model after round ``r`` and persist the round."""
        cfg = self.prep.cfg
        t_eval = time.perf_counter()
        central = evaluate_split(
            self.evaluators,
            weights,
            self.prep.dataset.test_x(),  # (M, H, W) float32, for this evaluation only
            self.prep.dataset.y_test,
            cfg.eval_batch_size,
        )
        now = time.perf_counter()
        traffic = self.clients.traffic.pop(r, RoundTraffic())
        row = {
            "round": r,
            "accuracy": central["accuracy"],
            "loss": central["loss"],
            **_client_columns(traffic, result),
            "seconds": now - self.t_last if r else 0.0,
            "eval_seconds": now - t_eval,
            "elapsed_seconds": now - self.t_start,
            "rss_mib": process_tree_rss_mib(),
            **_sim_columns(traffic, self.prep.clock),
            **_local_columns(traffic, cfg.personalize.epochs),
        }
        self._note_clients(r, traffic, result)
        save_round(Path(cfg.output_dir), r, weights, self.prep.strategy, self.metrics, row)
        self.t_last = time.perf_counter()
        _progress(row, cfg.num_rounds)

    def _note_clients(self, r: int, traffic: RoundTraffic, result: RoundResult | None) -> None:
        # Each client's part in round r, then clients.csv rewritten (100 clients: ~3 ms a round).
        if result is not None and not result.skipped:
            for c in traffic.updated:
                record = self.clients_seen[c]
                record.rounds += 1
                record.train_rounds = f"{record.train_rounds};{r}".lstrip(";")
        personalize = self.prep.cfg.personalize.epochs > 0
        for c, metrics in traffic.evaluations.items():
            if EVAL_ACCURACY in metrics:
                record = self.clients_seen[c]
                record.last_eval_round = r
                record.local_acc_global = metrics[EVAL_ACCURACY]
                record.local_acc_personal = (
                    metrics.get(EVAL_ACCURACY_PERSONAL) if personalize else None
                )
        write_clients(self.clients_seen, Path(self.prep.cfg.output_dir) / CLIENTS_CSV)


def client_records(prep: Prepared) -> list[ClientRecord]:
    """One :class:`ClientRecord` per client: its local splits and the labels it holds."""
    counts = label_counts(prep.partitions, prep.dataset.y_train, prep.dataset.num_classes)
    return [
        ClientRecord(
            client=p.client_id,
            examples=len(p.train_indices),
            test_examples=len(p.test_indices),
            labels=";".join(str(c) for c in np.flatnonzero(held)),
            num_labels=int(np.count_nonzero(held)),
        )
        for p, held in zip(prep.partitions, counts, strict=True)
    ]


def _local_columns(traffic: RoundTraffic, personalize_epochs: int) -> dict[str, Any]:
    # Spread of the evaluated clients' local accuracies; empty (NaN) with personalization off,
    # so a run without it keeps its metrics.
    columns: dict[str, Any] = {}
    for name, key in zip(LOCAL_ACCURACIES, (EVAL_ACCURACY, EVAL_ACCURACY_PERSONAL), strict=True):
        values = [m[key] for m in traffic.evaluations.values() if key in m]
        stats = spread(values if personalize_epochs > 0 else [])
        columns.update({f"{name}_{stat}": value for stat, value in stats.items()})
    return columns


def _client_columns(traffic: RoundTraffic, result: RoundResult | None) -> dict[str, Any]:
    skipped = result is not None and result.skipped
    return {
        "train_loss": _metric(result.train_metrics if result else None, TRAIN_LOSS),
        "client_eval_accuracy": _metric(result.evaluate_metrics if result else None, EVAL_ACCURACY),
        "clients_sampled": traffic.sampled,
        "clients_dropped": traffic.dropped,
        "clients_replied": traffic.replied,
        "clients_failed": traffic.failed,
        "clients_rejected": traffic.rejected,
        "clients_stragglers": traffic.stragglers,
        "clients_unavailable": traffic.unavailable,
        "skipped": int(skipped),
        "examples": 0 if skipped else traffic.examples,
        "examples_loaded": traffic.loaded,
        "bytes_down": traffic.bytes_down,
        "bytes_up": traffic.bytes_up,
        "client_seconds": _median(traffic.client_seconds),
        "train_seconds": _median(traffic.train_seconds),
    }


def _sim_columns(traffic: RoundTraffic, clock: DeviceClock | None) -> dict[str, Any]:
    if clock is None:
        return {"sim_round_seconds": float("nan"), "sim_elapsed_seconds": float("nan")}
    return {"sim_round_seconds": traffic.sim_seconds, "sim_elapsed_seconds": clock.now}


def _metric(record: Any, key: str) -> float:
    if record is None or not isinstance(record.get(key), int | float):
        return float("nan")
    return float(cast(float, record[key]))


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _write_global_tflite(prep: Prepared, weights: dict, path: Path) -> None:
    cfg = prep.cfg
    cache = os.path.expanduser(cfg.cache_dir)
    if cfg.model.name == "tflite":
        # A foreign .tflite cannot be rebuilt with new weights: ship the checkpoint instead.
        log.warning(
            "model=tflite: %s not written; load %s into your model with its restore signature",
            path.name,
            GLOBAL_CKPT,
        )
        return
    base = None
    if cfg.model.name == "transfer" and cfg.model.trainable == "head":
        from fl_ondevice.transfer import pretrained_base  # TensorFlow: see write_model_files

        # The checkpoint holds the head; the frozen base comes from the cache build_tflite filled.
        base = pretrained_base(cfg.model, cfg.dataset, cfg.seed, cache).weights
    tflite = bake(
        cfg.model,
        prep.dataset.input_shape,
        prep.dataset.num_classes,
        weights,
        base=base,
        seed=cfg.seed,
    )
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
        "round %d/%d  accuracy %.4f  loss %.4f  train-loss %s  clients %d/%d  %.2f s  ETA %s%s",
        r,
        num_rounds,
        row["accuracy"],
        row["loss"],
        "n/a" if math.isnan(train_loss) else f"{train_loss:.4f}",
        row["clients_replied"],
        row["clients_sampled"],
        row["seconds"],
        _duration(eta),
        "  (skipped)" if row["skipped"] else "",
    )


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
