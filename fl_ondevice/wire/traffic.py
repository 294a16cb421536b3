"""What crossed the wire in a training round, counted as it happens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from flwr.app import Message, MetricRecord, RecordDict

from fl_ondevice.wire.message import CLIENT_SECONDS, LOADED_EXAMPLES, TRAIN_SECONDS, num_bytes


@dataclass
class RoundTraffic:
    """What crossed the wire in one training round, counted as it happens."""

    sampled: int = 0
    dropped: int = 0  # sampled but never replied (client.dropout_rate, or went offline)
    stragglers: int = 0  # their update would have arrived after the round closed
    unavailable: int = 0  # offline when the round started: could not be sampled
    sim_seconds: float = 0.0  # simulated: waiting for phones, then the round itself
    replied: int = 0  # replies received, crashes included
    failed: int = 0  # replied with an error (the client crashed)
    rejected: int = 0  # replied with an update that failed validation
    bytes_down: int = 0
    bytes_up: int = 0  # valid updates, as sent (encoded: before decoding)
    examples: int = 0
    loaded: int = 0  # examples the clients ran through `load` (personalization layout)
    client_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)  # the clients whose update was valid
    # Each client's evaluate reply this round, as it came: its numeric metrics (the strategy
    # sees only their aggregate; the server's per-client columns and files need them).
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def valid(self) -> int:
        """Updates a strategy may aggregate."""
        return self.replied - self.failed - self.rejected

    def count_download(self, msg: Message) -> None:
        """A sampled client was sent ``msg`` (a dropout downloads it too)."""
        self.sampled += 1
        self.bytes_down += download_bytes(msg)

    def count_loaded(self, reply: RecordDict) -> None:
        """The examples a train or evaluate reply says its client ran through ``load``."""
        for metrics in reply.metric_records.values():
            if isinstance(metrics.get(LOADED_EXAMPLES), int):
                self.loaded += int(cast(int, metrics[LOADED_EXAMPLES]))

    def count_evaluation(self, client: int, reply: RecordDict) -> None:
        """Keep ``client``'s evaluate reply's numeric metrics (of all its MetricRecords)."""
        self.evaluations[client] = {
            key: float(value)
            for record in reply.metric_records.values()
            for key, value in record.items()
            if isinstance(value, int | float)
        }

    def count_update(
        self, client: int, examples: float, bytes_sent: int, metrics: MetricRecord
    ) -> None:
        """``client``'s valid update: ``examples`` behind it, ``bytes_sent`` as it was sent,
        and the timings its ``metrics`` report."""
        self.examples += int(examples)
        self.updated.append(client)
        self.bytes_up += bytes_sent
        for key, values in (
            (CLIENT_SECONDS, self.client_seconds),
            (TRAIN_SECONDS, self.train_seconds),
        ):
            if isinstance(metrics.get(key), int | float):
                values.append(float(cast(float, metrics[key])))


def download_bytes(msg: Message) -> int:
    """What a phone downloads: the tensor bytes of the arrays it is sent."""
    return sum(num_bytes(r) for r in msg.content.array_records.values())
