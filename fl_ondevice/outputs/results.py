"""The metrics of a run: metrics.csv/json rewritten every round, and their summary."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"

# The local accuracy columns: the clients' accuracy on their local test splits, of the global
# model ("global") and of it fine-tuned locally for personalize.epochs ("personal"), spread
# over the clients evaluated in the round.
LOCAL_ACCURACIES = ("local_acc_global", "local_acc_personal")
SPREAD = ("mean", "p10", "median", "p90")

# One row per round (round 0 = the initial global model, before any training).
COLUMNS = (
    "round",
    "accuracy",  # central test accuracy of the global model (infer signature)
    "loss",  # central test cross-entropy
    "train_loss",  # clients' mean local training loss, weighted by num-examples
    "client_eval_accuracy",  # clients' local-test accuracy (when strategy.fraction_evaluate > 0)
    "clients_sampled",
    "clients_dropped",  # sampled, never replied (client.dropout_rate; a phone gone offline)
    "clients_replied",  # replies received, crashes included
    "clients_failed",  # replies reporting a crash
    "clients_rejected",  # updates that failed validation (names, shapes, dtypes, NaN, examples)
    "clients_stragglers",  # phones whose update came after the round closed (round.*)
    "clients_unavailable",  # phones offline when the round started (device online_hours)
    "skipped",  # 1 if fewer than strategy.min_train_nodes valid updates: global model kept
    "examples",  # training examples behind this round's aggregate
    "examples_loaded",  # run through the model's `load` (personalization layout: once a run)
    "bytes_down",  # global weights sent to the sampled clients
    "bytes_up",  # valid updates received, as sent (in client.update_encoding)
    "client_seconds",  # median seconds of one client update (restore, train, save, I/O)
    "train_seconds",  # median seconds inside the train signature per client update
    "seconds",  # wall time of the round, central evaluation included
    "eval_seconds",  # of which the server's central evaluation
    "elapsed_seconds",
    "rss_mib",  # resident memory of the whole simulation (driver, Ray, workers)
    # With phones (device=...): simulated seconds of the round (waiting for phones to come
    # online, then until the round closed) and since the run started; empty without.
    "sim_round_seconds",
    "sim_elapsed_seconds",
    # With personalize.epochs > 0, in rounds with client evaluation: mean, 10th percentile,
    # median and 90th percentile over the evaluated clients; empty otherwise.
    *(f"{name}_{stat}" for name in LOCAL_ACCURACIES for stat in SPREAD),
    # With a central DP strategy (strategy=dp_*): the epsilon at dp.delta of every round so far
    # (fl_ondevice.server.privacy); empty otherwise.
    "epsilon",
)
# Columns that differ between two runs of one seed (timings, memory); all others must not.
TIME_COLUMNS = frozenset(
    {"client_seconds", "train_seconds", "seconds", "eval_seconds", "elapsed_seconds", "rss_mib"}
)


class MetricsLog:
    """Collects one row per round and rewrites ``metrics.csv`` and ``metrics.json`` each time.

    Rewriting after every round means an interrupted run keeps every completed round.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        run_info: Mapping[str, Any],
        rows: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_info = dict(run_info)
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]  # a resumed run's rounds

    def append(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown metrics columns {sorted(unknown)}")
        # NaN (nothing measured, e.g. round 0's train loss) is stored as None: JSON null, empty cell
        self.rows.append({c: _none_if_nan(row.get(c)) for c in COLUMNS})
        self.write()

    def write(self) -> None:
        write_csv(self.out_dir / METRICS_CSV, COLUMNS, self.rows)
        doc = {**self.run_info, "summary": summarize(self.rows, self.run_info), "rounds": self.rows}
        tmp = self.out_dir / f"{METRICS_JSON}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=_json_default, allow_nan=False))
        os.replace(tmp, self.out_dir / METRICS_JSON)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` as CSV with a header of ``columns``: aside, then renamed, so that a reader
    (or an interrupted run) never sees half a file; a float with full precision, None empty."""
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k)) for k in columns} for row in rows)
    os.replace(tmp, path)


def _none_if_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)  # full precision: reruns are compared cell by cell
    return "" if value is None else value


def _json_default(value: Any) -> Any:
    return str(value)


def summarize(rows: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any]) -> dict[str, Any]:
    """Final accuracy, best accuracy, rounds to the target accuracy, seconds per round."""
    trained = [r for r in rows if r["round"] > 0]
    target = run_info.get("target_accuracy")
    reached = next(
        (r["round"] for r in trained if target and (r["accuracy"] or 0.0) >= target), None
    )
    sim_hours = [to_hours(r.get("sim_elapsed_seconds")) for r in rows]
    return {
        "rounds": len(trained),
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "best_accuracy": max((r["accuracy"] for r in rows), default=None),
        "target_accuracy": target,
        "rounds_to_target": reached,
        # Median: round 1 also pays the engine's start-up (worker processes importing TF).
        "seconds_per_round": (
            float(statistics.median(r["seconds"] for r in trained)) if trained else None
        ),
        # What one client downloads (the global model) and uploads (its update) per round.
        "download_bytes_per_client": (
            trained[-1]["bytes_down"] / max(trained[-1]["clients_sampled"], 1) if trained else None
        ),
        "upload_bytes_per_client": _upload_per_client(trained[-1]) if trained else None,
        # With phones: simulated hours of the whole run, and until the target was reached.
        "sim_hours": sim_hours[-1] if rows else None,
        "sim_hours_to_target": (
            sim_hours[[r["round"] for r in rows].index(reached)] if reached else None
        ),
        # With personalize.epochs > 0: the clients' mean local accuracy, global vs personalized.
        **_final_local(rows),
        # With DP: the final epsilon (at run_info's privacy.delta) and the clients' local ones.
        **_privacy(rows, run_info),
    }


def _privacy(rows: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any]) -> dict[str, Any]:
    privacy, local = run_info.get("privacy") or {}, (run_info.get("privacy") or {}).get("local")
    return {
        "epsilon": rows[-1].get("epsilon") if rows else None,
        "delta": privacy.get("delta"),
        "stopped_before_round": privacy.get("stopped_before_round"),  # by dp.max_epsilon
        "local_epsilon_max": local["epsilon_max"] if local else None,
        "local_epsilon_median": local["epsilon_median"] if local else None,
    }


def _final_local(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    # The last round with local accuracies: global vs personalized mean over its clients.
    last = next((r for r in reversed(rows) if r.get("local_acc_global_mean") is not None), None)
    return {
        "final_local_round": None if last is None else last["round"],
        **{f"final_{n}": None if last is None else last.get(f"{n}_mean") for n in LOCAL_ACCURACIES},
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """``mean``, ``p10``, ``median``, ``p90`` of ``values`` (NumPy's linear interpolation
    between order statistics); NaN for each when there are none."""
    if not len(values):
        return dict.fromkeys(SPREAD, float("nan"))
    a = np.asarray(values, dtype=np.float64)
    p10, median, p90 = np.percentile(a, [10, 50, 90])
    return {"mean": float(a.mean()), "p10": float(p10), "median": float(median), "p90": float(p90)}


def summary_line(summary: dict[str, Any], out_dir: str) -> str:
    """One line a researcher reads at the end of a run."""
    parts = [
        f"final accuracy {summary['final_accuracy']:.4f}",
        f"best {summary['best_accuracy']:.4f}",
        f"{summary['rounds']} rounds",
        f"{summary['seconds_per_round']:.2f} s/round",
    ]
    if summary.get("sim_hours") is not None:
        parts.append(f"{sim_time(summary['sim_hours'])} on the phones")
    if summary.get("final_local_acc_personal") is not None:
        parts.append(
            f"local accuracy {summary['final_local_acc_global']:.4f} global -> "
            f"{summary['final_local_acc_personal']:.4f} personalized "
            f"(round {summary['final_local_round']})"
        )
    if summary.get("epsilon") is not None:
        parts.append(f"epsilon {summary['epsilon']:.3f} at delta {summary['delta']:.3g}")
    if summary.get("stopped_before_round") is not None:
        parts.append(f"stopped by dp.max_epsilon before round {summary['stopped_before_round']}")
    if summary.get("local_epsilon_max") is not None:
        parts.append(f"local epsilon <= {summary['local_epsilon_max']:.3f}")
    if summary.get("target_accuracy"):
        reached, hours = summary["rounds_to_target"], summary.get("sim_hours_to_target")
        parts.append(
            f"target {summary['target_accuracy']} reached in round {reached}"
            + (f" after {sim_time(hours)}" if hours is not None else "")
            if reached
            else f"target {summary['target_accuracy']} not reached"
        )
    return f"fl_ondevice: {', '.join(parts)} -> {out_dir}"


def sim_time(hours: float) -> str:
    """Simulated time for a reader: ``2.41 h`` or, under an hour, ``12.3 min``."""
    return f"{hours:.2f} h" if hours >= 1.0 else f"{hours * 60:.1f} min"


def to_hours(seconds: Any) -> float | None:
    """``seconds`` (a metrics cell) in hours; None when not a number (no device time)."""
    if not isinstance(seconds, int | float) or math.isnan(seconds):
        return None
    return float(seconds) / 3600.0


def _upload_per_client(row: Mapping[str, Any]) -> float | None:
    senders = row["clients_replied"] - row.get("clients_failed", 0)
    return row["bytes_up"] / senders if senders else None
