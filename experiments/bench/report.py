"""Tables, CSV files, plots and the issue-7 targets from the benchmark's saved measurements."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from experiments.bench.runs import Job, Outcome

SIM_CSV = "simulation.csv"
COMPARE_CSV = "comparison.csv"
AB_CSV = "ab.csv"  # this checkout vs the --baseline commit
AB_LIMIT = 1.10  # issue 12: FedAvg's round time within 10% of the code before it
TARGETS_CSV = "targets.csv"
ROUND_PNG = "round_time.png"
RSS_PNG = "peak_rss.png"
BUSY = 0.9  # "both cores busy": CPU seconds / wall / cores of the whole tree, rounds 2..R


def load_outcomes(out: Path) -> dict[tuple, Outcome]:
    """The latest outcome of each job in sim_runs.jsonl (a re-run replaces an earlier row)."""
    found: dict[tuple, Outcome] = {}
    path = out / "sim_runs.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        d = json.loads(line)
        job = Job(**d.pop("job"))
        o = Outcome(job=job, **d)
        found[(job.model, job.clients, job.fraction, job.contender, job.repeat)] = o
    return found


def sim_row(o: Outcome, cores: int) -> dict[str, Any]:
    """One line of simulation.csv: medians over rounds 2..R and the per-update split."""
    j = o.job
    status = "; ".join(o.notes) or o.error or "ok"
    row: dict[str, Any] = {"model": j.model, "clients": j.clients, "fraction": j.fraction}
    row |= {"contender": j.contender, "rounds": j.rounds, "status": status}
    if o.error or not o.rows:
        return row
    updates = o.median("clients_replied")
    s = o.median("seconds")
    client, train = o.median("client_seconds"), o.median("train_seconds")
    # Central evaluation is the server's per-round work, not part of any update.
    central = o.median("eval_seconds")
    central = 0.0 if math.isnan(central) else central  # runs saved before it was recorded
    # Wall time one update occupies a worker: round seconds x busy workers / updates.
    share = (s - central) * min(cores, updates) / updates
    row |= {
        "updates_per_round": int(updates),
        "s_per_round": s,
        "central_eval_s": central,
        "updates_per_s": o.updates_per_second,
        "final_accuracy": o.final_accuracy,
        "peak_rss_mib": max(float(r["rss_mib"]) for r in o.rows if r.get("rss_mib") != ""),
        "peak_rss_sampled_mib": o.peak_rss_mib,
        "cpu_util": o.cpu_util,
        "worker_cpu_util": o.worker_cpu_util,
        "client_ms": 1e3 * client,
        "train_ms": 1e3 * train,
        "in_client_overhead_ms": 1e3 * (client - train),
        "messaging_ms": 1e3 * (share - client),
        "non_train_ms": 1e3 * (share - train),
        "job_wall_s": o.wall_seconds,
    }
    return row


def write_report(out: Path, cores: int) -> str:
    """Write simulation.csv, comparison.csv, targets.csv and the plots; return markdown tables.

    Longer than a screen on purpose: it lists the report's files and tables in the order the
    report shows them; each computation is a helper of its own.
    """
    outcomes = load_outcomes(out)
    rows = _merge_repeats([sim_row(o, cores) for o in outcomes.values()])
    rows.sort(key=lambda r: (r["model"], r["clients"], r["fraction"], r["contender"]))
    _write_csv(out / SIM_CSV, rows)
    by = {(r["model"], r["clients"], r["fraction"], r["contender"]): r for r in rows}
    compare = []
    for (model, n, f, kind), r in by.items():
        if kind != "ours":
            continue
        p = by.get((model, n, f, "peer"), {})
        compare.append(
            {
                "model": model,
                "clients": n,
                "fraction": f,
                "ours_s_per_round": r.get("s_per_round", math.nan),
                "peer_s_per_round": p.get("s_per_round", math.nan),
                "ratio": r.get("s_per_round", math.nan) / p.get("s_per_round", math.nan),
                "ours_accuracy": r.get("final_accuracy", math.nan),
                "peer_accuracy": p.get("final_accuracy", math.nan),
                "ours_updates_per_s": r.get("updates_per_s", math.nan),
                "peer_updates_per_s": p.get("updates_per_s", math.nan),
                "ours_status": r["status"],
                "peer_status": p.get("status", "not run"),
            }
        )
    _write_csv(out / COMPARE_CSV, compare)
    ab = _ab_rows(by)
    if ab:
        _write_csv(out / AB_CSV, ab)
    targets = issue_targets(by, compare) + _ab_targets(ab)
    _write_csv(out / TARGETS_CSV, targets)
    _plots(out, rows, compare)
    breakdown = out / "breakdown.csv"
    text = [
        "## Simulation: ours vs peer (median s/round over rounds 2..R)",
        _md(
            compare,
            [
                "model",
                "clients",
                "fraction",
                "ours_s_per_round",
                "peer_s_per_round",
                "ratio",
                "ours_updates_per_s",
                "peer_updates_per_s",
                "ours_accuracy",
                "peer_accuracy",
                "ours_status",
                "peer_status",
            ],
        ),
        "## Per run: memory, CPU, per-update split (ms)",
        _md(
            rows,
            [
                "model",
                "clients",
                "fraction",
                "contender",
                "updates_per_round",
                "peak_rss_mib",
                "cpu_util",
                "worker_cpu_util",
                "client_ms",
                "train_ms",
                "central_eval_s",
                "in_client_overhead_ms",
                "messaging_ms",
                "non_train_ms",
            ],
        ),
        "## A/B: this checkout vs the --baseline commit (median s/round over rounds 2..R)",
        _md(
            ab,
            [
                "model",
                "clients",
                "fraction",
                "ours_s_per_round",
                "base_s_per_round",
                "ratio",
                "ours_s_per_round_all",
                "base_s_per_round_all",
                "ours_peak_rss_mib",
                "base_peak_rss_mib",
                "rss_ratio",
                "ours_accuracy",
                "base_accuracy",
            ],
        ),
        "## Targets (issues 7 and 12)",
        _md(targets, ["target", "where", "measured", "limit", "verdict"]),
    ]
    if breakdown.is_file():
        with breakdown.open() as f:
            text += [
                "## In-process per-update breakdown (ms)",
                _md(
                    list(csv.DictReader(f)),
                    ["model", "contender", "piece", "median_ms", "p25_ms", "p75_ms", "updates"],
                ),
            ]
    return "\n\n".join(text)


def _merge_repeats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, clients, fraction, contender): the median of each number over the
    repeated jobs of that cell (``repeats`` says how many; ``s_per_round_all`` lists them)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["clients"], r["fraction"], r["contender"]), []).append(r)
    merged = []
    for group in groups.values():
        row = dict(group[0])
        ok = [r for r in group if "s_per_round" in r]
        for key, value in group[0].items():
            if isinstance(value, int | float) and key not in ("clients", "fraction", "rounds"):
                values = [float(r[key]) for r in ok if key in r and not math.isnan(float(r[key]))]
                row[key] = statistics.median(values) if values else math.nan
        row["repeats"] = len(ok)
        row["s_per_round_all"] = " ".join(f"{r['s_per_round']:.3f}" for r in ok)
        merged.append(row)
    return merged


def _ab_rows(by: dict) -> list[dict[str, Any]]:
    rows = []
    for (model, n, f, kind), r in by.items():
        b = by.get((model, n, f, "base"))
        if kind != "ours" or b is None:
            continue
        rows.append(
            {
                "model": model,
                "clients": n,
                "fraction": f,
                "ours_s_per_round": r.get("s_per_round", math.nan),
                "base_s_per_round": b.get("s_per_round", math.nan),
                "ratio": r.get("s_per_round", math.nan) / b.get("s_per_round", math.nan),
                "ours_peak_rss_mib": r.get("peak_rss_mib", math.nan),
                "base_peak_rss_mib": b.get("peak_rss_mib", math.nan),
                "rss_ratio": r.get("peak_rss_mib", math.nan) / b.get("peak_rss_mib", math.nan),
                "ours_accuracy": r.get("final_accuracy", math.nan),
                "base_accuracy": b.get("final_accuracy", math.nan),
                "ours_s_per_round_all": r.get("s_per_round_all", ""),
                "base_s_per_round_all": b.get("s_per_round_all", ""),
            }
        )
    return rows


def _ab_targets(ab: list[dict]) -> list[dict[str, Any]]:
    t = []
    for r in ab:
        cell = (r["model"], r["clients"])
        if cell in {("mlp", 10), ("mlp", 100), ("mlp", 1000), ("cnn", 10), ("cnn", 100)}:
            ok = r["ratio"] <= AB_LIMIT
            t.append(
                {
                    "target": "round time / baseline commit",
                    "where": f"{r['model']} n={r['clients']} C={r['fraction']}",
                    "measured": r["ratio"],
                    "limit": AB_LIMIT,
                    "verdict": "n/a" if math.isnan(r["ratio"]) else ("PASS" if ok else "FAIL"),
                }
            )
    return t


def issue_targets(by: dict, compare: list[dict]) -> list[dict[str, Any]]:
    """The issues' performance targets checked against the measured ratios: one row per target
    and place, with its verdict (PASS, FAIL, n/a)."""
    t: list[dict[str, Any]] = []

    def add(target: str, where: str, measured: float, limit: float, le: bool = True) -> None:
        ok = measured <= limit if le else measured >= limit
        verdict = "n/a" if math.isnan(measured) else ("PASS" if ok else "FAIL")
        t.append(
            {
                "target": target,
                "where": where,
                "measured": measured,
                "limit": limit,
                "verdict": verdict,
            }
        )

    for c in compare:
        if c["model"] == "mlp" and c["clients"] in (10, 100):
            add("mlp round time / peer", f"n={c['clients']} C={c['fraction']}", c["ratio"], 0.5)
        if c["model"] == "cnn":
            add("cnn round time / peer", f"n={c['clients']} C={c['fraction']}", c["ratio"], 1.0)
    for f in (0.1, 1.0):
        r = by.get(("mlp", 100, f, "ours"), {})
        add("mlp non-train ms per update", f"n=100 C={f}", r.get("non_train_ms", math.nan), 5.0)
    for model in ("mlp", "cnn"):
        for f in (0.1, 1.0):
            small, big = by.get((model, 10, f, "ours"), {}), by.get((model, 1000, f, "ours"), {})
            if "peak_rss_mib" in small and "peak_rss_mib" in big:
                ratio = big["peak_rss_mib"] / small["peak_rss_mib"]
                add("peak RSS 1000 / 10 clients", f"{model} C={f}", ratio, 1.3)
    for (model, n, f, kind), r in by.items():
        if kind == "ours" and r.get("updates_per_round", 0) >= 10:
            add("both cores busy (CPU util)", f"{model} n={n} C={f}", r["cpu_util"], BUSY, le=False)
    return t


def _plots(out: Path, rows: list[dict], compare: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compare = [c for c in compare if not math.isnan(c["ours_s_per_round"])]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{c['model']} n={c['clients']} C={c['fraction']}" for c in compare]
    xs = range(len(compare))
    ax.bar([x - 0.2 for x in xs], [c["ours_s_per_round"] for c in compare], 0.4, label="ours")
    ax.bar([x + 0.2 for x in xs], [c["peer_s_per_round"] for c in compare], 0.4, label="Keras peer")
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median s / round (rounds 2..R)")
    ax.set_title("Round time, same run, 2 Ray workers (missing bar = skipped)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / ROUND_PNG, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in rows}):
        for f in sorted({r["fraction"] for r in rows}):
            for kind in ("ours", "peer"):
                pts = sorted(
                    (r["clients"], r["peak_rss_mib"])
                    for r in rows
                    if (r["model"], r["fraction"], r["contender"]) == (model, f, kind)
                    and "peak_rss_mib" in r
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        "o-" if kind == "ours" else "s--",
                        label=f"{kind} {model} C={f}",
                    )
    ax.set_xscale("log")
    ax.set_xlabel("clients")
    ax.set_ylabel("peak RSS of the process tree (MiB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / RSS_PNG, dpi=120)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) >= 2:
        return str(int(v))  # counts, and times of 2 s and more to the second
    if isinstance(v, float):
        return "" if math.isnan(v) else (f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}")
    return str(v)


def _md(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(_num(r.get(c, ""))) for c in cols) + " |")
    return "\n".join(lines)


def _num(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
