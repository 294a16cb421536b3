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

from fl_ondevice.checkpoint import Weights, WeightSpec
from fl_ondevice.client_app import (
    CLIENT_SECONDS,
    EVAL_ACCURACY,
    NUM_EXAMPLES,
    PARTITION_IDS,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    client_reply,
    from_arrays,
    to_arrays,
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
    updates are averaged in an order fixed by the clients, not by arrival (``MessageOrderedSum``).
    Nodes are interchangeable executors: in simulation a node holds no client state.

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
            # What a phone downloads: the global model's tensor bytes (dropouts downloaded too).
            bytes_down=len(clients) * self.weight_spec.num_bytes,
        )
        return self._messages(grid, active, arrays, config, r, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the valid updates: sum(n_k * w_k) / sum(n_k) over clients k.

        ``replies`` is consumed as it arrives (``ReplyStream``): each message's updates are
        validated, folded into that message's sum and dropped, so the server holds one sum per
        message instead of every update of the round. The result does not depend on the order
        in which messages arrive (``MessageOrderedSum``).
        """
        r = server_round + self.round_offset
        stats = self.stats.setdefault(r, RoundStats())
        total = MessageOrderedSum()
        kept: list[tuple[int, MetricRecord]] = []
        replied = 0
        for message in replies:
            parts = self.client_replies([message], r, training=True)
            replied += len(parts)
            updates = []
            for client, part in parts:
                checked = checked_update(part, self.weight_spec, self.weighted_by_key)
                if isinstance(checked, str):
                    stats.rejected += 1
                    log.warning("round %d: update of client %d rejected: %s", r, client, checked)
                    continue
                updates.append(checked)
                kept.append((client, next(iter(part.metric_records.values()))))
            if updates:
                total.add(min(c for c, _ in parts), updates)
        stats.replied = replied + stats.failed
        if len(kept) < self.min_train_nodes:
            stats.skipped = True
            log.warning(
                "round %d skipped: %d valid updates, strategy.min_train_nodes=%d; the global "
                "model is unchanged",
                r,
                len(kept),
                self.min_train_nodes,
            )
            return None, None
        # Here kept is not empty: min_train_nodes >= 1 (config.StrategyConfig).
        metrics = [mr for _, mr in sorted(kept, key=lambda item: item[0])]
        stats.examples = int(sum(_number(mr, NUM_EXAMPLES) for mr in metrics))
        stats.bytes_up = len(metrics) * self.weight_spec.num_bytes
        stats.client_seconds = float(np.median([_number(mr, CLIENT_SECONDS) for mr in metrics]))
        stats.train_seconds = float(np.median([_number(mr, TRAIN_SECONDS) for mr in metrics]))
        train_metrics = self.train_metrics_aggr_fn(
            [RecordDict({"metrics": mr}) for mr in metrics], self.weighted_by_key
        )
        if TRAIN_LOSS in train_metrics:
            stats.train_loss = _number(train_metrics, TRAIN_LOSS)
        return to_arrays(total.average()), train_metrics

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


class MessageOrderedSum:
    """The weighted average of client updates, summed message by message as replies arrive.

    A message's updates are summed (float64, in client order) when it arrives; the message sums
    are added in the order of their first client when the round is complete. So the result is
    the same whatever order the engine delivers messages in, and the server holds one sum per
    message (a message with a single client keeps that update as it is).
    """

    def __init__(self) -> None:
        self._sums: dict[int, tuple[float, Weights]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.weight = 0.0

    def add(self, first_client: int, updates: Sequence[tuple[float, Weights]]) -> None:
        """Fold in one message's ``(num_examples, weights)`` updates, given in client order."""
        self._dtypes = self._dtypes or {name: w.dtype for name, w in updates[0][1].items()}
        if len(updates) == 1:
            self._sums[first_client] = updates[0]
        else:
            self._sums[first_client] = (1.0, _weighted_sum(updates))
        self.weight += sum(n for n, _ in updates)

    def average(self) -> Weights:
        """sum(n_k * w_k) / sum(n_k), in the dtypes of the updates; empties the sum."""
        parts = [self._sums.pop(k) for k in sorted(self._sums)]
        total = _weighted_sum(parts)
        return {name: (s / self.weight).astype(self._dtypes[name]) for name, s in total.items()}


def _weighted_sum(updates: Sequence[tuple[float, Weights]]) -> Weights:
    """sum(n * w) over ``updates`` in float64, in the given order."""
    (n0, w0), *rest = updates
    total = {name: np.multiply(w, n0, dtype=np.float64) for name, w in w0.items()}
    for n, weights in rest:
        for name, w in weights.items():
            total[name] += np.multiply(w, n, dtype=np.float64)
    return total


def checked_update(
    content: RecordDict, spec: WeightSpec, weighted_by_key: str
) -> tuple[float, Weights] | str:
    """A client's ``(num_examples, weights)``, or what is wrong with its update: the checks a
    server runs before averaging.

    One ArrayRecord whose tensor names, shapes and dtypes equal the global model's (``spec``),
    every value finite, and one MetricRecord whose ``weighted_by_key`` is a number > 0.
    """
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected one ArrayRecord and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    examples = metrics.get(weighted_by_key)
    if not isinstance(examples, int | float) or not examples > 0:
        return f"{weighted_by_key}={examples!r}, must be > 0"
    weights = from_arrays(next(iter(content.array_records.values())))
    try:
        spec.validate(weights, "update")
    except CheckpointError as err:
        return str(err)
    bad = [name for name, w in weights.items() if not np.isfinite(w).all()]
    return f"non-finite values (NaN/Inf) in {bad}" if bad else (float(examples), weights)


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


def _wait_for_nodes(grid: Grid, timeout: float = 600.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not (nodes := sorted(grid.get_node_ids())):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no node connected after {timeout:.0f} s")
        time.sleep(0.5)
    return nodes
