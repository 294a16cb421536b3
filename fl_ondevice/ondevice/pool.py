"""This process's interpreters: one per model file, shared by the clients the process runs."""

from __future__ import annotations

import functools
import os

from fl_ondevice.ondevice.device import OnDeviceModel

_POOL: dict[tuple[str, int], OnDeviceModel] = {}
POOL_SIZE = 2  # interpreters a process keeps: the current run's, and the previous run's


def pooled_model(path: str | os.PathLike[str], num_threads: int = 1) -> OnDeviceModel:
    """This process's interpreter for a model file: one per (file, threads), never one per client.

    A CNN interpreter holds ~137 MiB after its first training call, so simulated clients share
    one per worker process; callers must ``reset_optimizer`` and ``set_weights`` before use.
    """
    key = (_canonical(os.fspath(path)), num_threads)
    if key not in _POOL:
        while len(_POOL) >= POOL_SIZE:  # a worker serves one run at a time; runs change models
            _POOL.pop(next(iter(_POOL)))
        _POOL[key] = OnDeviceModel(path, num_threads=num_threads)
    return _POOL[key]


@functools.lru_cache(maxsize=16)
def _canonical(path: str) -> str:
    return os.path.realpath(path)  # a few system calls: once per path, not once per client


def clear_pool() -> None:
    """Drop this process's pooled interpreters (tests; long-lived interactive sessions)."""
    _POOL.clear()
