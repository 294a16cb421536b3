"""CPU time and resident memory of a process tree, sampled from /proc in a background thread."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fl_ondevice.processes import process_tree

_TICK = os.sysconf("SC_CLK_TCK")  # clock ticks per second of utime/stime in /proc/<pid>/stat
_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def tree_stat(root: int) -> dict[int, tuple[str, float, float]]:
    """``{pid: (comm, cpu seconds, rss MiB)}`` of ``root`` and all its descendants."""
    out: dict[int, tuple[str, float, float]] = {}
    for pid in process_tree(root):
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended while we looked
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
        cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        out[pid] = (comm, cpu, int(fields[21]) * _PAGE_MIB)  # rss in pages
    return out


@dataclass
class Sample:
    """One look at the tree: wall time, cumulative CPU seconds (all / Ray workers), RSS."""

    t: float
    cpu: float
    worker_cpu: float
    rss_mib: float


@dataclass
class TreeSampler:
    """Samples a process tree every ``interval`` seconds until stopped.

    Cumulative CPU adds each process's CPU-time growth between samples (a process first seen
    contributes all its CPU time so far), so it stays monotone when Ray's workers exit; a process
    that ends loses at most its last ``interval``. ``rounds`` is polled too: the times at which the
    completed-round count grew mark the rounds for per-phase utilisation.
    """

    root: int
    rounds: Callable[[], int] = lambda: 0
    interval: float = 0.25
    samples: list[Sample] = field(default_factory=list)
    round_end: dict[int, float] = field(default_factory=dict)  # round -> first time seen done

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last: dict[int, float] = {}
        self._cpu = self._worker_cpu = 0.0

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)
        self._sample()

    def _sample(self) -> None:
        now = time.monotonic()
        stat = tree_stat(self.root)
        rss = 0.0
        for pid, (comm, cpu, pid_rss) in stat.items():
            delta = cpu - self._last.get(pid, 0.0)
            self._cpu += delta
            if comm.startswith("ray::"):  # Ray actor processes: where the clients run
                self._worker_cpu += delta
            self._last[pid] = cpu
            rss += pid_rss
        self.samples.append(Sample(now, self._cpu, self._worker_cpu, rss))
        try:
            done = self.rounds()
        except (OSError, ValueError):
            done = 0
        for r in range(1, done + 1):
            self.round_end.setdefault(r, now)

    @property
    def peak_rss_mib(self) -> float:
        return max((s.rss_mib for s in self.samples), default=float("nan"))

    def utilisation(self, t0: float, t1: float, cores: int) -> tuple[float, float]:
        """(all processes, Ray workers only) CPU seconds / wall seconds / cores in [t0, t1]."""
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        if len(inside) < 2 or inside[-1].t <= inside[0].t:
            return float("nan"), float("nan")
        a, b = inside[0], inside[-1]
        wall = (b.t - a.t) * cores
        return (b.cpu - a.cpu) / wall, (b.worker_cpu - a.worker_cpu) / wall
