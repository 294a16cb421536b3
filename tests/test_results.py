"""Run outputs: metrics files, summaries and sweep summaries, with hand-made rows."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fl_ondevice.outputs.results import COLUMNS, MetricsLog, summarize
from fl_ondevice.outputs.sweep import record_error, sweep_summary


def _row(r: int, acc: float, seconds: float = 2.0) -> dict:
    return {
        "round": r,
        "accuracy": acc,
        "loss": 1.0 - acc,
        "train_loss": float("nan") if r == 0 else 0.5,
        "clients_sampled": 0 if r == 0 else 4,
        "bytes_down": 0 if r == 0 else 4000,
        "bytes_up": 0 if r == 0 else 3000,
        "clients_replied": 0 if r == 0 else 3,
        "clients_failed": 0 if r == 0 else 1,
        "seconds": 0.0 if r == 0 else seconds,
    }


def test_metrics_log_rewrites_csv_and_json_every_round(tmp_path):
    log = MetricsLog(tmp_path, {"target_accuracy": 0.8})
    log.append(_row(0, 0.1))
    log.append(_row(1, 0.85, seconds=3.0))

    with (tmp_path / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    doc = json.loads((tmp_path / "metrics.json").read_text())

    assert list(table[0]) == list(COLUMNS)
    assert [r["round"] for r in table] == ["0", "1"]
    assert table[0]["train_loss"] == ""  # NaN: nothing measured
    assert doc["rounds"][0]["train_loss"] is None
    assert doc["summary"]["rounds_to_target"] == 1


def test_metrics_log_rejects_unknown_columns(tmp_path):
    with pytest.raises(KeyError, match="accurcy"):
        MetricsLog(tmp_path, {}).append({"round": 0, "accurcy": 1.0})


def test_summary_numbers():
    rows = [
        {c: None for c in COLUMNS} | _row(r, acc, seconds=s)
        for r, acc, s in [(0, 0.1, 0), (1, 0.6, 2.0), (2, 0.9, 4.0), (3, 0.8, 6.0)]
    ]

    s = summarize(rows, {"target_accuracy": 0.85})

    assert s["rounds"] == 3
    assert s["final_accuracy"] == 0.8 and s["best_accuracy"] == 0.9
    assert s["rounds_to_target"] == 2
    assert math.isclose(s["seconds_per_round"], 4.0)
    assert s["download_bytes_per_client"] == 1000
    assert s["upload_bytes_per_client"] == 1500


def test_sweep_summary_lists_finished_and_failed_jobs_in_job_order(tmp_path):
    for job, n in [("0", 10), ("1", 50), ("10", 5)]:
        log = MetricsLog(tmp_path / job, {"overrides": {"num_clients": str(n)}})
        log.append(_row(0, 0.1))
        log.append(_row(1, 0.5 + n / 100))
    record_error(tmp_path / "2", {"num_clients": "100"}, ValueError("too many clients"))

    rows = sweep_summary(tmp_path)

    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert [r["num_clients"] for r in rows] == ["10", "50", "100", "5"]
    assert rows[2]["error"] == "too many clients"
    with (tmp_path / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table[1]["final_accuracy"] == "1.0"
    assert table[2]["final_accuracy"] == "" and table[2]["error"] == "too many clients"
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_summary_and_sweep_with_phones_give_simulated_hours(tmp_path):
    # Rounds of 0.5 h, 1 h and 1.5 h of device time: the target is reached after round 2.
    for job, scale in [("0", 1.0), ("1", 2.0)]:
        log = MetricsLog(tmp_path / job, {"overrides": {"x": job}, "target_accuracy": 0.85})
        for r, acc, hours in [(0, 0.1, 0.0), (1, 0.6, 0.5), (2, 0.9, 1.5), (3, 0.8, 3.0)]:
            log.append(_row(r, acc) | {"sim_elapsed_seconds": hours * 3600 * scale})

    rows = sweep_summary(tmp_path)

    assert [(r["sim_hours_to_target"], r["sim_hours"]) for r in rows] == [(1.5, 3.0), (3.0, 6.0)]
    assert (tmp_path / "accuracy_vs_sim_hours.png").stat().st_size > 0
    without = summarize([_row(0, 0.1), _row(1, 0.9)], {"target_accuracy": 0.85})
    assert without["sim_hours"] is None and without["sim_hours_to_target"] is None


def test_process_tree_rss_counts_every_process_while_threads_come_and_go():
    # metrics.csv's rss_mib walks /proc/<pid>/task/*/children. A thread that ends during the
    # walk (evaluation threads do, at the end of every round) used to drop its whole process,
    # here the test process itself, from the sum: 17% of readings under this churn.
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from fl_ondevice.processes import process_tree_rss_mib

    child = subprocess.Popen(
        [sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(60)"]
    )
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            threads = [threading.Thread(target=lambda: None) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    try:
        time.sleep(1.0)  # the child has touched its 200 MiB
        churners = [threading.Thread(target=churn) for _ in range(2)]
        for t in churners:
            t.start()
        readings = [process_tree_rss_mib() for _ in range(300)]
    finally:
        stop.set()
        child.kill()
    own = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    assert all(r is not None for r in readings)
    assert min(readings) >= 0.95 * (own + 200), (min(readings), own)
