"""Run outputs: metrics.csv/json written every round, clients.csv, plots, and sweep summaries."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
ACCURACY_PNG = "accuracy.png"
SUMMARY_CSV = "summary.csv"
SUMMARY_PNG = "summary.png"
SIM_HOURS_PNG = "accuracy_vs_sim_hours.png"  # a sweep with phones: accuracy over device time
ERROR_JSON = "error.json"  # a sweep job that stopped on bad input
CLIENTS_CSV = "clients.csv"  # one row per client: its data, rounds taken part, local accuracy
PERSONALIZATION_PNG = "personalization.png"  # personalize.epochs > 0: per-client accuracies

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
        _write_csv(self.out_dir / METRICS_CSV, COLUMNS, self.rows)
        doc = {**self.run_info, "summary": summarize(self.rows, self.run_info), "rounds": self.rows}
        tmp = self.out_dir / f"{METRICS_JSON}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=_json_default, allow_nan=False))
        os.replace(tmp, self.out_dir / METRICS_JSON)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    # Written aside and renamed: a reader (or an interrupted run) never sees half a file.
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
    sim_hours = [_hours(r.get("sim_elapsed_seconds")) for r in rows]
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


@dataclass
class ClientRecord:
    """One row of ``clients.csv``: a client's data and what it did in the run."""

    client: int
    examples: int  # local train split
    test_examples: int  # local test split
    labels: str  # the labels it holds (train and local test), e.g. "0;3;7"
    num_labels: int
    rounds: int = 0  # training rounds in which its update was valid and the round not skipped
    train_rounds: str = ""  # which ones, e.g. "2;9;14" (a resumed run keeps those it reached)
    last_eval_round: int | None = None  # the last round it was evaluated in (None: never)
    local_acc_global: float | None = None  # the global model's accuracy on its local test split
    local_acc_personal: float | None = None  # ... fine-tuned (personalize.epochs > 0)


CLIENT_COLUMNS = tuple(f.name for f in fields(ClientRecord))


def write_clients(records: Sequence[ClientRecord], path: str | os.PathLike[str]) -> None:
    """Write ``clients.csv``: one row per client, in client order."""
    rows = [{c: getattr(r, c) for c in CLIENT_COLUMNS} for r in records]
    _write_csv(Path(path), CLIENT_COLUMNS, rows)


def resumed_clients(
    records: Sequence[ClientRecord], path: str | os.PathLike[str], resumed_round: int
) -> list[ClientRecord]:
    """``records`` with what an interrupted run's ``clients.csv`` at ``path`` says about
    rounds up to ``resumed_round`` (the round the run continues after); a local accuracy from
    a later round is dropped, the one before it unknown. A missing file changes nothing."""
    if not Path(path).is_file():
        return list(records)
    with Path(path).open() as f:
        saved = {int(row["client"]): row for row in csv.DictReader(f)}
    out = []
    for record in records:
        row = saved.get(record.client)
        if row is None:
            out.append(record)
            continue
        taken = [r for r in row["train_rounds"].split(";") if r and int(r) <= resumed_round]
        evaluated = bool(row["last_eval_round"]) and int(row["last_eval_round"]) <= resumed_round
        out.append(
            replace(
                record,
                rounds=len(taken),
                train_rounds=";".join(taken),
                last_eval_round=int(row["last_eval_round"]) if evaluated else None,
                local_acc_global=_float(row["local_acc_global"]) if evaluated else None,
                local_acc_personal=_float(row["local_acc_personal"]) if evaluated else None,
            )
        )
    return out


def _float(cell: str) -> float | None:
    return float(cell) if cell else None


def plot_personalization(
    records: Sequence[ClientRecord], path: str | os.PathLike[str], title: str
) -> None:
    """ECDFs of the clients' local accuracy, global vs personalized model, at the last
    evaluation round (the clients evaluated in it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max((r.last_eval_round for r in records if r.last_eval_round is not None), default=0)
    evaluated = [r for r in records if r.last_eval_round == last]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, label, colour in (
        ("local_acc_global", "global model", "tab:blue"),
        ("local_acc_personal", "personalized", "tab:orange"),
    ):
        values = np.sort([v for r in evaluated if (v := getattr(r, name)) is not None])
        if len(values):
            shares = np.arange(1, len(values) + 1) / len(values)
            ax.step(
                values,
                shares,
                where="post",
                color=colour,
                label=f"{label}, mean {values.mean():.3f}",
            )
    ax.set_xlabel("accuracy on the client's local test split")
    ax.set_ylabel("share of clients")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{title}\nround {last}, {len(evaluated)} clients evaluated", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _hours(seconds: Any) -> float | None:
    if not isinstance(seconds, int | float) or math.isnan(seconds):
        return None
    return float(seconds) / 3600.0


def _upload_per_client(row: Mapping[str, Any]) -> float | None:
    senders = row["clients_replied"] - row.get("clients_failed", 0)
    return row["bytes_up"] / senders if senders else None


def plot_accuracy(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str
) -> None:
    """Central accuracy and loss against round, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, ax_acc = plt.subplots(figsize=(7, 4), layout="constrained")
    ax_acc.plot(
        rounds, [r["accuracy"] for r in rows], "o-", color="tab:blue", ms=3, label="accuracy"
    )
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("central test accuracy", color="tab:blue")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_loss = ax_acc.twinx()
    ax_loss.plot(rounds, [r["loss"] for r in rows], "s--", color="tab:red", ms=3, label="loss")
    ax_loss.set_ylabel("central test loss", color="tab:red")
    ax_acc.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_summary(sweep_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Collect every job's ``metrics.json`` under a sweep directory into summary.csv/png.

    One row per job: the overrides that define it, then its summary numbers. The plot shows
    final accuracy and seconds per round against the first swept key.
    """
    sweep = Path(sweep_dir)
    rows, curves = [], {}
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=_job_order)
    for job in jobs:
        if (job / METRICS_JSON).is_file():
            doc = json.loads((job / METRICS_JSON).read_text())
            summary = summarize(doc["rounds"], doc)
            rows.append({"job": job.name, **doc.get("overrides", {}), **summary})
            curves[job.name] = doc["rounds"]
        elif (job / ERROR_JSON).is_file():
            doc = json.loads((job / ERROR_JSON).read_text())
            rows.append({"job": job.name, **doc["overrides"], "error": doc["error"]})
    if not rows:
        log.warning("no %s found under %s: no sweep summary", METRICS_JSON, sweep)
        return rows
    columns = list(dict.fromkeys(k for row in rows for k in row))
    _write_csv(sweep / SUMMARY_CSV, columns, rows)
    swept = _override_keys(rows)
    _plot_sweep(rows, swept, sweep / SUMMARY_PNG)
    if any(row.get("sim_hours") is not None for row in rows):
        labels = {row["job"]: _label(row, swept) for row in rows}
        plot_sim_hours({labels[job]: r for job, r in curves.items()}, sweep / SIM_HOURS_PNG)
    log.info("sweep summary: %s", sweep / SUMMARY_CSV)
    return rows


def _label(row: Mapping[str, Any], swept: Sequence[str]) -> str:
    return ", ".join(f"{k}={row.get(k)}" for k in swept) or str(row["job"])


def plot_sim_hours(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """Central accuracy against simulated hours on the phones, one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for label, rows in curves.items():
        points = [(_hours(r.get("sim_elapsed_seconds")), r["accuracy"]) for r in rows]
        points = [(h, a) for h, a in points if h is not None and a is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", ms=2, label=label)
    ax.set_xlabel("simulated hours on the phones")
    ax.set_ylabel("central test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record_error(
    out_dir: str | os.PathLike[str], overrides: Mapping[str, Any], err: Exception
) -> None:
    """Leave ``error.json`` in a failed sweep job's directory, for the sweep summary."""
    doc = {"overrides": dict(overrides), "error": str(err)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / ERROR_JSON).write_text(json.dumps(doc, indent=1))


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def _override_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    # The overrides whose values differ between jobs (all overrides if none differ).
    summary_keys = {*summarize([], {}), "error"}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in summary_keys]
    keys.remove("job")
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    return varying or keys


def _plot_sweep(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(row, swept) for row in rows]
    x = range(len(rows))
    panels = [
        ("final_accuracy", "final central accuracy"),
        ("seconds_per_round", "seconds / round"),
    ]
    if any(row.get("rounds_to_target") is not None for row in rows):
        panels.append(("rounds_to_target", "rounds to target accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), layout="constrained")
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [row.get(key) if row.get(key) is not None else float("nan") for row in rows]
        ax.bar(x, values, color="tab:blue")
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"sweep over {', '.join(swept) or 'jobs'}")
    fig.savefig(path, dpi=120)
    plt.close(fig)
