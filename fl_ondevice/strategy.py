"""Flower's FedAvg with seeded client sampling, ordered aggregation and round accounting."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fl_ondevice.checkpoint import WeightSpec
from fl_ondevice.client_app import (
    CLIENT_SECONDS,
    EVAL_ACCURACY,
    NUM_EXAMPLES,
    PARTITION_IDS,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    client_reply,
)
from fl_ondevice.config import messages_per_round, sample_size
from fl_ondevice.errors import CheckpointError

log = logging.getLogger(__name__)

# Separate random streams for train sampling, evaluate sampling and dropouts.
_TRAIN_STREAM, _EVAL_STREAM, _DROPOUT_STREAM = 0, 1, 2


@dataclass
class RoundStats:
    """What happened in one round, filled in as the round proceeds."""

    start: float = field(default_factory=time.perf_counter)
    sampled: int = 0
    dropped: int = 0  # sampled but never replied (client.dropout_rate)
    replied: int = 0
    failed: int = 0  # replied with an error (the client crashed)
    rejected: int = 0  # replied with an update that failed validation
    skipped: bool = False  # fewer than min_train_nodes valid updates: global model kept
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
    are drawn from ``(seed, round)``, each message names its clients (``partition-ids``), and
    updates are averaged in client order. Nodes are interchangeable executors: in simulation a
    node holds no client state. The averaging itself is Flower's.

    Every update is validated before averaging (tensor names, shapes and dtypes equal to the
    global model's, finite values, ``num-examples`` > 0); a round with fewer than
    ``min_train_nodes`` valid updates is skipped and the global model kept.

    Parameters
    ----------
    num_clients
        Number of clients (partitions) to sample from.
    seed
        Run seed.
    weight_spec
        The global model's tensors, to validate updates against.
    dropout_rate
        Share of sampled clients that drop out of a round (drawn from the seed); their messages
        are not sent, as if the phone went offline after downloading the model.
    round_offset
        Rounds already completed (a resumed run): Flower's round 1 is round ``round_offset + 1``.
    workers, clients_per_message, client_sizes
        How many clients train at once, how many clients one message carries (None: see
        ``config.messages_per_round``), and each client's training examples, by which the
        clients are spread over a round's messages (``group_clients``). No node gets two
        messages in a round.
    **kwargs
        Passed to ``FedAvg`` (fractions, minimum node counts, record keys).
    """

    def __init__(
        self,
        num_clients: int,
        seed: int,
        weight_spec: WeightSpec,
        dropout_rate: float = 0.0,
        round_offset: int = 0,
        workers: int = 1,
        clients_per_message: int | None = None,
        client_sizes: Sequence[int] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.num_clients = num_clients
        self.seed = seed
        self.weight_spec = weight_spec
        self.dropout_rate = dropout_rate
        self.round_offset = round_offset
        self.workers = workers
        self.clients_per_message = clients_per_message
        self.client_sizes = client_sizes
        self.stats: dict[int, RoundStats] = {}
        self._clients_of_node: dict[int, list[int]] = {}

    def sample_clients(
        self, server_round: int, fraction: float, min_clients: int, stream: int
    ) -> list[int]:
        """Client ids of one round: max(int(n * fraction), min_clients) of n, without repeats."""
        k = sample_size(self.num_clients, fraction, min_clients)
        rng = np.random.default_rng([self.seed, server_round, stream])
        return sorted(int(c) for c in rng.choice(self.num_clients, size=k, replace=False))

    def _messages(
        self,
        grid: Grid,
        client_ids: list[int],
        arrays: ArrayRecord,
        config: ConfigRecord,
        server_round: int,
        message_type: str,
    ) -> list[Message]:
        if not client_ids:
            return []
        nodes = _wait_for_nodes(grid)
        wanted = messages_per_round(len(client_ids), self.workers, self.clients_per_message)
        groups = group_clients(client_ids, min(len(nodes), wanted), self.client_sizes)
        messages = []
        for node_id, group in zip(nodes, groups, strict=False):
            self._clients_of_node[node_id] = group
            content = ConfigRecord(
                {**dict(config), SERVER_ROUND: server_round, PARTITION_IDS: group}
            )
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: content})
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node_id))
        return messages

    def client_replies(
        self, replies: Iterable[Message], r: int, training: bool
    ) -> list[tuple[int, RecordDict]]:
        """Each client's part of the replies, in client order; failed clients are logged (and
        counted in the round's stats when ``training``)."""
        out: list[tuple[int, RecordDict]] = []
        for m in replies:
            for client in self._clients_of_node[m.metadata.src_node_id]:
                part = (
                    client_error(m.error.reason or "", client, r)
                    if m.has_error()  # the whole message failed (e.g. the worker died)
                    else client_reply(m.content, client)
                )
                if isinstance(part, str):
                    self.stats.setdefault(r, RoundStats()).failed += training
                    log.warning("round %d: %s", r, part)
                else:
                    out.append((client, part))
        return sorted(out, key=lambda item: item[0])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global weights to this round's seeded sample of clients."""
        r = server_round + self.round_offset
        clients = self.sample_clients(r, self.fraction_train, self.min_train_nodes, _TRAIN_STREAM)
        draws = np.random.default_rng([self.seed, r, _DROPOUT_STREAM]).random(len(clients))
        active = [c for c, d in zip(clients, draws, strict=True) if d >= self.dropout_rate]
        self.stats[r] = RoundStats(
            sampled=len(clients),
            dropped=len(clients) - len(active),
            bytes_down=len(clients) * _payload_bytes(arrays),  # dropouts downloaded it too
        )
        return self._messages(grid, active, arrays, config, r, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average of the valid updates, sorted by client id."""
        r = server_round + self.round_offset
        stats = self.stats.setdefault(r, RoundStats())
        ok = []
        parts = self.client_replies(replies, r, training=True)
        for client, part in parts:
            if reason := update_problem(part, self.weight_spec, self.weighted_by_key):
                stats.rejected += 1
                log.warning("round %d: update of client %d rejected: %s", r, client, reason)
            else:
                ok.append(part)
        stats.replied = len(parts) + stats.failed
        if len(ok) < self.min_train_nodes:
            stats.skipped = True
            log.warning(
                "round %d skipped: %d valid updates, strategy.min_train_nodes=%d; the global "
                "model is unchanged",
                r,
                len(ok),
                self.min_train_nodes,
            )
            return None, None
        # Here ok is not empty: min_train_nodes >= 1 (config.StrategyConfig).
        metrics = [next(iter(part.metric_records.values())) for part in ok]
        stats.examples = int(sum(_number(mr, NUM_EXAMPLES) for mr in metrics))
        stats.bytes_up = sum(_payload_bytes(p.array_records[self.arrayrecord_key]) for p in ok)
        stats.client_seconds = float(np.median([_number(mr, CLIENT_SECONDS) for mr in metrics]))
        stats.train_seconds = float(np.median([_number(mr, TRAIN_SECONDS) for mr in metrics]))
        # Flower's FedAvg averaging, applied to the clients' updates rather than the messages.
        arrays = aggregate_arrayrecords(ok, self.weighted_by_key)
        train_metrics = self.train_metrics_aggr_fn(ok, self.weighted_by_key)
        if TRAIN_LOSS in train_metrics:
            stats.train_loss = _number(train_metrics, TRAIN_LOSS)
        return arrays, train_metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a seeded sample of clients to evaluate on their local test split."""
        if self.fraction_evaluate == 0.0:
            return []
        r = server_round + self.round_offset
        clients = self.sample_clients(
            r, self.fraction_evaluate, self.min_evaluate_nodes, _EVAL_STREAM
        )
        return self._messages(grid, clients, arrays, config, r, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's weighted average of the clients' local-test metrics."""
        r = server_round + self.round_offset
        parts = [part for _, part in self.client_replies(replies, r, training=False)]
        if not parts:
            return None
        metrics = self.evaluate_metrics_aggr_fn(parts, self.weighted_by_key)
        if r in self.stats:
            self.stats[r].client_eval_accuracy = _number(metrics, EVAL_ACCURACY)
        return metrics


def group_clients(
    client_ids: Sequence[int], messages: int, sizes: Sequence[int] | None = None
) -> list[list[int]]:
    """Spread clients over ``messages`` groups of near-equal work, at most ceil(k / messages)
    clients each: largest client first, each into the lightest group with room (LPT).

    ``sizes[c]`` is client c's work (training examples); None counts every client as 1.
    Deterministic: ties go to the lower client id and the lower group.
    """

    def size(c: int) -> int:
        return 1 if sizes is None else int(sizes[c])

    messages = max(1, min(messages, len(client_ids)))
    room = -(-len(client_ids) // messages)
    groups: list[list[int]] = [[] for _ in range(messages)]
    loads = [0] * messages
    for c in sorted(client_ids, key=lambda c: (-size(c), c)):
        i = min((j for j in range(messages) if len(groups[j]) < room), key=lambda j: loads[j])
        groups[i].append(c)
        loads[i] += size(c)
    return [sorted(g) for g in groups]


def update_problem(content: RecordDict, spec: WeightSpec, weighted_by_key: str) -> str | None:
    """What is wrong with a client's update, or None: the checks a server runs before averaging.

    One ArrayRecord whose tensor names, shapes and dtypes equal the global model's (``spec``),
    every value finite, and one MetricRecord whose ``weighted_by_key`` is a number > 0.
    """
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected one ArrayRecord and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    examples = metrics.get(weighted_by_key)
    if not isinstance(examples, int | float) or not examples > 0:
        return f"{weighted_by_key}={examples!r}, must be > 0"
    arrays = next(iter(content.array_records.values()))
    weights = {name: a.numpy() for name, a in arrays.items()}
    try:
        spec.validate(weights, "update")
    except CheckpointError as err:
        return str(err)
    bad = [name for name, w in weights.items() if not np.isfinite(w).all()]
    return f"non-finite values (NaN/Inf) in {bad}" if bad else None


def client_error(reason: str, client: int, server_round: int) -> str:
    """A client's crash in one line: client, round and cause, not the worker's stack dump."""
    # Flower's reason reads "<class '...ClientAppException'>:<'...Message: client 3, round 2,
    # train: cause'>"; our ClientApp put the client, round and cause in that message.
    ours = re.findall(r"client \d+, round \d+, \w+: [^\n]*", reason)
    if ours:
        return ours[-1].removesuffix("'>")
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return f"client {client}, round {server_round} failed: {lines[-1] if lines else 'no reason'}"


def _number(record: MetricRecord, key: str) -> float:
    return float(cast(float, record[key]))


def _payload_bytes(arrays: ArrayRecord) -> int:
    # What a phone would download or upload: the tensors' bytes (Array.data adds a .npy header).
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values())


def _wait_for_nodes(grid: Grid, timeout: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not (nodes := sorted(grid.get_node_ids())):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no node connected after {timeout:.0f} s")
        time.sleep(0.5)
    return nodes
