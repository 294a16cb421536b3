"""After each round, one hook per concern, called in order: central evaluation, the metrics
row, clients.csv, the resume save (which writes the metrics) and the progress line."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from fl_ondevice.data import (
    label_counts,
)
from fl_ondevice.devicetime.clock import DeviceClock
from fl_ondevice.ondevice.device import OnDeviceModel, evaluate_split
from fl_ondevice.ondevice.weights import Weights
from fl_ondevice.outputs.clients import (
    CLIENTS_CSV,
    ClientRecord,
    resumed_clients,
    write_clients,
)
from fl_ondevice.outputs.results import LOCAL_ACCURACIES, MetricsLog, spread
from fl_ondevice.processes import process_tree_rss_mib
from fl_ondevice.server.prepare import Prepared
from fl_ondevice.server.privacy import Privacy
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

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What the hooks see of one round, and the metrics row they fill in turn."""

    round: int
    weights: Weights  # the global model after the round
    result: RoundResult | None  # None: round 0, the initial model
    traffic: RoundTraffic  # what crossed the wire in the round
    since: float  # time.perf_counter() when the round before it had been recorded
    row: dict[str, Any] = field(default_factory=dict)  # its metrics row (results.COLUMNS)


class RoundHook(Protocol):
    """One concern of what happens after a round."""

    def __call__(self, record: RoundRecord) -> None:
        """Do this hook's part for ``record``'s round."""
        ...


class RoundRecorder:
    """After each round: its record to each of ``hooks``, in order.

    ``traffic``: the client grid's per-round traffic; a round's is taken out when it is
    recorded.
    """

    def __init__(self, hooks: Sequence[RoundHook], traffic: dict[int, RoundTraffic]) -> None:
        self.hooks, self.traffic = list(hooks), traffic
        self.since = time.perf_counter()

    def after_round(self, result: RoundResult) -> None:
        """Record round ``result.round`` of the run."""
        self.record(result.round, from_arrays(result.arrays), result)

    def record(self, r: int, weights: Weights, result: RoundResult | None = None) -> None:
        """Record ``weights`` as the global model after round ``r``."""
        traffic = self.traffic.pop(r, RoundTraffic())
        record = RoundRecord(r, weights, result, traffic, self.since, {"round": r})
        for hook in self.hooks:
            hook(record)
        self.since = time.perf_counter()


class CentralEvaluation:
    """The global model's ``accuracy`` and ``loss`` on the test set (its ``infer``
    signature), and the ``eval_seconds`` that took."""

    def __init__(self, prep: Prepared) -> None:
        # Central evaluation runs while the workers wait: one interpreter per worker's core.
        self.evaluators = [prep.server_model] + [
            OnDeviceModel(prep.model_file) for _ in range(prep.cfg.local_workers - 1)
        ]
        self.dataset, self.batch_size = prep.dataset, prep.cfg.eval_batch_size

    def __call__(self, record: RoundRecord) -> None:
        t_eval = time.perf_counter()
        central = evaluate_split(
            self.evaluators,
            record.weights,
            self.dataset.test_x(),  # (M, H, W) float32, for this evaluation only
            self.dataset.y_test,
            self.batch_size,
        )
        record.row["accuracy"], record.row["loss"] = central["accuracy"], central["loss"]
        record.row["eval_seconds"] = time.perf_counter() - t_eval


class MetricsRow:
    """The rest of the round's metrics row: what its clients did, its wall time (central
    evaluation included) and simulated time, the run's memory, the local accuracies' spread."""

    def __init__(self, prep: Prepared, metrics: MetricsLog) -> None:
        done = metrics.rows[-1]["elapsed_seconds"] if metrics.rows else 0.0
        self.t_start = time.perf_counter() - done
        self.clock, self.personalize_epochs = prep.clock, prep.cfg.personalize.epochs

    def __call__(self, record: RoundRecord) -> None:
        now, traffic = time.perf_counter(), record.traffic
        record.row.update(
            {
                **_client_columns(traffic, record.result),
                "seconds": now - record.since if record.round else 0.0,
                "elapsed_seconds": now - self.t_start,
                "rss_mib": process_tree_rss_mib(),
                **_sim_columns(traffic, self.clock),
                **local_columns(traffic, self.personalize_epochs),
            }
        )


class ClientsCsv:
    """Each client's part in the round, then ``clients.csv`` rewritten (100 clients: ~3 ms a
    round). ``records``: one per client, as the file has them."""

    def __init__(self, prep: Prepared) -> None:
        cfg = prep.cfg
        self.path = Path(cfg.output_dir) / CLIENTS_CSV
        self.personalize = cfg.personalize.epochs > 0
        self.local = prep.privacy.local if prep.privacy is not None else None
        self.records = client_records(prep)
        if prep.resumed is not None and cfg.resume:
            self.records = resumed_clients(
                self.records, Path(cfg.resume) / CLIENTS_CSV, prep.resumed.round
            )

    def __call__(self, record: RoundRecord) -> None:
        r, traffic, result = record.round, record.traffic, record.result
        if result is not None and not result.skipped:
            for c in traffic.updated:
                client = self.records[c]
                client.rounds += 1
                client.train_rounds = f"{client.train_rounds};{r}".lstrip(";")
        if self.local is not None:  # LocalDpMod: each update a client sent was a release
            for client in self.records:
                client.local_epsilon = self.local.epsilon(client.rounds)
        for c, metrics in traffic.evaluations.items():
            if EVAL_ACCURACY in metrics:
                client = self.records[c]
                client.last_eval_round = r
                client.local_acc_global = metrics[EVAL_ACCURACY]
                client.local_acc_personal = (
                    metrics.get(EVAL_ACCURACY_PERSONAL) if self.personalize else None
                )
        write_clients(self.records, self.path)


class PrivacyLedger:
    """The round's central DP release composed into the run's epsilon (its ``epsilon`` column)
    and, with ``LocalDpMod``, the clients' local epsilons summarised; both reach metrics.json's
    ``privacy`` through ``info``.

    Every round that sampled clients is a release, a skipped one too: the noisy aggregate was
    computed even if the round then kept the global model (conservative). A resumed run's
    accountant has composed the earlier rounds already (``Accountant.replay``).
    """

    def __init__(self, privacy: Privacy, clients: ClientsCsv, info: dict[str, Any]) -> None:
        self.privacy, self.clients, self.info = privacy, clients, info

    def __call__(self, record: RoundRecord) -> None:
        accountant = self.privacy.accountant
        if accountant is not None:
            if record.round > 0 and record.traffic.sampled > 0:
                accountant.compose(record.traffic.sampled)
            record.row["epsilon"] = self.info["epsilon"] = accountant.epsilon
        if self.privacy.local is not None:
            epsilons = [c.local_epsilon or 0.0 for c in self.clients.records]
            self.info["local"] = self.privacy.local.summary(epsilons)


class ResumeSave:
    """What a resume needs (``fl_ondevice.server.resume.save_round``): the global weights and
    the strategy's state, then the metrics row appended to ``metrics.csv``/``.json``, then
    ``state.json`` naming the round. The metrics are written here, between the two, so that
    ``state.json`` never names a round the metrics do not hold."""

    def __init__(self, prep: Prepared, metrics: MetricsLog) -> None:
        self.out, self.strategy, self.metrics = Path(prep.cfg.output_dir), prep.strategy, metrics

    def __call__(self, record: RoundRecord) -> None:
        save_round(self.out, record.round, record.weights, self.strategy, self.metrics, record.row)


class ProgressLine:
    """One line per round on the console: accuracy, loss, clients, seconds and the ETA."""

    def __init__(self, num_rounds: int) -> None:
        self.num_rounds = num_rounds

    def __call__(self, record: RoundRecord) -> None:
        _progress(record.row, self.num_rounds)


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


def local_columns(traffic: RoundTraffic, personalize_epochs: int) -> dict[str, Any]:
    # Spread of the evaluated clients' local accuracies; empty (NaN) with personalization off,
    # so a run without it keeps its metrics. In client order, not reply order: the mean's float
    # sum must not depend on which reply came first.
    columns: dict[str, Any] = {}
    evaluations = [traffic.evaluations[c] for c in sorted(traffic.evaluations)]
    for name, key in zip(LOCAL_ACCURACIES, (EVAL_ACCURACY, EVAL_ACCURACY_PERSONAL), strict=True):
        values = [m[key] for m in evaluations if key in m]
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
    epsilon = row.get("epsilon")
    log.info(
        "round %d/%d  accuracy %.4f  loss %.4f  train-loss %s  clients %d/%d  %.2f s  ETA %s%s%s",
        r,
        num_rounds,
        row["accuracy"],
        row["loss"],
        "n/a" if math.isnan(train_loss) else f"{train_loss:.4f}",
        row["clients_replied"],
        row["clients_sampled"],
        row["seconds"],
        _duration(eta),
        "" if epsilon is None else f"  epsilon {epsilon:.3f}",
        "  (skipped)" if row["skipped"] else "",
    )


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
