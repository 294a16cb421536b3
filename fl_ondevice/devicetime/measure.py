"""Measuring a model's ``train`` step time on this host, per batch size, cached in ``cache_dir``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import statistics
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fl_ondevice.devicetime.calibration import (
    Calibration,
    is_int,
    read_calibration,
    write_calibration,
)
from fl_ondevice.errors import ConfigError, InputError
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.interpreters import runtime_for
from fl_ondevice.ondevice.layouts import PERSONALIZATION

log = logging.getLogger(__name__)

CACHE_SUBDIR = "calibration"  # under cache_dir: one per (model_key, host, threads, runtime)


def describe_host() -> str:
    """This machine as the cache and the run record name it: hostname, CPU model, CPU count."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.partition(":")[2].strip()
                    break
    except OSError:  # not Linux
        pass
    cpu = cpu or platform.processor() or platform.machine()
    return f"{socket.gethostname()}, {cpu}, {os.cpu_count()} CPUs"


def measure(
    model_file: str | os.PathLike[str] | bytes,
    x: np.ndarray,
    y: np.ndarray,
    batch_sizes: Iterable[int],
    num_threads: int = 1,
    *,
    model_key: str,
    max_seconds_per_size: float = 2.0,
    max_repeats: int = 21,
    min_repeats: int = 5,
    warmup: int = 2,
) -> Calibration:
    """Time the model's ``train`` signature on batches of ``(x, y)`` for each batch size.

    A private interpreter (training changes its weights; a pooled one is shared by clients)
    runs ``warmup`` untimed steps per size, then timed steps until ``max_repeats``, or until
    ``max_seconds_per_size`` of wall time has passed and at least ``min_repeats`` were timed.
    Batches are consecutive examples of ``x``, wrapping around when a batch is larger than it.
    """
    sizes = sorted(set(batch_sizes))
    _check_measure_args(x, y, sizes, max_seconds_per_size, max_repeats, min_repeats, warmup)
    model = OnDeviceModel(model_file, num_threads=num_threads)
    if model.layout is PERSONALIZATION:  # train takes load's bottlenecks of the images
        x, y = model.load(x[: max(sizes)]), y[: max(sizes)]
    step_seconds: dict[int, float] = {}
    repeats: dict[int, int] = {}
    for batch in sizes:
        times = _time_steps(
            model, x, y, batch, max_seconds_per_size, max_repeats, min_repeats, warmup
        )
        step_seconds[batch] = float(statistics.median(times))
        repeats[batch] = len(times)
    calibration = Calibration(
        model_key=model_key,
        host=describe_host(),
        num_threads=num_threads,
        step_seconds=step_seconds,
        repeats=repeats,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        runtime=str(model.runtime),
    )
    _log_measured(calibration)
    return calibration


def _check_measure_args(
    x: np.ndarray,
    y: np.ndarray,
    sizes: list[int],
    max_seconds: float,
    max_repeats: int,
    min_repeats: int,
    warmup: int,
) -> None:
    if len(x) == 0 or len(x) != len(y):
        raise InputError(
            f"calibration needs examples: x holds {len(x)} and y {len(y)} (equal and >= 1)"
        )
    if not sizes or any(not is_int(b) or b < 1 for b in sizes):
        raise InputError(f"batch_sizes={sizes!r} must be a non-empty list of integers >= 1")
    if not 1 <= min_repeats <= max_repeats:
        raise ConfigError(
            f"min_repeats={min_repeats} and max_repeats={max_repeats} must satisfy "
            "1 <= min_repeats <= max_repeats"
        )
    if warmup < 0 or not max_seconds > 0:
        raise ConfigError(
            f"warmup={warmup} must be >= 0 and max_seconds_per_size={max_seconds} > 0"
        )


def _time_steps(
    model: OnDeviceModel,
    x: np.ndarray,
    y: np.ndarray,
    batch: int,
    max_seconds: float,
    max_repeats: int,
    min_repeats: int,
    warmup: int,
) -> list[float]:
    # Step k trains on examples k*batch ... (k+1)*batch - 1 modulo len(x): real data, the same
    # batches on every run. The batch is cut before the clock starts.
    def batch_of(k: int) -> tuple[np.ndarray, np.ndarray]:
        idx = (k * batch + np.arange(batch)) % len(x)
        return x[idx], y[idx]

    for k in range(warmup):  # first calls allocate tensors for the new batch shape
        model.train_step(*batch_of(k))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (
        len(times) < min_repeats or time.perf_counter() - start < max_seconds
    ):
        xb, yb = batch_of(warmup + len(times))
        t0 = time.perf_counter()
        model.train_step(xb, yb)
        times.append(time.perf_counter() - t0)
    return times


def _log_measured(calibration: Calibration) -> None:
    per_size = ", ".join(
        f"batch {b} {s * 1e3:.3g} ms" for b, s in sorted(calibration.step_seconds.items())
    )
    counts = sorted(set(calibration.repeats.values()))
    steps = (
        f"{counts[0]} steps each"
        if len(counts) == 1
        else "steps " + ", ".join(f"{b}: {n}" for b, n in sorted(calibration.repeats.items()))
    )
    log.info(
        "calibrated %s on %s (%s): %s per train step (%s)",
        calibration.model_key,
        calibration.host,
        calibration.runtime,
        per_size,
        steps,
    )


def load_or_measure(
    cache_dir: str | os.PathLike[str],
    model_key: str,
    model_file: str | os.PathLike[str] | bytes,
    x: np.ndarray,
    y: np.ndarray,
    batch_sizes: Iterable[int],
    num_threads: int = 1,
) -> Calibration:
    """The cached calibration of ``model_key`` on this host, measuring only what it lacks.

    The cache file is ``cache_dir/calibration/<hash of (model_key, host, num_threads,
    runtime)>.json``: a step on another interpreter is another measurement. Batch sizes it lacks
    are measured and the union written back; a corrupt file is measured anew (with a warning:
    it is only a cache).
    """
    host = describe_host()
    data = model_file if isinstance(model_file, bytes) else Path(model_file).read_bytes()
    runtime = str(runtime_for(data))
    path = _cache_path(cache_dir, model_key, host, num_threads, runtime)
    cached = _read_cache(path, model_key, host, num_threads, runtime)
    wanted = set(batch_sizes)
    missing = sorted(wanted - set(cached.step_seconds)) if cached else sorted(wanted)
    if cached is not None and not missing:
        return cached
    fresh = measure(model_file, x, y, missing, num_threads, model_key=model_key)
    if cached is not None:
        fresh = Calibration(
            model_key=model_key,
            host=fresh.host,
            num_threads=num_threads,
            step_seconds={**cached.step_seconds, **fresh.step_seconds},
            repeats={**cached.repeats, **fresh.repeats},
            measured_at=fresh.measured_at,  # when the newest sizes were measured
            runtime=runtime,
        )
    write_calibration(fresh, path)
    return fresh


def _cache_path(
    cache_dir: str | os.PathLike[str], model_key: str, host: str, num_threads: int, runtime: str
) -> Path:
    key = json.dumps([model_key, host, num_threads, runtime])
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / CACHE_SUBDIR / f"{name}.json"


def _read_cache(
    path: Path, model_key: str, host: str, num_threads: int, runtime: str
) -> Calibration | None:
    if not path.is_file():
        return None
    try:
        cached = read_calibration(path, expect_model_key=model_key)
    except ConfigError as err:
        log.warning("calibration cache %s is unusable, measuring again: %s", path, err)
        return None
    if (cached.host, cached.num_threads, cached.runtime) != (host, num_threads, runtime):
        log.warning(  # a hash collision or an edit
            "calibration cache %s is for %s with %d thread(s) on %r, not this host: measuring "
            "again",
            path,
            cached.host,
            cached.num_threads,
            cached.runtime,
        )
        return None
    return cached
