"""After each round: central evaluation, the metrics row, clients.csv, the resume save and the
progress line."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from fl_ondevice.data import (
    label_counts,
)
from fl_ondevice.devicetime.clock import DeviceClock
from fl_ondevice.ondevice.device import OnDeviceModel, evaluate_split
from fl_ondevice.ondevice.weights import Weights
from fl_ondevice.outputs.results import (
    CLIENTS_CSV,
    LOCAL_ACCURACIES,
    ClientRecord,
    MetricsLog,
    resumed_clients,
    spread,
    write_clients,
)
from fl_ondevice.processes import process_tree_rss_mib
from fl_ondevice.server.prepare import Prepared
from fl_ondevice.server.resume import (
    save_round,
)
from fl_ondevice.server.rounds import RoundResult
from fl_ondevice.wire.message import (
    EVAL_ACCURACY,
    EVAL_ACCURACY_PERSONAL,
    TRAIN_LOSS,
    from_arrays,
)
from fl_ondevice.wire.traffic import RoundTraffic
from fl_ondevice.wire.transport import ClientGrid

log = logging.getLogger(__name__)


class RoundRecorder:
    """After each round: evaluate the global model centrally (``infer`` on the test set), add
    the round's row to the metrics, save what a resume needs, and log a progress line."""

    def __init__(self, prep: Prepared, clients: ClientGrid, metrics: MetricsLog) -> None:
        self.prep, self.clients, self.metrics = prep, clients, metrics
        cfg = prep.cfg
        # Central evaluation runs while the workers wait: one interpreter per worker's core.
        self.evaluators = [prep.server_model] + [
            OnDeviceModel(prep.model_file) for _ in range(cfg.local_workers - 1)
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
