"""Who of a round's sampled clients trains and whose update counts: dropouts and device time.

A client sent a train message may drop out (``client.dropout_rate``: a seeded draw per round
and client); its message is lost on the way. With phones (``fl_ondevice.devicetime.clock``),
the clients the strategy sees are those online when the round starts; a round's train
messages go only to the clients whose updates would reach the server before the round closes
on the simulated clock (over-commitment adds clients the strategy did not sample; later
updates are stragglers, not trained at all: the phone's work is lost).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from fl_ondevice import seeds
from fl_ondevice.devicetime.clock import DeviceClock, close_round
from fl_ondevice.wire.traffic import RoundTraffic


class RoundPolicy:
    """Dropouts, and with a clock the simulated round; each decision is counted on the round's
    :class:`~fl_ondevice.wire.traffic.RoundTraffic`.

    Parameters
    ----------
    seed
        The run seed: dropouts and over-committed clients are drawn from it and the round.
    dropout_rate
        Share of the clients sent a train message that never reply (a seeded draw per round
        and client): the phone downloaded the model and went offline.
    clock, overcommit, deadline_s
        The phones' simulated clock (None: no device time) and when a round closes
        (``fl_ondevice.config.RoundConfig``).
    """

    def __init__(
        self,
        seed: int = 0,
        dropout_rate: float = 0.0,
        clock: DeviceClock | None = None,
        overcommit: float = 1.0,
        deadline_s: float | None = None,
    ) -> None:
        self.seed = seed
        self.dropout_rate = dropout_rate
        self.clock = clock
        self.overcommit, self.deadline_s = overcommit, deadline_s
        self._round_start = 0.0  # with a clock: when the round started, simulated seconds
        self._online: set[int] = set()  # with a clock: the clients online at the round's start

    def begin(self, needed: int, traffic: RoundTraffic, num_clients: int) -> None:
        """With a clock: wait until ``needed`` phones are online, and start the round."""
        assert self.clock is not None
        traffic.sim_seconds = self.clock.wait_for(needed)
        self._round_start = self.clock.now
        self._online = set(self.clock.online())
        traffic.unavailable = num_clients - len(self._online)

    def available(self, clients: Iterable[int]) -> Iterable[int]:
        """``clients`` a strategy may sample: with a clock, those online when the round
        started."""
        if self.clock is None:
            return clients
        return [c for c in clients if c in self._online]

    @property
    def overcommits(self) -> bool:
        """Whether a round's train messages go to more clients than the strategy sampled."""
        return self.clock is not None and self.overcommit > 1.0

    def overcommitted(self, r: int, sampled: int, spare: Sequence[int]) -> list[int]:
        """Over-commitment: ceil(K x factor) - K more clients of ``spare`` (the online clients
        the strategy did not sample), drawn from round ``r``'s seed, in id order."""
        more = min(len(spare), math.ceil(sampled * self.overcommit) - sampled)
        rng = np.random.default_rng([self.seed, r, seeds.OVERCOMMIT])
        return [int(c) for c in sorted(rng.choice(spare, size=more, replace=False))]

    def drops_out(self, r: int, client: int, traffic: RoundTraffic) -> bool:
        """Whether ``client``, sent a train message in round ``r``, never replies."""
        if self.dropout_rate <= 0.0:
            return False
        draw = np.random.default_rng([self.seed, r, client, seeds.DROPOUT]).random()
        if draw >= self.dropout_rate:
            return False
        traffic.dropped += 1
        return True

    def in_time(
        self,
        downloads: Sequence[tuple[int, int]],
        update_bytes: int,
        sampled: int,
        keep: int,
        traffic: RoundTraffic,
    ) -> set[int]:
        """The simulated round: who uploads when, when the round closes, whose update counts.

        ``downloads``: the delivering clients and the bytes each downloads; ``update_bytes``:
        what each uploads; ``sampled``: the clients sent a train message, dropouts included;
        ``keep``: the clients the strategy sampled. Returns the clients whose update is in
        before the round closes, and moves the clock to the close.
        """
        assert self.clock is not None
        start, finish = self._round_start, {}
        for client, down in downloads:
            seconds = self.clock.client_time(client, down, update_bytes).total
            if self.clock.online_until(client, start) < start + seconds:
                traffic.dropped += 1  # its window closed before it had uploaded
            else:
                finish[client] = seconds
        closed = close_round(
            finish,
            missing=sampled - len(finish),
            keep=keep if self.overcommit > 1.0 else None,
            deadline=self.deadline_s,
        )
        traffic.stragglers += len(closed.stragglers)
        traffic.sim_seconds += closed.seconds
        self.clock.now = start + closed.seconds
        return set(closed.kept)
