"""The Grid a strategy sees: one node per client, several clients per engine message beneath it.

Any Flower strategy samples nodes and sends each a message. Here a node is a simulated client
(node id = ``FIRST_NODE_ID`` + client id), and :class:`ClientGrid` carries the strategy's
per-client messages to the engine's real nodes and takes their replies apart again into one
reply per client, in client order. What it composes:

- a placement (``fl_ondevice.wire.grouping``): which engine node trains which clients, grouped
  into engine messages (the simulation) or the SuperNode that owns each (a deployment);
- a :class:`~fl_ondevice.wire.policy.RoundPolicy`: dropouts and, with phones, the round on the
  simulated clock (who is online, over-commitment, whose update is in before the close);
- a :class:`~fl_ondevice.wire.replies.ReplyCheck`: each train reply decoded to float32 weights
  and checked (``fl_ondevice.wire.updates``); a crash, a rejected update or a missing client
  reaches the strategy as an error reply, which every Flower strategy skips;
- the round's :class:`~fl_ondevice.wire.traffic.RoundTraffic`, counted as messages go and come
  (each client's evaluate metrics among them, for the server's per-client outputs).

The model goes by content (``fl_ondevice.wire.message``): its bytes with a node's first message of
the run, then its SHA-256 alone; a node that answers ``MODEL_MISSING`` (another machine's
worker of a Ray cluster, a cleared cache) is sent the bytes again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from uuid import uuid4

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fl_ondevice.wire.grouping import Executors, Placement, content_key
from fl_ondevice.wire.message import MODEL_MISSING, pack, unpack_replies
from fl_ondevice.wire.policy import RoundPolicy
from fl_ondevice.wire.replies import ReplyCheck
from fl_ondevice.wire.traffic import RoundTraffic, download_bytes
from fl_ondevice.wire.updates import client_error

log = logging.getLogger(__name__)

FIRST_NODE_ID = 1_000_000  # client c is node FIRST_NODE_ID + c to the strategy
ERROR_CODE = 1  # Flower's Error code for a client that failed or sent a rejected update


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
    num_clients
        The clients (nodes to the strategy).
    model, run_config
        What every engine message carries for the worker: the model as ``(sha256, bytes)``
        and the run config.
    replies
        How train replies are decoded and checked against the global model.
    placement
        Which engine node trains which clients (default: :class:`Executors` with one worker).
    policy
        Dropouts and the simulated round (default: none, no device time).
    pull_seconds
        How often ``send_and_receive`` asks the engine for replies.
    """

    def __init__(
        self,
        grid: Grid,
        num_clients: int,
        model: tuple[str, bytes],
        run_config: ConfigRecord,
        replies: ReplyCheck,
        placement: Placement | None = None,
        policy: RoundPolicy | None = None,
        pull_seconds: float = 0.005,
    ) -> None:
        self.grid = grid
        self.num_clients = num_clients
        self.model = model
        self.run_config = run_config
        self.replies = replies
        self.placement = Executors() if placement is None else placement
        self.policy = RoundPolicy() if policy is None else policy
        self.pull_seconds = pull_seconds
        self.round = 0  # set by the round loop: faults and traffic are counted per round
        self.traffic: dict[int, RoundTraffic] = {}
        self._sent: dict[str, _Sent] = {}  # virtual message id -> its client
        self._groups: dict[str, _Pushed] = {}  # engine message id -> what it carries
        self._ready: dict[str, Message] = {}  # per-client replies not yet pulled
        self._have_model: set[int] = set()  # engine nodes sent the model's bytes

    # -- what the strategy sees ---------------------------------------------------------------
    def begin_round(self, r: int, needed: int) -> None:
        """Start round ``r``; with phones, wait on the simulated clock until ``needed`` are
        online."""
        self.round = r
        if self.policy.clock is not None:
            self.policy.begin(needed, self._traffic(), self.num_clients)

    def get_node_ids(self) -> Iterable[int]:
        """One node per client the engine can reach (with SuperNodes that own their data: per
        client whose node is connected; with phones: per client online when the round
        started)."""
        clients = self.policy.available(self.placement.clients(self.grid, self.num_clients))
        return [FIRST_NODE_ID + c for c in clients]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send the strategy's per-client messages, grouped into engine messages; return the
        ids of those sent (a dropped-out client's message is lost on the way, a straggler's
        is never trained)."""
        batch = [self._accept(msg) for msg in messages]
        train = [s for s in batch if _is_train(s.message)]
        extra = self._overcommitted(train) if train and self.policy.overcommits else []
        going = [s for s in batch if not _is_train(s.message)]
        delivering = self._delivering(train, extra) if train else []
        by_content: dict[tuple, list[str]] = {}
        for sent in going + delivering:
            self._sent[sent.message.metadata.message_id] = sent
            by_content.setdefault(content_key(sent.message), []).append(
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
        # The policy's extra clients, sent the content of the strategy's first message.
        sampled = {s.client for s in train}
        spare = sorted({n - FIRST_NODE_ID for n in self.get_node_ids()} - sampled)
        first = train[0].message
        return [
            self._accept(
                Message(
                    first.content,
                    FIRST_NODE_ID + c,
                    first.metadata.message_type,
                    group_id=first.metadata.group_id,
                )
            )
            for c in self.policy.overcommitted(self.round, len(train), spare)
        ]

    def _delivering(self, train: list[_Sent], extra: list[_Sent]) -> list[_Sent]:
        # Of the clients sent a train message, those trained: not dropped out, and with phones
        # those whose update is in before the round closes.
        traffic = self._traffic()
        delivering = []
        for sent in train + extra:
            traffic.count_download(sent.message)  # dropouts downloaded it too
            if not self.policy.drops_out(self.round, sent.client, traffic):
                delivering.append(sent)
        if self.policy.clock is None:
            return delivering
        kept = self.policy.in_time(
            [(s.client, download_bytes(s.message)) for s in delivering],
            self.replies.update_bytes,
            sampled=len(train) + len(extra),
            keep=len(train),
            traffic=traffic,
        )
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
        id_of = {self._sent[i].client: i for i in ids}
        targets = self.placement.targets(self.grid, clients)
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
        training = _is_train(sent.message)
        traffic = self._traffic()
        traffic.replied += training
        if isinstance(part, str):
            traffic.failed += training
            return self._error(sent, part)
        traffic.count_loaded(part)  # train and evaluate replies alike
        if not training:
            traffic.count_evaluation(sent.client, part)
            return Message(part, reply_to=sent.message)
        update = self.replies.check(sent.message, part)
        if isinstance(update, str):
            traffic.rejected += 1
            return self._error(sent, f"update of client {sent.client} rejected: {update}")
        traffic.count_update(sent.client, update.examples, update.bytes_sent, update.metrics)
        return Message(update.content, reply_to=sent.message)

    def _error(self, sent: _Sent, reason: str) -> Message:
        log.warning("round %d: %s", self.round, reason)
        return Message(Error(ERROR_CODE, reason), reply_to=sent.message)

    def _traffic(self) -> RoundTraffic:
        return self.traffic.setdefault(self.round, RoundTraffic())

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


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] == MessageType.TRAIN
