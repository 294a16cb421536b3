"""The process tree of this process, read from /proc (Linux): its members, their memory, and a
table to find the descendants of any process."""

from __future__ import annotations

import os
import re
from pathlib import Path


def process_tree(root: int) -> list[int]:
    """``root`` and the pids of all its descendants that exist now (Linux: reads /proc)."""
    found, pids = [], [root]
    while pids:
        pid = pids.pop()
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process ended while we looked
        found.append(pid)
        for task in tasks:
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that ended while we looked (not its process)
    return found


def process_tree_rss_mib() -> float | None:
    """Resident memory of this process and all its descendants (Ray's workers too), in MiB.

    Linux only (reads /proc); None elsewhere.
    """
    total = 0
    try:
        for pid in process_tree(os.getpid()):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue  # the process ended while we looked
            rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            total += int(rss.group(1)) if rss else 0
    except OSError:
        return None
    return total / 1024


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, state) of every process."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(entry)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int, str]]) -> set[int]:
    """The children of ``roots``, their children, and so on (``table``: ``process_table()``)."""
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, row in table.items() if row[0] in frontier} - found
        found |= frontier
    return found
