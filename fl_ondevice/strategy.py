"""Flower's FedAvg with seeded client sampling, ordered aggregation and round accounting."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_ondevice.client_app import (
    CLIENT_SECONDS,
    EVAL_ACCURACY,
    NUM_EXAMPLES,
    PARTITION_ID,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
)

log = logging.getLogger(__name__)

_TRAIN_STREAM, _EVAL_STREAM = 0, 1  # separate random streams for train and evaluate sampling


@dataclass
class RoundStats:
    """What happened in one round, filled in as the round proceeds."""

    start: float = field(default_factory=time.perf_counter)
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    examples: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float = float("nan")
    client_seconds: float = float("nan")
    train_seconds: float = float("nan")
    client_eval_accuracy: float = float("nan")


class SeededFedAvg(FedAvg):
    """``flwr.serverapp.strategy.FedAvg`` whose randomness comes from the run seed.

    Flower's FedAvg samples nodes with Python's global ``random`` and aggregates replies in
    arrival order, so two runs with one seed differ. Here the *clients* (partitions) of a round
    are drawn from ``(seed, round)``, each message names its client (``partition-id``), and
    replies are averaged in client order. Nodes are interchangeable executors: in simulation a
    node holds no client state. The averaging itself is Flower's.

    Parameters
    ----------
    num_clients
        Number of clients (partitions) to sample from.
    seed
        Run seed.
    **kwargs
        Passed to ``FedAvg`` (fractions, minimum node counts, record keys).
    """

    def __init__(self, num_clients: int, seed: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.num_clients = num_clients
        self.seed = seed
        self.stats: dict[int, RoundStats] = {}
        self._client_of_node: dict[int, int] = {}

    def sample_clients(
        self, server_round: int, fraction: float, min_clients: int, stream: int
    ) -> list[int]:
        """Client ids of one round: max(int(n * fraction), min_clients) of n, without repeats."""
        n = self.num_clients
        k = min(n, max(int(n * fraction), min_clients))
        rng = np.random.default_rng([self.seed, server_round, stream])
        return sorted(int(c) for c in rng.choice(n, size=k, replace=False))

    def _messages(
        self,
        grid: Grid,
        client_ids: list[int],
        arrays: ArrayRecord,
        config: ConfigRecord,
        server_round: int,
        message_type: str,
    ) -> list[Message]:
        nodes = _wait_for_nodes(grid, len(client_ids))
        messages = []
        for node_id, client_id in zip(nodes, client_ids, strict=False):
            self._client_of_node[node_id] = client_id
            content = ConfigRecord(
                {**dict(config), SERVER_ROUND: server_round, PARTITION_ID: client_id}
            )
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: content})
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node_id))
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global weights to this round's seeded sample of clients."""
        clients = self.sample_clients(
            server_round, self.fraction_train, self.min_train_nodes, _TRAIN_STREAM
        )
        self.stats[server_round] = RoundStats(
            sampled=len(clients), bytes_down=len(clients) * _payload_bytes(arrays)
        )
        return self._messages(grid, clients, arrays, config, server_round, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average, over the replies sorted by client id."""
        replies = list(replies)
        ok = sorted(
            (m for m in replies if not m.has_error()),
            key=lambda m: self._client_of_node[m.metadata.src_node_id],
        )
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.replied, stats.failed = len(ok), len(replies) - len(ok)
        for m in replies:
            if m.has_error():
                log.warning("round %d: a client failed: %s", server_round, m.error.reason)
        if ok:
            metrics = [next(iter(m.content.metric_records.values())) for m in ok]
            stats.examples = int(sum(_number(mr, NUM_EXAMPLES) for mr in metrics))
            stats.bytes_up = sum(
                _payload_bytes(m.content.array_records[self.arrayrecord_key]) for m in ok
            )
            stats.client_seconds = float(np.median([_number(mr, CLIENT_SECONDS) for mr in metrics]))
            stats.train_seconds = float(np.median([_number(mr, TRAIN_SECONDS) for mr in metrics]))
        arrays, train_metrics = super().aggregate_train(server_round, ok)
        if train_metrics is not None:
            stats.train_loss = _number(train_metrics, TRAIN_LOSS)
        return arrays, train_metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a seeded sample of clients to evaluate on their local test split."""
        if self.fraction_evaluate == 0.0:
            return []
        clients = self.sample_clients(
            server_round, self.fraction_evaluate, self.min_evaluate_nodes, _EVAL_STREAM
        )
        return self._messages(grid, clients, arrays, config, server_round, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's weighted average of the clients' local-test metrics."""
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and server_round in self.stats:
            self.stats[server_round].client_eval_accuracy = _number(metrics, EVAL_ACCURACY)
        return metrics


def _number(record: MetricRecord, key: str) -> float:
    return float(cast(float, record[key]))


def _payload_bytes(arrays: ArrayRecord) -> int:
    # What a phone would download or upload: the tensors' bytes (Array.data adds a .npy header).
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values())


def _wait_for_nodes(grid: Grid, needed: int, timeout: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} nodes connected after {timeout:.0f} s; {needed} needed"
            )
        time.sleep(0.5)
    return nodes
