"""One federated run on the server: run its rounds over a grid, record each, write its outputs."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.superlink.grid import InMemoryGrid
from omegaconf import OmegaConf

from fl_ondevice.config import to_run_config
from fl_ondevice.console import native_stderr_to_log
from fl_ondevice.data import (
    write_partition_report,
)
from fl_ondevice.devicetime.calibration import (
    CALIBRATION_JSON,
    write_calibration,
)
from fl_ondevice.ondevice.convert import bake
from fl_ondevice.ondevice.weights import Weights
from fl_ondevice.outputs.clients import ClientRecord
from fl_ondevice.outputs.plots import (
    ACCURACY_PNG,
    PERSONALIZATION_PNG,
    plot_accuracy,
    plot_personalization,
)
from fl_ondevice.outputs.results import MetricsLog, summarize
from fl_ondevice.server.prepare import Prepared
from fl_ondevice.server.privacy import within_budget
from fl_ondevice.server.recorder import (
    CentralEvaluation,
    ClientsCsv,
    MetricsRow,
    PrivacyLedger,
    ProgressLine,
    ResumeSave,
    RoundHook,
    RoundRecorder,
)
from fl_ondevice.server.resume import (
    RESOLVED_CONFIG,
    ResumePoint,
    last_round_weights,
    restore_strategy_state,
)
from fl_ondevice.server.rounds import run_rounds
from fl_ondevice.server.strategy import layers
from fl_ondevice.wire.grouping import Executors, PartitionOwners, Placement
from fl_ondevice.wire.message import (
    from_arrays,
    to_arrays,
)
from fl_ondevice.wire.node import bottleneck_dir, model_sha256
from fl_ondevice.wire.policy import RoundPolicy
from fl_ondevice.wire.replies import ReplyCheck
from fl_ondevice.wire.transport import ClientGrid

log = logging.getLogger(__name__)

GLOBAL_CKPT = "global_model.ckpt"
GLOBAL_TFLITE = "global_model.tflite"
# How often the server asks for replies: the simulation's in-memory link state answers in
# microseconds; a deployed SuperLink (Flower's own grid waits 3 s) is asked twice a second.
REPLY_PULL_SECONDS = 0.005
DEPLOYED_REPLY_PULL_SECONDS = 0.5


def run_server(
    grid: Grid,
    prep: Prepared,
    overrides: dict[str, Any] | None = None,
    nodes_own_data: bool = False,
    model_files: bool = True,
    engine_workers: int = 1,
) -> dict:
    """Run the configured strategy for ``cfg.num_rounds`` rounds over ``grid``'s nodes, write
    the run's outputs, and return its summary.

    ``nodes_own_data``: ``grid``'s nodes are SuperNodes, each owning the partition its node
    config names (``flwr run``); else they train the clients the server names (the simulation).
    ``engine_workers``: the clients the engine trains at once, for whom the server groups a
    round's clients into messages (``fl_ondevice.wire.grouping.messages_per_round``); unused
    when the nodes own their data (each gets its own clients' messages).
    ``model_files=False`` leaves ``global_model.ckpt`` and ``global_model.tflite`` to the caller
    (:func:`write_model_files`), which can stop the engine first.

    A resumed run (``cfg.resume``) continues after its last completed round, with the global
    weights, the strategy's state and the metrics that round left on disk.
    """
    cfg, resumed = prep.cfg, prep.resumed
    if resumed:
        restore_strategy_state(prep.strategy, resumed.strategy_state)
    metrics = _start_outputs(prep, overrides, resumed)
    clients = client_grid(grid, prep, nodes_own_data, engine_workers)
    clients_csv = ClientsCsv(prep)
    hooks: list[RoundHook] = [CentralEvaluation(prep), MetricsRow(prep, metrics), clients_csv]
    rounds: Iterable[int] = range(resumed.round + 1 if resumed else 1, cfg.num_rounds + 1)
    if prep.privacy is not None:
        info = metrics.run_info.setdefault("privacy", prep.privacy.info)
        hooks.append(PrivacyLedger(prep.privacy, clients_csv, info))
        rounds = within_budget(rounds, prep.privacy.accountant, prep.privacy.max_epsilon, info)
    hooks += [ResumeSave(prep, metrics), ProgressLine(cfg.num_rounds)]
    recorder = RoundRecorder(hooks, clients.traffic)
    if resumed:
        initial = resumed.weights
    else:
        initial = prep.server_model.initial_weights()
        recorder.record(0, initial)
    final = run_rounds(
        prep.strategy,
        clients,
        to_arrays(initial),
        rounds,
        ConfigRecord(),  # what each strategy adds to it (server-round, proximal-mu, ...)
        cfg.seed,
        recorder.after_round,
        min_updates=cfg.round.min_updates,
    )
    _finish_outputs(prep, from_arrays(final), metrics, clients_csv.records, model_files)
    # The clients' bottlenecks (personalization layout) are of this run only.
    shutil.rmtree(bottleneck_dir(cfg, grid.run.run_id), ignore_errors=True)
    return summarize(metrics.rows, metrics.run_info)


def client_grid(
    grid: Grid, prep: Prepared, nodes_own_data: bool, engine_workers: int
) -> ClientGrid:
    """The grid the strategy sees over the engine's ``grid``: one node per client (see
    :func:`run_server` for ``nodes_own_data`` and ``engine_workers``)."""
    cfg, tflite = prep.cfg, prep.model_file.read_bytes()
    placement: Placement = (
        PartitionOwners()
        if nodes_own_data
        else Executors(
            engine_workers,
            cfg.client.clients_per_message,
            [len(p.train_indices) for p in prep.partitions],
        )
    )
    policy = RoundPolicy(
        cfg.seed, cfg.client.dropout_rate, prep.clock, cfg.round.overcommit, cfg.round.deadline_s
    )
    return ClientGrid(
        grid,
        cfg.num_clients,
        model=(model_sha256(tflite), tflite),
        run_config=ConfigRecord(to_run_config(cfg)),  # type: ignore[arg-type]
        replies=ReplyCheck(prep.server_model.weight_spec, cfg.client.update_encoding),
        placement=placement,
        policy=policy,
        pull_seconds=pull_seconds(grid),
    )


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
    metrics.write()  # what the last round left out: a privacy budget's stop (PrivacyLedger)
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
        from fl_ondevice.ondevice.checkpoint import write_checkpoint

        write_checkpoint(out / GLOBAL_CKPT, weights)
        _write_global_tflite(prep, weights, out / GLOBAL_TFLITE)


def _strategy_name(strategy: Strategy) -> str:
    return " / ".join(type(s).__name__ for _, s in layers(strategy))


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
        from fl_ondevice.ondevice.transfer import (
            pretrained_base,
        )  # TensorFlow: see write_model_files

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
