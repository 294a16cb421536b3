"""Simulated device time: which phones are online, how long each takes, when a round closes.

Every client is a phone of a device class (``device`` in the config). A client's time in a
round is its download, its local training and its upload:

    latency (twice: download and upload) + bytes down / down bandwidth
    + train steps x the model's measured step time on the host x the class' compute factor
    + bytes up / up bandwidth

The step time comes from a calibration (``fl_ondevice.devicetime.calibration``), never from the
wall time of the round being simulated, so two runs with one seed and one calibration keep the
same clock.
A phone is online one window a day (``online_hours``, at a seeded time of day); the server
samples among the phones online when the round starts and, if too few are, waits for them. A
phone whose window closes before it has uploaded drops out.

How the round closes (:func:`close_round`): when every update is in; with over-commitment, when
the first K of the ceil(K x factor) sampled phones have uploaded; with a deadline, at the
deadline at the latest. Updates that arrive after the round closed are stragglers.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fl_ondevice import seeds
from fl_ondevice.config import DeviceClassConfig, DeviceConfig
from fl_ondevice.devicetime.calibration import Calibration
from fl_ondevice.errors import ConfigError

SECONDS_PER_DAY = 86_400.0
BITS_PER_BYTE = 8


@dataclass(frozen=True)
class DeviceClass:
    """A class of phones (see ``fl_ondevice.config.DeviceClassConfig`` for the units)."""

    name: str
    share: float
    compute_factor: float
    down_mbps: float
    up_mbps: float
    latency_ms: float
    online_hours: float


def device_classes(device: DeviceConfig) -> list[DeviceClass]:
    """The classes of ``device``: its CSV ``table`` if given, else its ``classes``."""
    if device.table:
        return read_table(Path(device.table).expanduser())
    return [DeviceClass(name, **vars(c)) for name, c in device.classes.items()]


def read_table(path: Path) -> list[DeviceClass]:
    """Device classes from a CSV file: a ``name`` column plus ``DeviceClassConfig``'s keys
    (missing columns take its defaults). Raises ``ConfigError`` naming the file and the fix."""
    keys = [f.name for f in fields(DeviceClassConfig)]
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ConfigError(f"device.table={str(path)!r} cannot be read ({err.strerror})") from None
    if not rows or "name" not in rows[0]:
        raise ConfigError(
            f"device.table={str(path)!r} needs a header row with a 'name' column and some of "
            f"{keys}, and one row per device class"
        )
    unknown = set(rows[0]) - {"name", *keys}
    if unknown:
        raise ConfigError(f"device.table={str(path)!r} has unknown columns {sorted(unknown)}")
    classes = []
    for line, row in enumerate(rows, start=2):
        try:
            cls = DeviceClassConfig(**{k: float(v) for k, v in row.items() if k != "name"})
        except ValueError as err:
            raise ConfigError(f"device.table={str(path)!r} line {line}: {err}") from None
        cls.check(f"device.table line {line}")
        classes.append(DeviceClass(row["name"], **vars(cls)))
    if sum(c.share for c in classes) <= 0:
        raise ConfigError(f"device.table={str(path)!r}: the shares must not all be 0")
    return classes


def assign_classes(shares: Sequence[float], num_clients: int, seed: int) -> np.ndarray:
    """Each client's class index: the classes' shares of the clients, rounded by largest
    remainder so that the mix is exact, dealt to the clients in a seeded order."""
    quota = np.asarray(shares, dtype=float) / sum(shares) * num_clients
    counts = np.floor(quota).astype(int)
    by_remainder = np.argsort(-(quota - counts), kind="stable")
    counts[by_remainder[: num_clients - counts.sum()]] += 1
    classes = np.repeat(np.arange(len(shares)), counts)
    return np.random.default_rng([seed, seeds.DEVICE_CLASSES]).permutation(classes)


@dataclass(frozen=True)
class ClientTime:
    """One client's simulated seconds in a round, by part."""

    latency: float
    download: float
    compute: float
    upload: float

    @property
    def total(self) -> float:
        """From the round's start to the server holding the update."""
        return self.latency + self.download + self.compute + self.upload


class DeviceClock:
    """The simulated clock of a run and its phones.

    Parameters
    ----------
    classes
        The device classes; each client gets one by seed (:func:`assign_classes`).
    num_clients, seed
        The clients and the run seed.
    calibration
        The model's measured train-step times on the host.
    client_sizes, batch_size, epochs
        Each client's training examples, and ``client.batch_size``/``client.local_epochs``:
        how many steps of which size a client trains.
    """

    def __init__(
        self,
        classes: Sequence[DeviceClass],
        num_clients: int,
        seed: int,
        calibration: Calibration,
        client_sizes: Sequence[int],
        batch_size: int | None,
        epochs: int,
    ) -> None:
        self.classes = list(classes)
        self.class_of = assign_classes([c.share for c in classes], num_clients, seed)
        self.calibration = calibration
        self.client_sizes = list(client_sizes)
        self.batch_size, self.epochs = batch_size, epochs
        rng = np.random.default_rng([seed, seeds.ONLINE_WINDOWS])
        self.window_start = rng.uniform(0.0, SECONDS_PER_DAY, num_clients)  # s after midnight
        self.window_length = np.array(
            [self.classes[k].online_hours * 3600.0 for k in self.class_of]
        )
        self.now = 0.0  # simulated seconds since the run started, at midnight of day 0

    # -- availability -------------------------------------------------------------------------
    def _into_window(self, t: float) -> np.ndarray:
        # Seconds since each client's window last opened, at time t.
        return np.mod(t - self.window_start, SECONDS_PER_DAY)

    def online(self, t: float | None = None) -> list[int]:
        """The clients online at ``t`` (default: now), in id order."""
        at = self.now if t is None else t
        return [int(c) for c in np.flatnonzero(self._into_window(at) < self.window_length)]

    def online_until(self, client: int, t: float) -> float:
        """When ``client``, online at ``t``, goes offline (inf: always online)."""
        if self.window_length[client] >= SECONDS_PER_DAY:
            return math.inf
        return t + float(self.window_length[client] - self._into_window(t)[client])

    def _openings(self) -> np.ndarray:
        # The times in the coming day at which a window opens: the count online only rises then.
        return self.now + np.sort(np.mod(self.window_start - self.now, SECONDS_PER_DAY))

    def most_online(self) -> int:
        """The largest number of clients online at once, over a day."""
        return max(len(self.online(t)) for t in [self.now, *self._openings()])

    def wait_for(self, needed: int) -> float:
        """Advance the clock to the first moment at least ``needed`` clients are online; return
        the seconds waited. Raises ``ConfigError`` if that never happens."""
        t = self.when_online(needed)
        waited, self.now = t - self.now, t
        return waited

    def when_online(self, needed: int) -> float:
        """The first moment from now at which at least ``needed`` clients are online. Raises
        ``ConfigError`` if that never happens."""
        for t in [self.now, *self._openings()]:
            if len(self.online(t)) >= needed:
                return float(t)
        raise ConfigError(
            f"at most {self.most_online()} clients are ever online at once, but the strategy "
            f"needs {needed}: raise the device classes' online_hours or num_clients, or lower "
            "strategy.min_available_nodes/min_train_nodes"
        )

    # -- time of one client -------------------------------------------------------------------
    def client_time(self, client: int, bytes_down: int, bytes_up: int) -> ClientTime:
        """``client``'s seconds in a round that sends it ``bytes_down`` and gets ``bytes_up``."""
        cls = self.classes[self.class_of[client]]
        steps = self.calibration.train_seconds(
            self.client_sizes[client], self.batch_size, self.epochs
        )
        return ClientTime(
            latency=2 * cls.latency_ms / 1000.0,
            download=bytes_down * BITS_PER_BYTE / (cls.down_mbps * 1e6),
            compute=steps * cls.compute_factor,
            upload=bytes_up * BITS_PER_BYTE / (cls.up_mbps * 1e6),
        )


@dataclass(frozen=True)
class RoundClose:
    """When a round closed and whose updates made it."""

    seconds: float  # from the round's start to its close
    kept: tuple[int, ...]  # clients whose updates are aggregated, in id order
    stragglers: tuple[int, ...]  # clients whose updates arrived after the close


def close_round(
    finish: Mapping[int, float], missing: int, keep: int | None, deadline: float | None
) -> RoundClose:
    """Close a round whose delivering clients upload at ``finish`` seconds after its start.

    ``missing`` sampled clients never upload (they dropped out); the server notices a drop-out
    as it happens, so it waits for them only until a deadline. ``keep``: over-commitment's K,
    the round closes when K updates are in; None waits for all. ``deadline``: the latest close.
    """
    order = sorted(finish, key=lambda c: (finish[c], c))
    closes = []
    if keep is not None and len(order) >= keep:
        closes.append(finish[order[keep - 1]])
    if deadline is not None:
        closes.append(deadline)
    if missing == 0 or deadline is None:
        closes.append(finish[order[-1]] if order else 0.0)
    seconds = min(closes)
    first = order if keep is None else order[:keep]
    kept = sorted(c for c in first if finish[c] <= seconds)
    stragglers = sorted(set(order) - set(kept))
    return RoundClose(float(seconds), tuple(kept), tuple(stragglers))
