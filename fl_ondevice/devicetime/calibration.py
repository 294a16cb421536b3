"""Calibration: a model's measured ``train`` step time on a host, per batch size, as a file.

Measuring it (on this host, cached in ``cache_dir``) is :mod:`fl_ondevice.devicetime.measure`.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_ondevice.errors import ConfigError, InputError

CALIBRATION_JSON = "calibration.json"  # the run directory's copy of the calibration it used
FIELDS = ("model_key", "host", "num_threads", "step_seconds", "repeats", "measured_at")
READ_FIX = (
    "pass a calibration.json that fl_ondevice wrote (every run directory holds one), "
    "or drop device.calibration to measure this host"
)


@dataclass(frozen=True)
class Calibration:
    """Median seconds of one ``train`` step of a model on a host, per batch size.

    Parameters
    ----------
    model_key
        Identifies the model (the caller's choice, e.g. the ``.tflite`` file's SHA-256).
    host
        The machine it was measured on (see :func:`fl_ondevice.devicetime.measure.describe_host`).
    num_threads
        Interpreter threads used for the measurement.
    step_seconds
        Batch size -> median seconds of one ``train`` step; every value finite and > 0.
    repeats
        Batch size -> steps timed for that median (same keys as ``step_seconds``).
    measured_at
        ISO 8601 UTC time of the measurement.
    runtime
        The interpreter measured, e.g. ``ai-edge-litert 2.3.0`` (files written before it was
        recorded have ``""``).
    """

    model_key: str
    host: str
    num_threads: int
    step_seconds: dict[int, float]
    repeats: dict[int, int]
    measured_at: str
    runtime: str = ""

    def __post_init__(self) -> None:
        if not is_int(self.num_threads) or self.num_threads < 1:
            raise ConfigError(f"num_threads={self.num_threads!r} must be an integer >= 1")
        if not self.step_seconds:
            raise ConfigError("step_seconds is empty: at least one batch size must be measured")
        for batch, sec in self.step_seconds.items():
            if not is_int(batch) or batch < 1:
                raise ConfigError(f"step_seconds has batch size {batch!r}; sizes are ints >= 1")
            if not _is_number(sec) or not math.isfinite(sec) or sec <= 0:
                raise ConfigError(
                    f"step_seconds[{batch}] = {sec!r} must be a finite number of seconds > 0"
                )
        if set(self.repeats) != set(self.step_seconds):
            raise ConfigError(
                f"repeats has batch sizes {sorted(self.repeats)} but step_seconds has "
                f"{sorted(self.step_seconds)}: they must be the same"
            )
        for batch, n in self.repeats.items():
            if not is_int(n) or n < 1:
                raise ConfigError(f"repeats[{batch}] = {n!r} must be an integer >= 1")
        # Own copies in ascending batch order, as plain ints and floats (numpy scalars of a
        # caller's would not survive JSON).
        sizes = sorted(self.step_seconds)
        object.__setattr__(self, "num_threads", int(self.num_threads))
        object.__setattr__(
            self, "step_seconds", {int(b): float(self.step_seconds[b]) for b in sizes}
        )
        object.__setattr__(self, "repeats", {int(b): int(self.repeats[b]) for b in sizes})

    def seconds(self, batch: int) -> float:
        """Seconds of one ``train`` step on ``batch`` examples.

        The measured median if ``batch`` was measured; between two measured sizes, linear
        interpolation; beyond the largest, linear extrapolation through the last two points
        (proportional to ``batch`` with one point), never below the largest's time (a noisy
        downward last segment would otherwise reach zero); below the smallest, proportional to
        ``batch``.
        """
        if not is_int(batch) or batch < 1:
            raise InputError(f"batch={batch!r} must be an integer >= 1")
        if batch in self.step_seconds:
            return self.step_seconds[batch]
        sizes = sorted(self.step_seconds)
        i = bisect.bisect_left(sizes, batch)
        if i == 0 or len(sizes) == 1:
            b0 = sizes[0] if i == 0 else sizes[-1]
            return self.step_seconds[b0] * batch / b0
        if i == len(sizes):
            lo, hi = sizes[-2], sizes[-1]
            return max(self.step_seconds[hi], self._line(lo, hi, batch))
        return self._line(sizes[i - 1], sizes[i], batch)

    def _line(self, lo: int, hi: int, batch: int) -> float:
        t_lo, t_hi = self.step_seconds[lo], self.step_seconds[hi]
        return t_lo + (batch - lo) / (hi - lo) * (t_hi - t_lo)

    def train_seconds(self, num_examples: int, batch_size: int | None, epochs: int) -> float:
        """Compute seconds of one client's local training as ``OnDeviceModel.fit`` runs it.

        Per epoch, ``num_examples // batch_size`` steps on full batches plus one step on the
        remainder if it is not empty; ``batch_size=None`` is one step on all examples per epoch.
        """
        if not is_int(num_examples) or num_examples < 0:
            raise InputError(f"num_examples={num_examples!r} must be an integer >= 0")
        if not is_int(epochs) or epochs < 1:
            raise InputError(f"epochs={epochs!r} must be an integer >= 1")
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise InputError(f"batch_size={batch_size!r} must be an integer >= 1 or None")
        if num_examples == 0:
            return 0.0
        if batch_size is None:
            return epochs * self.seconds(num_examples)
        full, rest = divmod(num_examples, batch_size)
        per_epoch = full * self.seconds(batch_size) if full else 0.0
        if rest:
            per_epoch += self.seconds(rest)
        return epochs * per_epoch

    def to_json(self) -> str:
        """This calibration as JSON (batch sizes as string keys, ascending)."""
        doc: dict[str, Any] = asdict(self)
        for field in ("step_seconds", "repeats"):
            values = getattr(self, field)
            doc[field] = {str(b): values[b] for b in sorted(values)}
        # Python writes floats by repr: reading them back gives the same bits.
        return json.dumps(doc, indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Parse :meth:`to_json`'s output; ``ConfigError`` says what is wrong with it."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"it is not JSON ({err})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"it holds a JSON {type(doc).__name__}, not an object")
        missing = [f for f in FIELDS if f not in doc]
        if missing:
            raise ConfigError(f"it lacks the field(s) {missing} (a calibration has {list(FIELDS)})")
        doc.setdefault("runtime", "")  # optional: not recorded before the LiteRT runtime
        for field in ("model_key", "host", "measured_at", "runtime"):
            if not isinstance(doc[field], str):
                raise ConfigError(f"{field} = {doc[field]!r} must be a string")
        return cls(
            model_key=doc["model_key"],
            host=doc["host"],
            num_threads=doc["num_threads"],
            step_seconds=_by_batch(doc["step_seconds"], "step_seconds"),
            repeats=_by_batch(doc["repeats"], "repeats"),
            measured_at=doc["measured_at"],
            runtime=doc["runtime"],
        )


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _by_batch(values: object, field: str) -> dict[int, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"{field} = {values!r} must be an object {{batch size: value}}")
    out: dict[int, Any] = {}
    for key, value in values.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise ConfigError(f"{field} has key {key!r}, which is not a batch size") from None
    return out


def batch_sizes_needed(batch_size: int | None, client_train_sizes: Sequence[int]) -> list[int]:
    """The batch sizes to measure so that ``train_seconds`` of these clients interpolates.

    Minibatches of B: 1 and B (capped at the largest client, whose whole data is then one
    batch); every step's size lies between them. Full batch (``None``): 1, the median and the
    largest client size.
    """
    if not client_train_sizes or any(not is_int(n) or n < 1 for n in client_train_sizes):
        raise InputError(
            f"client_train_sizes={list(client_train_sizes)!r} must be a non-empty list of "
            "example counts >= 1"
        )
    largest = max(client_train_sizes)
    if batch_size is None:
        # median_low: a size some client has, not the mean of two.
        return sorted({1, int(statistics.median_low(client_train_sizes)), int(largest)})
    if not is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be an integer >= 1 or None")
    return sorted({1, int(min(batch_size, largest))})


def write_calibration(calibration: Calibration, path: str | os.PathLike[str]) -> None:
    """Write ``calibration`` as JSON to ``path`` atomically (parents created).

    Written aside and renamed: parallel runs may write one cache file at once, and a reader
    never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(calibration.to_json(), encoding="utf-8")
    os.replace(tmp, path)


def read_calibration(
    path: str | os.PathLike[str], expect_model_key: str | None = None
) -> Calibration:
    """Read a calibration file (a run's ``calibration.json`` or ``device.calibration=FILE``).

    Raises ``ConfigError`` naming the file, what is wrong and the fix when it does not exist,
    is not a calibration, holds a value that is not finite and > 0, or (with
    ``expect_model_key``) was measured for another model.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"calibration file {source}: no such file; {READ_FIX}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"calibration file {source} cannot be read ({err}); {READ_FIX}") from None
    try:
        calibration = Calibration.from_json(text)
    except ConfigError as err:
        raise ConfigError(f"calibration file {source}: {err}; {READ_FIX}") from None
    if expect_model_key is not None and calibration.model_key != expect_model_key:
        raise ConfigError(
            f"calibration file {source} was measured for model {calibration.model_key!r} but "
            f"this run's model is {expect_model_key!r}; drop device.calibration to measure this "
            "model, or pass the calibration of this model"
        )
    return calibration
