"""Process-level costs of fl_ondevice, measured side by side for several variants.

A variant is ``NAME=PYTHON:CHECKOUT``: a venv's interpreter and a checkout of this repository
(e.g. a git worktree of an older commit); its children run with cwd and PYTHONPATH = CHECKOUT
and FLWR_TELEMETRY_ENABLED=0.

- ``import``: wall time of importing the ClientApp's module in a fresh process
  (``fl_ondevice.client.client_app``; ``fl_ondevice.client_app`` in checkouts before issue 23)
  (``in_process_s``: the import alone), whether ``tensorflow`` ended up in sys.modules, and
  which fl_ondevice was imported (both venvs may hold an editable install of some checkout).
- ``memory``: ``python -m fl_ondevice.simulate dataset=fashion_mnist num_clients=100
  strategy.fraction_train=1.0 num_rounds=R`` (R=3), its process tree sampled from /proc every
  0.25 s: peak RSS of the tree, also before the driver mapped TensorFlow, and when it did; the
  driver's; each Ray ClientAppActor's and whether it mapped TF; metrics.csv's seconds, rss_mib.
- ``deploy``: ``python -m fl_ondevice.deploy num_nodes=4 num_rounds=R`` (R=5; digits, mlp), the
  venv's bin first on PATH (Flower's CLIs): seconds per round from metrics.csv, and the
  per-message ``flwr-clientapp`` processes: how many, how many mapped TF, peak RSS, lifetime.

    python -m experiments.bench.processes import --repeats 10 \\
        --variant base=/work/venvs/base/bin/python:/work/base \\
        --variant ours=/work/venvs/new311/bin/python:/work/main
    python -m experiments.bench.processes memory --rounds 3 --repeats 3 --variant ... --variant ...
    python -m experiments.bench.processes deploy --rounds 5 --repeats 3 --variant ... --variant ...

Variants run interleaved, their order rotated each repeat (AB, BA, ...). memory and deploy give
each variant a cache_dir under --out, warmed by an unmeasured one-round run (so the model
conversion is cached) unless --no-warm. Each measured run appends a JSON line to OUT/MODE.jsonl
(run directories and child logs: OUT/runs/); at the end, one markdown table per variant: median
and min–max over the repeats, and its median / the first variant's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from experiments.bench.procstat import tree_stat

ROUNDS = {"memory": 3, "deploy": 5}
REPEATS = {"import": 5, "memory": 3, "deploy": 3}
MODULE_ARGS = {  # python -m ...
    "memory": "fl_ondevice.simulate dataset=fashion_mnist num_clients=100".split()
    + ["strategy.fraction_train=1.0"],
    "deploy": ["fl_ondevice.deploy", "num_nodes=4"],
}
MARKER = {"memory": "ClientAppActor", "deploy": "flwr-clientapp"}  # in a client's cmdline
IMPORT_CHILD = (
    "import json, pathlib, sys, time; t = time.perf_counter(); import fl_ondevice; "
    "new = pathlib.Path(fl_ondevice.__file__).with_name('client').is_dir(); "
    "__import__('fl_ondevice.client.client_app' if new else 'fl_ondevice.client_app'); "
    "print(json.dumps({'in_process_s': time.perf_counter() - t, "
    "'tensorflow': 'tensorflow' in sys.modules, 'module': fl_ondevice.__file__}))"
)
TF_DIR = "/tensorflow/"  # in /proc/PID/maps: a file of TF's package (LiteRT's: ai_edge_litert/)
SAMPLE_SECONDS = 0.25
NOT_TABULATED = ("commit", "repeat", "position", "rounds")


@dataclass(frozen=True)
class Variant:
    variant: str  # its name
    python: Path  # not resolved: a venv's python is a symlink out of the venv
    checkout: Path
    commit: str | None  # git describe --dirty of the checkout

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, rest = text.partition("=")
        python, _, checkout = rest.partition(":")
        if not (name and os.access(python, os.X_OK) and Path(checkout, "fl_ondevice").is_dir()):
            raise argparse.ArgumentTypeError(f"no NAME=PYTHON:CHECKOUT of fl_ondevice: {text!r}")
        git = ["git", "-C", checkout, "describe", "--always", "--dirty"]
        commit = subprocess.run(git, capture_output=True, text=True).stdout.strip() or None
        return cls(name, Path(os.path.abspath(python)), Path(checkout).resolve(), commit)

    def env(self, venv_bin: bool) -> dict[str, str]:
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(self.checkout)}
        if venv_bin:  # as with the venv activated: its flower-superlink, flwr, ...
            env["PATH"] = f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}"
        return env


def fail(message: str, log: Path) -> NoReturn:
    """A child went wrong: show the end of its output, and stop with ``message``."""
    print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
    sys.exit(f"error: {message} (its output: {log})")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:  # the process ended while we looked
        return ""


def run_child(mode: str, v: Variant, cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` for ``v``; memory and deploy sample its process tree until it exits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    peak = peak_before = root = root_before = 0.0
    tf_at, clients = None, {}  # pid -> [peak MiB, mapped TF, first seen, last seen]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=v.checkout, env=v.env(mode == "deploy"), stdout=out, stderr=subprocess.STDOUT
        )
        while mode != "import" and proc.poll() is None:
            t, stat = time.monotonic() - t0, tree_stat(proc.pid)
            if tf_at is None and TF_DIR in _read(f"/proc/{proc.pid}/maps"):
                tf_at = t
            peak = max(peak, sum(rss for _, _, rss in stat.values()))
            root = max(root, stat.get(proc.pid, ("", 0, 0.0))[2])
            if tf_at is None:
                peak_before, root_before = peak, root
            for pid, (_, _, rss) in stat.items():
                if pid != proc.pid and MARKER[mode] in _read(f"/proc/{pid}/cmdline"):
                    c = clients.setdefault(pid, [0.0, False, t, t])
                    c[0], c[3] = max(c[0], rss), t
                    c[1] = c[1] or TF_DIR in _read(f"/proc/{pid}/maps")
            time.sleep(SAMPLE_SECONDS)
        proc.wait()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        fail(f"{v.variant}: the {mode} child exited with {proc.returncode}", log)
    if mode == "import":
        lines = log.read_text(errors="replace").splitlines()  # stderr's too: take ours
        return {"wall_s": wall, **json.loads([x for x in lines if x.startswith("{")][-1])}
    peaks = sorted(round(c[0]) for c in clients.values())
    lifetimes = [c[3] - c[2] for c in clients.values()]
    return {
        "wall_s": wall,
        "peak_tree_mib": peak,
        "peak_tree_before_driver_tf_mib": peak_before,
        "driver_tf_at_s": tf_at,
        "peak_driver_mib": root,
        "peak_driver_before_tf_mib": root_before,
        "clients": len(clients),
        "clients_with_tf": sum(c[1] for c in clients.values()),
        "client_peak_mib": max(peaks, default=None),
        "client_median_lifetime_s": statistics.median(lifetimes) if lifetimes else None,
        "client_peaks_mib": peaks,
    }


def measure(mode: str, v: Variant, run_dir: Path, cache: Path, rounds: int) -> dict[str, Any]:
    """One run of ``mode`` for ``v``: its numbers (lists are kept in the JSON, not tabulated)."""
    log = Path(f"{run_dir}.log")
    if mode == "import":
        return run_child(mode, v, [str(v.python), "-c", IMPORT_CHILD], log)
    cmd = [str(v.python), "-m", *MODULE_ARGS[mode], f"num_rounds={rounds}"]
    result = run_child(mode, v, [*cmd, f"hydra.run.dir={run_dir}", f"cache_dir={cache}"], log)
    if not (run_dir / "metrics.csv").is_file():
        fail(f"{v.variant}: the {mode} child left no {run_dir / 'metrics.csv'}", log)
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))[1:]  # round 0 is the initial model
    seconds = [float(r["seconds"]) for r in rows]
    return {
        "rounds": rounds,
        "round_1_s": seconds[0],
        "median_round_s": statistics.median(seconds),
        "median_round_2_on_s": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
        "final_rss_mib": float(rows[-1]["rss_mib"]),
        "final_accuracy": float(rows[-1]["accuracy"]),
        **result,
        "round_seconds": seconds,
        "rss_mib_by_round": [float(r["rss_mib"]) for r in rows],
    }


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def tables(mode: str, variants: list[Variant], rows: dict[str, list[dict[str, Any]]]) -> str:
    """One markdown table per variant: median, min–max, and median / the first variant's;
    a dash where a run had no value (``driver_tf_at_s``: TF never mapped)."""

    def values(name: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows[name] if type(r.get(key)) in (int, float, bool)]

    keys = dict.fromkeys(k for rs in rows.values() for r in rs for k in r if k not in NOT_TABULATED)
    numeric = (int, float, bool, type(None))  # None: nothing seen, e.g. the driver never had TF
    keys = [k for k in keys if all(type(r.get(k)) in numeric for rs in rows.values() for r in rs)]
    ref, out = variants[0].variant, []
    for v in variants:
        n = len(rows[v.variant])
        out += [f"\n### {mode}: {v.variant} ({v.python}, {v.checkout} @ {v.commit}), {n} runs\n"]
        out += [f"| {mode} | median | min–max | / {ref} |", "|---|---:|---:|---:|"]
        for key in keys:
            xs, base = values(v.variant, key), values(ref, key)
            if not xs:
                out.append(f"| {key} | – | – | – |")
                continue
            med, ref_med = statistics.median(xs), statistics.median(base) if base else 0.0
            note = "" if len(xs) == n else f" ({len(xs)}/{n} runs)"
            ratio = f"{med / ref_med:.2f}" if ref_med else "–"
            out.append(f"| {key} | {_fmt(med)}{note} | {_fmt(min(xs))}–{_fmt(max(xs))} | {ratio} |")
    return "\n".join(out)


def main() -> None:
    """Parse the options, run the variants interleaved, append JSON lines, print the tables."""
    p = argparse.ArgumentParser(
        "python -m experiments.bench.processes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", choices=REPEATS)
    about = "NAME=PYTHON:CHECKOUT, repeatable; the first is the ratios' reference"
    p.add_argument("--variant", type=Variant.parse, action="append", required=True, help=about)
    p.add_argument("--repeats", type=int, default=None, help=f"measured runs each; {REPEATS}")
    p.add_argument("--rounds", type=int, default=None, help=f"num_rounds; {ROUNDS}")
    p.add_argument("--out", type=Path, default=Path("experiments/bench/results_processes"))
    p.add_argument("--no-warm", action="store_true", help="no unmeasured first run per variant")
    args = p.parse_args()
    mode, variants, out = args.mode, args.variant, args.out.resolve()
    if len({v.variant for v in variants}) < len(variants):
        p.error("variant names must differ")
    rounds, repeats = args.rounds or ROUNDS.get(mode, 0), args.repeats or REPEATS[mode]
    rows: dict[str, list[dict[str, Any]]] = {v.variant: [] for v in variants}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for v in variants if mode != "import" and not args.no_warm else []:
        print(f"[{mode}] warming {v.variant} (1 round, unmeasured)", file=sys.stderr, flush=True)
        run_dir = out / "runs" / f"{mode}-{stamp}-{v.variant}-warm"
        measure(mode, v, run_dir, out / "cache" / v.variant, 1)
    for i in range(repeats):
        for pos, v in enumerate(variants[i % len(variants) :] + variants[: i % len(variants)]):
            run_dir = out / "runs" / f"{mode}-{stamp}-{v.variant}-{i}"
            result = measure(mode, v, run_dir, out / "cache" / v.variant, rounds)
            now = time.strftime("%Y-%m-%dT%H:%M:%S")
            rows[v.variant].append(
                {**asdict(v), "repeat": i, "position": pos, "time": now, **result}
            )
            with (out / f"{mode}.jsonl").open("a") as f:
                f.write(json.dumps(rows[v.variant][-1], default=str) + "\n")
            print(f"[{mode}] {v.variant} repeat {i}: {result['wall_s']:.2f} s", file=sys.stderr)
    print(tables(mode, variants, rows))


if __name__ == "__main__":
    main()
