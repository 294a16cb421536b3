"""This process's scratch directory for checkpoint files; removing those of ended processes."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_SCRATCH: list[str] = []


def scratch_dir() -> str:
    """This process's scratch directory for checkpoint files (RAM-backed where /dev/shm exists)."""
    if not _SCRATCH:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        remove_stale_scratch(base)
        _SCRATCH.append(tempfile.mkdtemp(prefix=f"fl_ondevice-{os.getpid()}-", dir=base))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


def remove_stale_scratch(base: str) -> None:
    """Delete the scratch directories in ``base`` of processes that no longer exist.

    Ray ends its workers without running ``atexit``, so every worker of every run used to leave
    its checkpoint files behind (up to 20 MiB each for the CNN, in RAM under /dev/shm).
    """
    for path in Path(base).glob("fl_ondevice-*-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
