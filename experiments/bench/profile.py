"""Whole-tree sampling profile of one simulation with py-spy: where each process spends time."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from experiments.bench.runs import CHILD_ENV, Job

PROFILE_TXT = "profile.txt"
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def run_profile(out: Path, conf_dir: Path, job: Job, rate: int = 50, top: int = 15) -> str:
    """Record ``job`` (a child simulation) with ``py-spy --subprocesses``; summarise the stacks.

    Returns the summary (also written to ``profile.txt``): per process kind, the functions with
    the most samples on-CPU or waiting in Python (self) and on the stack (inclusive).
    """
    if shutil.which("py-spy") is None:
        return "py-spy not installed (pip install py-spy): profile skipped"
    run_dir = out / "runs" / f"profile-{job.kind}-{job.model}-n{job.clients}-f{job.fraction}"
    run_dir.mkdir(parents=True, exist_ok=True)
    raw = out / "profile_raw.txt"
    cmd = ["py-spy", "record", "--subprocesses", "--format", "raw", "-r", str(rate)]
    cmd += ["-o", str(raw), "--", sys.executable, "-m", "experiments.bench.runs"]
    cmd += ["--job", json.dumps(asdict(job)), "--out", str(run_dir), "--conf-dir", str(conf_dir)]
    with (run_dir / "py-spy.log").open("w") as log:
        subprocess.run(cmd, env={**os.environ, **CHILD_ENV}, stdout=log, stderr=log, check=False)
    text = summarise(raw, top)
    (out / PROFILE_TXT).write_text(text)
    return text


def summarise(raw: Path, top: int) -> str:
    """Self and inclusive sample counts per function, grouped by process kind."""
    selfc: dict[str, Counter[str]] = {}
    incl: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        # py-spy nests each subprocess under its parent as a `process PID:"cmdline"` frame
        last = max(i for i, f in enumerate(frames) if f.startswith("process "))
        cmdline = frames[last]
        if "ray::" in cmdline or "default_worker" in cmdline:
            proc = "ray worker"
        elif last == 0:
            proc = "driver (server)"
        else:
            proc = "other: " + cmdline.split('"')[1].split()[0].rsplit("/", 1)[-1][:40]
        names = [_name(f) for f in frames[last + 1 :]]
        n = int(count)
        totals[proc] += n
        selfc.setdefault(proc, Counter())[names[-1] if names else "?"] += n
        inc = incl.setdefault(proc, Counter())
        for name in set(names):
            inc[name] += n
    out = []
    for proc, total in totals.most_common():
        out.append(f"== {proc}: {total} samples")
        out.append("  self:")
        out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in selfc[proc].most_common(top)]
        out.append("  inclusive:")
        out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in incl[proc].most_common(top)]
    return "\n".join(out)


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({Path(m['file']).name})"
