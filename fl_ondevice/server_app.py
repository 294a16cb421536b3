"""Flower ServerApp: initial weights from the model's save, FedAvg, central evaluation, outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.superlink.grid import InMemoryGrid
from omegaconf import OmegaConf

from fl_ondevice.checkpoint import Weights, WeightSpec, read_checkpoint, write_checkpoint
from fl_ondevice.client_app import MODEL_FILE, NUM_EXAMPLES, from_arrays, to_arrays
from fl_ondevice.config import Config, ConfigError, from_run_config, parse_config, to_run_config
from fl_ondevice.data import Dataset, load_dataset
from fl_ondevice.device import OnDeviceModel, evaluate_split
from fl_ondevice.errors import ResumeError
from fl_ondevice.export import bake, build_tflite
from fl_ondevice.partition import Partition, make_partitions, write_partition_report
from fl_ondevice.results import (
    ACCURACY_PNG,
    METRICS_JSON,
    MetricsLog,
    plot_accuracy,
    process_tree_rss_mib,
    summarize,
)
from fl_ondevice.strategy import RoundStats, SeededFedAvg

log = logging.getLogger(__name__)

GLOBAL_CKPT = "global_model.ckpt"
GLOBAL_TFLITE = "global_model.tflite"
STATE_JSON = "state.json"  # the last completed round and its checkpoint: what resume reads
CHECKPOINT_DIR = "checkpoints"  # the global weights after the last two completed rounds
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
    check_output_dir(Path(cfg.output_dir))
    if cfg.resume:
        _state_file(Path(cfg.resume))  # fail before converting models or starting engines
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


def run_server(grid: Grid, prep: Prepared, overrides: dict[str, Any] | None = None) -> dict:
    """Run FedAvg for ``cfg.num_rounds`` rounds and write the run's outputs; return its summary.

    After every round the global checkpoint, the metrics and ``state.json`` (the last completed
    round) are written, in that order, so ``resume=RUN_DIR`` can continue an interrupted run.
    """
    cfg, dataset, model = prep.cfg, prep.dataset, prep.server_model
    out = Path(cfg.output_dir)
    resumed = load_resume_point(out, model.weight_spec) if cfg.resume else None
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
        rows=resumed.rows if resumed else (),
    )
    offset = resumed.round if resumed else 0
    strategy = SeededFedAvg(
        num_clients=cfg.num_clients,
        seed=cfg.seed,
        weight_spec=model.weight_spec,
        dropout_rate=cfg.client.dropout_rate,
        round_offset=offset,
        workers=cfg.workers,
        clients_per_message=cfg.client.clients_per_message,
        client_sizes=[len(p.train_indices) for p in prep.partitions],
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=cfg.strategy.min_train_nodes,
        min_evaluate_nodes=cfg.strategy.min_evaluate_nodes,
        min_available_nodes=1,
        weighted_by_key=NUM_EXAMPLES,
    )
    # Central evaluation runs while the workers wait: one interpreter per worker's core.
    evaluators = [model] + [OnDeviceModel(prep.model_file) for _ in range(cfg.workers - 1)]
    t_start = time.perf_counter() - (resumed.rows[-1]["elapsed_seconds"] if resumed else 0.0)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        r = server_round + offset
        if resumed and server_round == 0:  # round `offset` is already in the metrics
            last = resumed.rows[-1]
            return MetricRecord({"accuracy": last["accuracy"], "loss": last["loss"]})
        weights = from_arrays(arrays)
        t_eval = time.perf_counter()
        result = evaluate_split(
            evaluators, weights, dataset.x_test, dataset.y_test, cfg.eval_batch_size
        )
        stats = strategy.stats.get(r, RoundStats())
        now = time.perf_counter()
        row = {
            "round": r,
            "accuracy": result["accuracy"],
            "loss": result["loss"],
            "train_loss": stats.train_loss,
            "client_eval_accuracy": stats.client_eval_accuracy,
            "clients_sampled": stats.sampled,
            "clients_dropped": stats.dropped,
            "clients_replied": stats.replied,
            "clients_failed": stats.failed,
            "clients_rejected": stats.rejected,
            "skipped": int(stats.skipped),
            "examples": stats.examples,
            "bytes_down": stats.bytes_down,
            "bytes_up": stats.bytes_up,
            "client_seconds": stats.client_seconds,
            "train_seconds": stats.train_seconds,
            "seconds": now - stats.start if r else 0.0,
            "eval_seconds": now - t_eval,
            "elapsed_seconds": now - t_start,
            "rss_mib": process_tree_rss_mib(),
        }
        save_round(out, r, weights, metrics, row)
        _progress(row, cfg.num_rounds)
        return MetricRecord({"accuracy": result["accuracy"], "loss": result["loss"]})

    train_config = ConfigRecord({**to_run_config(cfg), MODEL_FILE: str(prep.model_file)})
    initial = resumed.weights if resumed else model.get_weights()
    result = strategy.start(
        grid=grid,
        initial_arrays=to_arrays(initial),
        num_rounds=cfg.num_rounds - offset,
        train_config=train_config,
        evaluate_config=train_config,
        evaluate_fn=central_evaluation,
    )
    # Flower's Result holds an empty ArrayRecord when no round produced an aggregate.
    final = from_arrays(result.arrays) if len(result.arrays) else initial
    write_checkpoint(out / GLOBAL_CKPT, final)
    _write_global_tflite(prep, final, out / GLOBAL_TFLITE)
    plot_accuracy(
        metrics.rows,
        out / ACCURACY_PNG,
        f"{cfg.model.name} on {cfg.dataset.name}, {cfg.partition.name}, "
        f"{cfg.num_clients} clients, seed {cfg.seed}",
    )
    return summarize(metrics.rows, metrics.run_info)


# -- persistence and resume --------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    """The last completed round of an interrupted run."""

    round: int
    weights: Weights
    rows: list[dict[str, Any]]


def save_round(out: Path, r: int, weights: Weights, metrics: MetricsLog, row: dict) -> None:
    """Persist round ``r``: checkpoint, then metrics, then ``state.json`` naming both.

    Each write is atomic (written aside, then renamed), and ``state.json`` comes last, so it
    always names a round whose checkpoint and metrics row are complete on disk.
    """
    ckpt = Path(CHECKPOINT_DIR) / f"round-{r}.ckpt"
    (out / CHECKPOINT_DIR).mkdir(exist_ok=True)
    write_checkpoint(out / ckpt, weights)
    metrics.append(row)
    tmp = out / f"{STATE_JSON}.tmp"
    tmp.write_text(json.dumps({"round": r, "checkpoint": str(ckpt)}))
    os.replace(tmp, out / STATE_JSON)
    for old in (out / CHECKPOINT_DIR).glob("round-*.ckpt"):  # keep this round's and the last
        if int(old.stem.split("-")[1]) < r - 1:
            old.unlink()


def load_resume_point(out: Path, spec: WeightSpec) -> ResumePoint:
    """Read where an interrupted run stopped; ``ResumeError`` if it cannot be continued."""
    state = json.loads(_state_file(out).read_text())
    weights = read_checkpoint(out / state["checkpoint"])
    spec.validate(weights, f"resume checkpoint {state['checkpoint']!r}")
    rows = [
        row
        for row in json.loads((out / METRICS_JSON).read_text())["rounds"]
        if row["round"] <= state["round"]
    ]
    if not rows or rows[-1]["round"] != state["round"]:
        raise ResumeError(f"resume={str(out)!r}: {METRICS_JSON} lacks round {state['round']}")
    log.info("resuming %s after round %d", out, state["round"])
    return ResumePoint(int(state["round"]), weights, rows)


def _state_file(out: Path) -> Path:
    path = out / STATE_JSON
    if not path.is_file():
        raise ResumeError(
            f"resume={str(out)!r}: no {STATE_JSON} there, so no round was completed (or it is not "
            "an fl_ondevice run directory); start the run anew"
        )
    return path


def resumed_config(run_dir: str) -> Config:
    """The configuration an interrupted run was started with, set to continue in place."""
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise ResumeError(f"resume={run_dir!r}: no {RESOLVED_CONFIG} there; is it a run directory?")
    saved = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(saved, dict)
    saved.update(output_dir=str(Path(run_dir)), resume=str(Path(run_dir)))
    return parse_config(saved)


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


# How often the server asks for replies: the simulation's in-memory link state answers in
# microseconds; a deployed SuperLink (Flower's own grid waits 3 s) is asked twice a second.
REPLY_PULL_SECONDS = 0.005
DEPLOYED_REPLY_PULL_SECONDS = 0.5


class ReplyStream(Grid):
    """A Grid whose ``send_and_receive`` hands out each reply as soon as it is pulled.

    Flower's grids return a round's replies all at once, so the server holds every update of
    the round before it starts averaging: memory that grows with the clients per round, and
    averaging that waits for the last reply. The strategy consumes this stream message by
    message instead (``SeededFedAvg.aggregate_train``). Everything else goes to ``grid``.
    """

    def __init__(self, grid: Grid, pull_seconds: float) -> None:
        self.grid = grid
        self.pull_seconds = pull_seconds

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Push ``messages`` now; yield their replies as they come, until all came or
        ``timeout`` seconds passed."""
        pending = set(self.grid.push_messages(messages))
        return self._replies(pending, timeout)

    def _replies(self, pending: set[str], timeout: float | None) -> Iterator[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            replies = list(self.grid.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in replies)
            while replies:
                yield replies.pop(0)  # the stream keeps no reference to what it handed out
            if pending:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                time.sleep(self.pull_seconds)

    @property
    def run(self) -> Run:
        return self.grid.run

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


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
        pull = REPLY_PULL_SECONDS if isinstance(grid, InMemoryGrid) else DEPLOYED_REPLY_PULL_SECONDS
        summary = run_server(ReplyStream(grid, pull), prepared, overrides)
        server_app.summary = summary  # type: ignore[attr-defined]

    return server_app


app = make_server_app()
