"""``python -m experiments.bench``: fl_ondevice vs a Flower + Keras peer, measured side by side."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

from experiments.bench.grid import plan
from experiments.bench.runs import CHILD_ENV, KINDS, Job, Outcome, run_job

# Before anything imports TF (breakdown runs in this process): one TF thread, as the workers.
for _key, _value in CHILD_ENV.items():
    os.environ.setdefault(_key, _value)

log = logging.getLogger("bench")
PARTS = ("sim", "breakdown", "profile", "report")
RUNS_JSONL = "sim_runs.jsonl"  # one Outcome per line, appended as jobs finish


def _csv(kind: type, text: str) -> list:
    return [kind(v) for v in text.split(",") if v]


def main() -> None:
    """Parse the options, run the chosen parts, print and save the tables."""
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__)
    p.add_argument("--parts", default="sim,breakdown,report", help=f"subset of {PARTS}")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument("--fractions", default="0.1,1.0")
    p.add_argument("--kinds", default="ours,peer", help="of ours, peer, base")
    p.add_argument(
        "--baseline",
        default=None,
        help="git commit the `base` kind runs (A/B against this checkout), from a worktree",
    )
    p.add_argument(
        "--baseline-python",
        default=None,
        help="the Python the `base` kind runs under (default: this one), e.g. a venv with the "
        "baseline's own dependencies (TF 2.18.1 before the LiteRT move)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per job; 2..R are timed")
    p.add_argument("--strategy", default="fedavg", help="conf/strategy name for `ours` jobs")
    p.add_argument("--repeats", type=int, default=1, help="runs per cell and kind (medians)")
    p.add_argument("--max-sim-seconds", type=float, default=200.0, help="skip longer jobs")
    p.add_argument("--timeout", type=float, default=900.0, help="kill a job after this")
    p.add_argument("--breakdown-clients", type=int, default=20, help="in-process updates")
    p.add_argument("--profile-job", default="mlp:100:1.0", help="MODEL:CLIENTS:FRACTION")
    p.add_argument("--out", type=Path, default=Path("experiments/bench/results"))
    p.add_argument("--conf-dir", type=Path, default=Path("conf"), help="fl_ondevice's conf/")
    p.add_argument("--fresh", action="store_true", help=f"forget earlier {RUNS_JSONL} rows")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parts = set(_csv(str, args.parts))
    args.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    if "sim" in parts:
        kinds = [k for k in _csv(str, args.kinds) if k in KINDS]
        cells = plan(
            _csv(str, args.models),
            _csv(int, args.clients),
            _csv(float, args.fractions),
            kinds,
            args.rounds,
            cores,  # Ray workers: cores / client.num_cpus (1)
            args.max_sim_seconds,
        )
        cells = [
            replace(c, job=replace(c.job, repeat=k)) for k in range(args.repeats) for c in cells
        ]
        if args.strategy != "fedavg":  # the strategy is ours alone: the peer and base run FedAvg
            cells = [
                replace(c, job=replace(c.job, strategy=args.strategy))
                if c.job.kind == "ours"
                else c
                for c in cells
            ]
        baseline = _worktree(args.baseline, args.out) if "base" in kinds else None
        run_grid(cells, args, cores, len(kinds), baseline)
    if "breakdown" in parts:
        from experiments.bench.breakdown import run_breakdown

        run_breakdown(args.out, args.conf_dir, args.breakdown_clients)
    if "profile" in parts:
        from experiments.bench.profile import run_profile

        model, n, f = args.profile_job.split(":")
        print(run_profile(args.out, args.conf_dir, Job("ours", model, int(n), float(f), 3)))
    if "report" in parts:
        from experiments.bench.report import write_report

        print(write_report(args.out, cores))


def _worktree(ref: str | None, out: Path) -> Path:
    """A git worktree of ``ref`` under ``out`` (made once, reused), for the ``base`` jobs."""
    if not ref:
        raise SystemExit("--kinds with base needs --baseline REF (a git commit to compare with)")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = (out / f"baseline-{commit}").resolve()
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], check=True)
    log.info("baseline: commit %s in %s", commit, path)
    return path


def run_grid(
    cells: list, args: argparse.Namespace, cores: int, kinds: int, baseline: Path | None
) -> None:
    """Run every planned job in order (the kinds alternate), appending to sim_runs.jsonl."""
    jsonl = args.out / RUNS_JSONL
    if args.fresh:
        jsonl.unlink(missing_ok=True)
    work = args.out / "runs"
    for cell in _interleave(cells, kinds):
        job: Job = cell.job
        name = f"{job.contender} {job.model} n={job.clients} C={job.fraction}"
        if cell.skipped:
            log.info("skip %s: %s", name, cell.skipped)
            outcome = Outcome(job, 0.0, [], float("nan"), float("nan"), float("nan"), None)
            outcome.notes.append(f"skipped: {cell.skipped}")
        else:
            log.info("run %s (estimate %.0f s) ...", name, cell.estimate_seconds)
            t0 = time.monotonic()
            outcome = run_job(
                job, work, args.conf_dir, cores, args.timeout, baseline, args.baseline_python
            )
            log.info(
                "  %s: %.1f s wall, %.3f s/round, acc %.4f, peak RSS %.0f MiB, CPU %.0f%% %s",
                name,
                time.monotonic() - t0,
                outcome.median("seconds"),
                outcome.final_accuracy,
                outcome.peak_rss_mib,
                100 * outcome.cpu_util,
                outcome.error or "",
            )
        with jsonl.open("a") as f:
            f.write(json.dumps(asdict(outcome), default=float) + "\n")


def _interleave(cells: list, kinds: int) -> list:
    # Within each (model, clients, fraction) cell, rotate which contender goes first, so a
    # slow drift of the shared machine's load does not always favour the same one.
    out = []
    for k, a in enumerate(range(0, len(cells), kinds)):
        group = cells[a : a + kinds]
        shift = k % len(group)
        out += group[shift:] + group[:shift]
    return out


if __name__ == "__main__":
    main()
