"""The Grid a strategy sees: one node per client, several clients per engine message beneath it.

Any Flower strategy samples nodes and sends each a message. Here a node is a simulated client
(node id = ``FIRST_NODE_ID`` + client id), and :class:`ClientGrid` carries the strategy's
per-client messages to the engine's real nodes: clients that got the same content share one
engine message (``fl_ondevice.wire.message.pack``), trained one after another by one worker, and the
reply is taken apart again into one reply per client, in client order. Why group: the engine's
costs are per message (Flower's in-memory link state scans every stored message for every node
on each poll; Ray ships the ClientApp with each message), so one message per client made them
dominate small models in large rounds.

A deployed SuperNode owns its data: the server asks each node that connects which partition
its node config gives it (a ``query``), and sends that client's messages to that node only.

The model goes by content (``fl_ondevice.wire.message``): its bytes with a node's first message of
the run, then its SHA-256 alone; a node that answers ``MODEL_MISSING`` (another machine's
worker of a Ray cluster, a cleared cache) is sent the bytes again.

With phones (``fl_ondevice.devicetime.clock``), the clients the strategy sees are those online when
the round starts; a round's train messages go only to the clients whose updates would reach the
server before the round closes on the simulated clock (over-commitment adds clients the strategy
did not sample; later updates are stragglers, not trained at all: the phone's work is lost).

On the way back an encoded update (``client.update_encoding``) is decoded to float32 weights
against the global weights the strategy sent that client, and every update is checked
(``fl_ondevice.wire.updates``): a crash, a rejected update or a missing client reaches the strategy
as an error reply, which every Flower strategy skips. Each client's evaluate metrics are kept
per round (``RoundTraffic.evaluations``) for the server's per-client outputs; the strategy gets
the replies as they came.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast
from uuid import uuid4

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fl_ondevice import seeds
from fl_ondevice.devicetime.clock import DeviceClock, close_round
from fl_ondevice.errors import ConfigError
from fl_ondevice.ondevice.weights import WeightSpec
from fl_ondevice.wire.encoding import FLOAT32, decode_update, encoded_bytes
from fl_ondevice.wire.message import (
    ARRAYS,
    CLIENT_SECONDS,
    CONFIG,
    LOADED_EXAMPLES,
    MODEL_MISSING,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    TRAIN_SECONDS,
    array_view,
    num_bytes,
    pack,
    to_arrays,
    unpack_replies,
)
from fl_ondevice.wire.updates import checked_update, client_error

log = logging.getLogger(__name__)

FIRST_NODE_ID = 1_000_000  # client c is node FIRST_NODE_ID + c to the strategy
MESSAGES_PER_WORKER = 4  # few messages per round, enough to balance the workers
ONE_PER_MESSAGE_UP_TO = 16  # clients per worker: up to this, each client gets its own message
ERROR_CODE = 1  # Flower's Error code for a client that failed or sent a rejected update
QUERY_SECONDS = 60.0  # how long a new SuperNode may take to say which partition it owns


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


@dataclass
class _Sent:
    client: int
    message: Message  # the strategy's message to this client


@dataclass
class _Pushed:
    virtual_ids: list[str]  # the strategy's messages it carries
    node: int
    with_model: bool  # it carried the model's bytes


class ClientGrid(Grid):
    """A Grid with one node per client over the engine's ``grid``.

    Parameters
    ----------
    grid
        The engine's Grid (simulation or a deployed SuperLink).
    num_clients, seed
        The clients (nodes to the strategy) and the run seed.
    weight_spec
        The global model's tensors: a train reply must match them.
    model, run_config
        What every engine message carries for the worker: the model as ``(sha256, bytes)``
        and the run config.
    workers, clients_per_message, client_sizes
        How many clients train at once, clients per engine message (None: see
        :func:`messages_per_round`) and each client's training examples, by which clients are
        spread over a round's messages (:func:`group_clients`).
    dropout_rate
        Share of the clients sent a train message that never reply (a seeded draw per round
        and client): the phone downloaded the model and went offline.
    pull_seconds
        How often ``send_and_receive`` asks the engine for replies.
    nodes_own_data
        The engine's nodes are SuperNodes that own one partition each (their node config's
        ``partition-id`` of ``num-partitions`` = ``num_clients``); else they are executors
        that train whichever clients a message names (the simulation).
    update_encoding
        How clients encode their train replies (``client.update_encoding``, see
        ``fl_ondevice.wire.encoding``). Other than ``float32``, each reply is decoded against the
        global weights the strategy sent that client (its ``arrays`` record) before it is
        checked, so a strategy only sees float32 weights; ``bytes_up`` counts what was sent.
        A reply that does not decode is rejected, as one that fails the check.
    clock, overcommit, deadline_s
        The phones' simulated clock (None: no device time) and when a round closes
        (``fl_ondevice.config.RoundConfig``).
    """

    def __init__(
        self,
        grid: Grid,
        num_clients: int,
        seed: int,
        weight_spec: WeightSpec,
        model: tuple[str, bytes],
        run_config: ConfigRecord,
        workers: int = 1,
        clients_per_message: int | None = None,
        client_sizes: Sequence[int] | None = None,
        dropout_rate: float = 0.0,
        pull_seconds: float = 0.005,
        nodes_own_data: bool = False,
        update_encoding: str = FLOAT32,
        clock: DeviceClock | None = None,
        overcommit: float = 1.0,
        deadline_s: float | None = None,
    ) -> None:
        self.grid = grid
        self.num_clients = num_clients
        self.seed = seed
        self.weight_spec = weight_spec
        self.model = model
        self.run_config = run_config
        self.workers = workers
        self.clients_per_message = clients_per_message
        self.client_sizes = client_sizes
        self.dropout_rate = dropout_rate
        self.pull_seconds = pull_seconds
        self.nodes_own_data = nodes_own_data
        self.update_encoding = update_encoding
        # One update's bytes as sent; raises for an unknown encoding before any round starts.
        self.update_bytes = encoded_bytes(weight_spec, update_encoding)
        self.clock = clock
        self.overcommit, self.deadline_s = overcommit, deadline_s
        self.round = 0  # set by the round loop: faults and traffic are counted per round
        self._round_start = 0.0  # with a clock: when the round started, simulated seconds
        self._online: set[int] = set()  # with a clock: the clients online at the round's start
        self.traffic: dict[int, RoundTraffic] = {}
        self._sent: dict[str, _Sent] = {}  # virtual message id -> its client
        self._groups: dict[str, _Pushed] = {}  # engine message id -> what it carries
        self._ready: dict[str, Message] = {}  # per-client replies not yet pulled
        self._have_model: set[int] = set()  # engine nodes sent the model's bytes
        self._node_of: dict[int, int] = {}  # nodes_own_data: client -> the node that owns it
        self._live: set[int] = set()  # nodes_own_data: the nodes connected at the last look

    # -- what the strategy sees ---------------------------------------------------------------
    def begin_round(self, r: int, needed: int) -> None:
        """Start round ``r``; with phones, wait on the simulated clock until ``needed`` are
        online."""
        self.round = r
        if self.clock is None:
            return
        traffic = self.traffic.setdefault(r, RoundTraffic())
        traffic.sim_seconds = self.clock.wait_for(needed)
        self._round_start = self.clock.now
        self._online = set(self.clock.online())
        traffic.unavailable = self.num_clients - len(self._online)

    def get_node_ids(self) -> Iterable[int]:
        """One node per client (with ``nodes_own_data``: per client whose node is connected;
        with phones: per client online when the round started)."""
        if not self.nodes_own_data:
            clients: Iterable[int] = range(self.num_clients)
        else:
            self._discover()
            clients = sorted(c for c, n in self._node_of.items() if n in self._live)
        if self.clock is not None:
            clients = [c for c in clients if c in self._online]
        return [FIRST_NODE_ID + c for c in clients]

    def _discover(self) -> None:
        # Ask each node not seen before which partition it owns. A node that comes back after
        # a crash registers with a new id and takes its partition over from the old one.
        self._live = set(self.grid.get_node_ids())
        known = set(self._node_of.values())
        new = sorted(self._live - known)
        if not new:
            return
        queries = [
            self.grid.create_message(RecordDict(), MessageType.QUERY, n, group_id="partition")
            for n in new
        ]
        for reply in self.grid.send_and_receive(queries, timeout=QUERY_SECONDS):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise ConfigError(f"SuperNode {node}: {reply.error.reason}")
            own = reply.content.config_records[CONFIG]
            client, parts = cast(int, own[PARTITION_ID]), cast(int, own[NUM_PARTITIONS])
            if parts != self.num_clients or not 0 <= client < self.num_clients:
                raise ConfigError(
                    f"SuperNode {node} has {PARTITION_ID}={client} {NUM_PARTITIONS}={parts} "
                    f"but the run has num_clients={self.num_clients}: start every SuperNode "
                    f"with {NUM_PARTITIONS}={self.num_clients} and its own {PARTITION_ID} in "
                    f"0..{self.num_clients - 1}"
                )
            old = self._node_of.get(client)
            if old is not None and old in self._live and old != node:
                log.warning("SuperNodes %d and %d both own partition %s", old, node, client)
            self._node_of[client] = node
            log.info("SuperNode %d owns partition %s", node, client)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send the strategy's per-client messages, grouped into engine messages; return the
        ids of those sent (a dropped-out client's message is lost on the way, a straggler's
        is never trained)."""
        batch = [self._accept(msg) for msg in messages]
        train = [s for s in batch if self._train(s.message)]
        extra = self._overcommitted(train) if train and self.clock is not None else []
        going = [s for s in batch if not self._train(s.message)]
        delivering = []
        for sent in train + extra:
            self._count_download(sent.client, sent.message)
            if not self._drops_out(sent.client):
                delivering.append(sent)
        if train and self.clock is not None:
            delivering = self._in_time(delivering, len(train) + len(extra), keep=len(train))
        by_content: dict[tuple, list[str]] = {}
        for sent in going + delivering:
            self._sent[sent.message.metadata.message_id] = sent
            by_content.setdefault(_content_key(sent.message), []).append(
                sent.message.metadata.message_id
            )
        for ids in by_content.values():
            self._push_group(ids)
        return [s.message.metadata.message_id for s in going + delivering]

    def _accept(self, msg: Message) -> _Sent:
        client = msg.metadata.dst_node_id - FIRST_NODE_ID
        if not 0 <= client < self.num_clients:
            raise ValueError(f"message for node {msg.metadata.dst_node_id}: not a client")
        msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
        return _Sent(client, msg)

    def _overcommitted(self, train: list[_Sent]) -> list[_Sent]:
        # Over-commitment: ceil(K x factor) - K more online clients that the strategy did not
        # sample, drawn from the round's seed, sent the content of the strategy's first message.
        if self.overcommit <= 1.0:
            return []
        sampled = {s.client for s in train}
        spare = sorted({n - FIRST_NODE_ID for n in self.get_node_ids()} - sampled)
        more = min(len(spare), math.ceil(len(train) * self.overcommit) - len(train))
        rng = np.random.default_rng([self.seed, self.round, seeds.OVERCOMMIT])
        first = train[0].message
        return [
            self._accept(
                Message(
                    first.content,
                    FIRST_NODE_ID + int(c),
                    first.metadata.message_type,
                    group_id=first.metadata.group_id,
                )
            )
            for c in sorted(rng.choice(spare, size=more, replace=False))
        ]

    def _in_time(self, delivering: list[_Sent], sampled: int, keep: int) -> list[_Sent]:
        # The simulated round: who uploads when, when the round closes, whose update counts.
        assert self.clock is not None
        traffic = self.traffic[self.round]
        start, finish = self._round_start, {}
        for sent in delivering:
            down = _download_bytes(sent.message)
            seconds = self.clock.client_time(sent.client, down, self.update_bytes).total
            if self.clock.online_until(sent.client, start) < start + seconds:
                traffic.dropped += 1  # its window closed before it had uploaded
            else:
                finish[sent.client] = seconds
        closed = close_round(
            finish,
            missing=sampled - len(finish),
            keep=keep if self.overcommit > 1.0 else None,
            deadline=self.deadline_s,
        )
        traffic.stragglers += len(closed.stragglers)
        traffic.sim_seconds += closed.seconds
        self.clock.now = start + closed.seconds
        kept = set(closed.kept)
        return [s for s in delivering if s.client in kept]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The per-client replies to ``message_ids`` that have arrived."""
        self._pull_engine()
        return [self._ready.pop(i) for i in list(message_ids) if i in self._ready]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Push ``messages`` now; yield their replies in client order, each as soon as the
        replies of every client before it are in, until all came or ``timeout`` seconds passed.

        Client order makes a strategy's result independent of the engine's timing; yielding
        early lets a strategy that aggregates as replies arrive hold only a few of them.
        """
        ids = list(self.push_messages(messages))
        ids.sort(key=lambda i: self._sent[i].client)
        return self._in_client_order(ids, timeout)

    def _in_client_order(self, ids: list[str], timeout: float | None) -> Iterator[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        arrived: dict[str, Message] = {}
        pending = set(ids)
        nxt = 0
        while nxt < len(ids):
            for reply in self.pull_messages(pending):
                arrived[reply.metadata.reply_to_message_id] = reply
                pending.discard(reply.metadata.reply_to_message_id)
            while nxt < len(ids) and ids[nxt] in arrived:
                yield arrived.pop(ids[nxt])  # the stream keeps no reference to what it gave
                nxt += 1
            if nxt < len(ids):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(self.pull_seconds)
        for i in ids[nxt:]:  # past the timeout: what arrived still counts, in client order
            if i in arrived:
                yield arrived.pop(i)
        self._abandon(pending)

    def _abandon(self, ids: set[str]) -> None:
        # Past the timeout: forget these clients, and the engine messages that only they are in.
        for i in ids:
            self._sent.pop(i, None)
        for engine_id, pushed in list(self._groups.items()):
            if not set(pushed.virtual_ids) - ids:
                del self._groups[engine_id]

    # -- beneath the strategy: engine messages ------------------------------------------------
    def _push_group(self, ids: list[str]) -> None:
        clients = [self._sent[i].client for i in ids]
        if self.nodes_own_data:
            targets = [(self._node_of[c], [c]) for c in sorted(clients)]
        else:
            nodes = _nodes_in_order(self.grid)
            wanted = messages_per_round(len(clients), self.workers, self.clients_per_message)
            groups = group_clients(clients, min(len(nodes), wanted), self.client_sizes)
            targets = list(zip(nodes, groups, strict=False))
        id_of = {self._sent[i].client: i for i in ids}
        self._push([_Pushed([id_of[c] for c in group], node, False) for node, group in targets])

    def _push(self, engine_msgs: list[_Pushed]) -> None:
        messages = []
        for pushed in engine_msgs:
            first = self._sent[pushed.virtual_ids[0]].message
            pushed.with_model = pushed.with_model or pushed.node not in self._have_model
            self._have_model.add(pushed.node)
            sha256, data = self.model
            model = (sha256, data if pushed.with_model else None)
            clients = [self._sent[i].client for i in pushed.virtual_ids]
            content = pack(first.content, clients, model, self.run_config)
            messages.append(
                self.grid.create_message(
                    content, first.metadata.message_type, pushed.node, group_id=str(self.round)
                )
            )
        for engine_id, pushed in zip(self.grid.push_messages(messages), engine_msgs, strict=True):
            self._groups[engine_id] = pushed

    def _pull_engine(self) -> None:
        if not self._groups:
            return
        resend = []
        for reply in self.grid.pull_messages(list(self._groups)):
            pushed = self._groups.pop(reply.metadata.reply_to_message_id, None)
            virtual_ids = [] if pushed is None else pushed.virtual_ids
            clients = [self._sent[i].client for i in virtual_ids if i in self._sent]
            if pushed and reply.has_error() and reply.error.code == MODEL_MISSING:
                if not pushed.with_model and len(clients) == len(virtual_ids):
                    pushed.with_model = True
                    resend.append(pushed)
                    continue
            if reply.has_error():  # the whole message failed (e.g. the worker died)
                parts: dict[int, RecordDict | str] = {
                    c: client_error(reply.error.reason or "", c, self.round) for c in clients
                }
            else:
                parts = unpack_replies(reply.content, clients)
            for i in virtual_ids:
                sent = self._sent.pop(i, None)
                if sent is not None:  # None: given up on at a timeout
                    self._ready[i] = self._client_reply(sent, parts[sent.client])
        if resend:
            self._push(resend)

    def _client_reply(self, sent: _Sent, part: RecordDict | str) -> Message:
        training = self._train(sent.message)
        traffic = self.traffic.setdefault(self.round, RoundTraffic())
        traffic.replied += training
        if isinstance(part, str):
            traffic.failed += training
            log.warning("round %d: %s", self.round, part)
            return Message(Error(ERROR_CODE, part), reply_to=sent.message)
        for metrics in part.metric_records.values():  # train and evaluate replies alike
            if isinstance(metrics.get(LOADED_EXAMPLES), int):
                traffic.loaded += int(cast(int, metrics[LOADED_EXAMPLES]))
        if not training:
            traffic.evaluations[sent.client] = _numbers(part)
            return Message(part, reply_to=sent.message)
        sent_part = part  # what crossed the wire: bytes_up counts it
        if self.update_encoding != FLOAT32:
            decoded = self._decoded(sent, part)
            if isinstance(decoded, str):
                return self._rejected(sent, traffic, decoded)
            part = decoded
        checked = checked_update(part, self.weight_spec, NUM_EXAMPLES)
        if isinstance(checked, str):
            return self._rejected(sent, traffic, checked)
        metrics = next(iter(part.metric_records.values()))
        traffic.examples += int(checked[0])
        traffic.updated.append(sent.client)
        traffic.bytes_up += num_bytes(next(iter(sent_part.array_records.values())))
        for key, values in (
            (CLIENT_SECONDS, traffic.client_seconds),
            (TRAIN_SECONDS, traffic.train_seconds),
        ):
            if isinstance(metrics.get(key), int | float):
                values.append(float(cast(float, metrics[key])))
        return Message(part, reply_to=sent.message)

    def _rejected(self, sent: _Sent, traffic: RoundTraffic, why: str) -> Message:
        traffic.rejected += 1
        reason = f"update of client {sent.client} rejected: {why}"
        log.warning("round %d: %s", self.round, reason)
        return Message(Error(ERROR_CODE, reason), reply_to=sent.message)

    def _decoded(self, sent: _Sent, part: RecordDict) -> RecordDict | str:
        # The reply with its encoded ArrayRecord replaced by the float32 weights g + d, under
        # the same key, with g what the strategy sent this client; or why it does not decode.
        if len(part.array_records) != 1:
            return "expected one ArrayRecord"
        received = sent.message.content.array_records.get(ARRAYS)
        if received is None:
            return f"the strategy sent no '{ARRAYS}' ArrayRecord to decode the update against"
        key, record = next(iter(part.array_records.items()))
        decoded = decode_update(
            {name: array_view(a) for name, a in record.items()},
            {name: array_view(a) for name, a in received.items()},
            self.update_encoding,
        )
        if isinstance(decoded, str):
            return decoded
        content = RecordDict(dict(part.items()))
        content[key] = to_arrays(decoded)
        return content

    # -- faults and accounting ----------------------------------------------------------------
    def _train(self, msg: Message) -> bool:
        return msg.metadata.message_type.split(".")[0] == MessageType.TRAIN

    def _count_download(self, client: int, msg: Message) -> None:
        traffic = self.traffic.setdefault(self.round, RoundTraffic())
        traffic.sampled += 1
        traffic.bytes_down += _download_bytes(msg)  # dropouts downloaded them too

    def _drops_out(self, client: int) -> bool:
        if self.dropout_rate <= 0.0:
            return False
        draw = np.random.default_rng([self.seed, self.round, client, seeds.DROPOUT]).random()
        if draw >= self.dropout_rate:
            return False
        self.traffic[self.round].dropped += 1
        return True

    # -- the rest of Grid, passed through -----------------------------------------------------
    @property
    def run(self) -> Run:
        return self.grid.run

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)


def _numbers(content: RecordDict) -> dict[str, float]:
    # A reply's numeric metrics, of all its MetricRecords (ours send one).
    return {
        key: float(value)
        for record in content.metric_records.values()
        for key, value in record.items()
        if isinstance(value, int | float)
    }


def _download_bytes(msg: Message) -> int:
    # What a phone downloads: the tensor bytes of the arrays it is sent.
    return sum(num_bytes(r) for r in msg.content.array_records.values())


def _content_key(msg: Message) -> tuple:
    # Clients whose messages hold the very same records (Flower's strategies send one
    # RecordDict to all) share an engine message; small config records are compared by value.
    return (msg.metadata.message_type,) + tuple(
        (key, id(record)) if key not in msg.content.config_records else (key, repr(record))
        for key, record in msg.content.items()
    )


def _nodes_in_order(grid: Grid, timeout: float = 600.0) -> list[int]:
    """The engine's nodes in the order they registered: Flower's simulation engine picks up
    messages node by node in that order, so runs sent to them in that order start in it."""
    deadline = time.monotonic() + timeout
    while not (nodes := list(grid.get_nodes())):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no node connected after {timeout:.0f} s")
        time.sleep(0.5)
    return [n.node_id for n in sorted(nodes, key=lambda n: (n.registered_at, n.node_id))]


def messages_per_round(clients: int, workers: int, clients_per_message: int | None) -> int:
    """How many engine messages carry a round's ``clients``.

    Large rounds go out as ``MESSAGES_PER_WORKER`` messages per worker, each with several
    clients. Small rounds keep one client per message: there the engine's per-message cost is
    small, and whole clients as the unit of work balance the workers best (8 messages for 10
    equal clients on 2 workers can take 6 client-times instead of 5).
    """
    if clients_per_message is not None:
        return max(1, -(-clients // clients_per_message))
    workers = max(1, workers)
    if clients <= ONE_PER_MESSAGE_UP_TO * workers:
        return max(1, clients)
    return MESSAGES_PER_WORKER * workers


def group_clients(
    client_ids: Sequence[int], messages: int, sizes: Sequence[int] | None = None
) -> list[list[int]]:
    """Split clients, in id order, into ``messages`` consecutive runs of near-equal work.

    ``sizes[c]`` is client c's work (training examples); None counts every client as 1. Each
    run ends at the client that brings its cumulative work closest to its share of the total,
    leaving at least one client for every later run. Consecutive runs, sent in order, come back
    in about that order, so replies reach the strategy in client order with little waiting.
    """
    ids = sorted(client_ids)
    m = max(1, min(messages, len(ids)))
    work = [1 if sizes is None else int(sizes[c]) for c in ids]
    total, groups, start, done = sum(work), [], 0, 0
    for k in range(1, m):
        target = total * k / m
        end, cum = start + 1, done + work[start]
        while end < len(ids) - (m - k) and abs(cum + work[end] - target) <= abs(cum - target):
            cum += work[end]
            end += 1
        groups.append(ids[start:end])
        start, done = end, cum
    groups.append(ids[start:])
    return groups
