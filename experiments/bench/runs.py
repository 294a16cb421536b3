"""One simulation (ours or the Keras peer) in a fresh child process, sampled from outside."""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from experiments.bench.procstat import TreeSampler

# Both contenders get fl_ondevice/simulate.py's thread settings: one TF thread per Ray worker.
CHILD_ENV = {
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
# ours: this checkout; peer: the Flower + Keras peer; base: fl_ondevice at another git commit
# (--baseline REF), run from its own worktree for an A/B comparison in one run.
KINDS = ("ours", "peer", "base")


@dataclass(frozen=True)
class Job:
    """One cell of the grid: who runs which model on how many clients."""

    kind: str  # "ours", "peer" or "base"
    model: str
    clients: int
    fraction: float
    rounds: int
    seed: int = 0
    local_epochs: int = 1
    batch_size: int = 32
    strategy: str = "fedavg"  # ours only: conf/strategy/<name>.yaml
    repeat: int = 0  # the n-th run of the same cell (--repeats): the machine is noisy

    @property
    def contender(self) -> str:
        """Who runs it, and with which strategy if not FedAvg: ``ours``, ``ours:krum``, ..."""
        return self.kind if self.strategy == "fedavg" else f"{self.kind}:{self.strategy}"

    def overrides(self, out: Path) -> list[str]:
        """Hydra overrides of conf/config.yaml for this job."""
        chosen = [] if self.strategy == "fedavg" else [f"strategy={self.strategy}"]
        return chosen + [
            "dataset=fashion_mnist",
            f"model={self.model}",
            "partition=iid",  # 1,000 clients get 60 images each (48 train / 12 local test)
            f"num_clients={self.clients}",
            f"num_rounds={self.rounds}",
            f"strategy.fraction_train={self.fraction}",
            f"client.local_epochs={self.local_epochs}",
            f"client.batch_size={self.batch_size}",
            f"seed={self.seed}",
            f"output_dir={out}",
        ]


@dataclass
class Outcome:
    """What one job measured; ``rows`` holds its per-round numbers (round 0 = initial model)."""

    job: Job
    wall_seconds: float
    rows: list[dict[str, Any]]
    peak_rss_mib: float  # sampled from outside, whole tree
    cpu_util: float  # all processes, rounds 2..R, CPU seconds / wall / cores
    worker_cpu_util: float  # Ray actor processes only
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def timed(self) -> list[dict[str, Any]]:
        """Rounds 2..R (round 1 pays Ray's and TF's start-up in the workers)."""
        return [r for r in self.rows if int(r["round"]) >= 2]

    def median(self, key: str) -> float:
        vals = [float(r[key]) for r in self.timed() if r.get(key) not in (None, "")]
        return statistics.median(vals) if vals else float("nan")

    @property
    def updates_per_second(self) -> float:
        rows = self.timed()
        secs = sum(float(r["seconds"]) for r in rows)
        return sum(float(r["clients_replied"]) for r in rows) / secs if secs else float("nan")

    @property
    def final_accuracy(self) -> float:
        return float(self.rows[-1]["accuracy"]) if self.rows else float("nan")


def run_job(
    job: Job,
    work: Path,
    conf_dir: Path,
    cores: int,
    timeout: float,
    baseline: Path | None = None,
    baseline_python: str | None = None,
) -> Outcome:
    """Run ``job`` in a child process while sampling its process tree's CPU and memory.

    A ``base`` job runs the baseline worktree's own code (its ``experiments.bench.runs`` child,
    its ``fl_ondevice``, its ``conf/``) as an ``ours`` job: the A/B comparison of two commits;
    under ``baseline_python`` if given (the baseline's own environment), else this Python.
    """
    name = f"{job.contender.replace(':', '-')}-{job.model}-n{job.clients}-f{job.fraction}"
    name += f"-r{job.repeat}" if job.repeat else ""
    out = (work / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = out / "bench_result.json"
    result.unlink(missing_ok=True)
    env, cwd = {**os.environ, **CHILD_ENV}, None
    child_job = job
    if job.kind == "base":
        if baseline is None:
            raise ValueError("a base job needs --baseline REF")
        cwd, conf_dir = baseline, baseline / "conf"
        env["PYTHONPATH"] = str(baseline)  # its fl_ondevice, not this checkout's
        child_job = replace(job, kind="ours")
    fields = asdict(child_job)
    if job.kind == "base":  # older commits' Job has neither (they run FedAvg, once per call)
        del fields["strategy"], fields["repeat"]
    python = baseline_python if job.kind == "base" and baseline_python else sys.executable
    cmd = [python, "-m", "experiments.bench.runs", "--job", json.dumps(fields)]
    cmd += ["--out", str(out), "--conf-dir", str(conf_dir.resolve())]
    progress = out / ("progress.txt" if job.kind == "peer" else "metrics.csv")
    progress.unlink(missing_ok=True)  # a re-run's stale file would fake its round ends
    t0 = time.monotonic()
    with (out / "child.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=log)
        sampler = TreeSampler(proc.pid, rounds=lambda: _rounds_done(progress)).start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child; its Ray processes end with it
            code = -9
        sampler.stop()
    wall = time.monotonic() - t0
    rows = json.loads(result.read_text()) if result.is_file() else []
    error = None if code == 0 and rows else f"exit code {code}; see {out / 'child.log'}"
    if error is None and job.kind != "peer" and _ran_this_checkout(out) != (job.kind == "ours"):
        error = f"{job.kind} job ran the wrong code (see {out / 'config.yaml'})"
    ends = sampler.round_end
    util = (float("nan"), float("nan"))
    if 1 in ends and job.rounds in ends:
        util = sampler.utilisation(ends[1], ends[job.rounds], cores)
    return Outcome(job, wall, rows, sampler.peak_rss_mib, util[0], util[1], error)


def _ran_this_checkout(run_dir: Path) -> bool:
    # This checkout's runs name their strategy class (strategy._target_; commits before the
    # strategy layer was opened wrote strategy.name), write every top-level key of this
    # checkout's Config (a baseline without, e.g., `device` is older code) and record the
    # clients' runtime in metrics.json (commits before the LiteRT move did not), and name a
    # strategy module this checkout has (commits before the subpackages: fl_ondevice.fedavg).
    import importlib.util
    from dataclasses import fields

    from omegaconf import OmegaConf

    from fl_ondevice.config import Config

    config, metrics = run_dir / "config.yaml", run_dir / "metrics.json"
    if not config.is_file() or "_target_" not in config.read_text():
        return False
    if not metrics.is_file() or "runtime" not in json.loads(metrics.read_text()):
        return False
    loaded = OmegaConf.load(config)
    module = str(OmegaConf.select(loaded, "strategy._target_", default="")).rpartition(".")[0]
    try:
        if module.startswith("fl_ondevice.") and importlib.util.find_spec(module) is None:
            return False
    except ModuleNotFoundError:  # a parent of the path is a module here, not a package
        return False
    return set(loaded) == {f.name for f in fields(Config)}


def _rounds_done(progress: Path) -> int:
    # metrics.csv: header + round 0 + completed rounds; progress.txt: the last completed round
    if not progress.is_file():
        return 0
    text = progress.read_text()
    if progress.suffix == ".csv":
        return max(text.count("\n") - 2, 0)
    return int(text or 0)


def _child(job: Job, out: Path, conf_dir: Path) -> list[dict[str, Any]]:
    from hydra import compose, initialize_config_dir

    from fl_ondevice.config import parse_config

    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        cfg = parse_config(compose("config", overrides=job.overrides(out)))
    if job.kind == "ours":
        from fl_ondevice.simulate import simulate

        simulate(cfg)
        with (out / "metrics.csv").open() as f:
            return list(csv.DictReader(f))
    from experiments.bench import peer

    progress = out / "progress.txt"
    progress.write_text("0")
    peer.ROUND_HOOK = lambda r: progress.write_text(str(r))
    return peer.run_peer(cfg)


def main() -> None:
    """Child entry point: ``python -m experiments.bench.runs --job JSON --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--conf-dir", required=True, type=Path)
    args = parser.parse_args()
    job = Job(**json.loads(args.job))
    rows = _child(job, args.out, args.conf_dir)
    (args.out / "bench_result.json").write_text(json.dumps(rows, default=float))


if __name__ == "__main__":
    main()
