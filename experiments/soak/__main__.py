"""Soak-run report: rounds lost or skipped, faults injected, and RSS against round (PNG + JSON)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="experiments/soak/run", help="the soak run directory")
    args = parser.parse_args()
    run = Path(args.run)
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    rounds = np.array([int(r["round"]) for r in rows[1:]])
    rss = np.array([float(r["rss_mib"]) for r in rows[1:]])
    late = rss[len(rss) // 4 :]  # after warm-up: the first quarter fills caches and pools
    slope = float(np.polyfit(rounds[len(rss) // 4 :], late, 1)[0]) if len(late) > 1 else 0.0
    report = {
        "rounds_recorded": len(rounds),
        "rounds_expected": int(
            json.loads((run / "metrics.json").read_text())["config"]["num_rounds"]
        ),
        "rounds_missing": sorted(set(range(1, int(rounds.max()) + 1)) - set(rounds.tolist())),
        "rounds_skipped": int(sum(int(r["skipped"]) for r in rows[1:])),
        "clients_sampled": int(sum(int(r["clients_sampled"]) for r in rows[1:])),
        "clients_dropped": int(sum(int(r["clients_dropped"]) for r in rows[1:])),
        "clients_failed": int(sum(int(r["clients_failed"]) for r in rows[1:])),
        "clients_rejected": int(sum(int(r["clients_rejected"]) for r in rows[1:])),
        "final_accuracy": float(rows[-1]["accuracy"]),
        "rss_mib_first": float(rss[0]),
        "rss_mib_after_warmup": float(late[0]),
        "rss_mib_last": float(rss[-1]),
        "rss_mib_max": float(rss.max()),
        "rss_mib_per_100_rounds_after_warmup": 100 * slope,
        "seconds_total": float(rows[-1]["elapsed_seconds"]),
    }
    (run.parent / "soak.json").write_text(json.dumps(report, indent=1))
    _plot(rounds, rss, [float(r["accuracy"]) for r in rows[1:]], run.parent / "soak_rss.png")
    for key, value in report.items():
        print(f"{key:38s} {value}")


def _plot(rounds: np.ndarray, rss: np.ndarray, accuracy: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.plot(rounds, rss, color="tab:purple")
    ax.set_xlabel("round")
    ax.set_ylabel("RSS of the whole simulation (MiB)", color="tab:purple")
    ax.set_ylim(0, rss.max() * 1.15)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(rounds, accuracy, color="tab:blue", alpha=0.6)
    twin.set_ylabel("central accuracy", color="tab:blue")
    twin.set_ylim(0, 1)
    ax.set_title("soak: 100 clients, dropout 0.2, failure 0.05")
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
