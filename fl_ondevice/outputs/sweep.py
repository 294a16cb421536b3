"""A sweep's summary: every job's metrics in ``summary.csv`` and its plots; a failed job's error."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_ondevice.outputs.results import METRICS_JSON, summarize, to_hours, write_csv

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_PNG = "summary.png"
SIM_HOURS_PNG = "accuracy_vs_sim_hours.png"  # a sweep with phones: accuracy over device time
ERROR_JSON = "error.json"  # a sweep job that stopped on bad input


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
    write_csv(sweep / SUMMARY_CSV, columns, rows)
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
        points = [(to_hours(r.get("sim_elapsed_seconds")), r["accuracy"]) for r in rows]
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
