"""A scripted stand-in for an engine's Grid, for transport and round-loop tests without Ray."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from fl_ondevice.wire.message import unpack


def meta(dst: int, kind: str, reply_to: str = "", src: int = 1) -> Metadata:
    """Message metadata without a running Flower app (no TaskIdentity needed)."""
    return Metadata(1, "", src, dst, reply_to, "", time.time(), 600.0, kind)


class ScriptedEngine:
    """The Grid calls ClientGrid makes of an engine: each engine message is answered by
    ``answer(clients)`` (a reply content or an ``Error``; None for a lost message)
    ``delay(clients)`` seconds after it was pushed. A query to node n is answered with
    ``partitions[n]`` (the ``(partition-id, num-partitions)`` of its node config)."""

    def __init__(self, answer, delay=lambda clients: 0.0, nodes: int = 8, partitions=None):
        self.answer, self.delay, self.nodes = answer, delay, nodes
        self.partitions = partitions or {}
        self.pushed: list[tuple[str, list[int], float]] = []  # (id, clients, time)
        self.destinations: list[int] = []  # node of each pushed message
        self.with_model: list[bool] = []  # whether each pushed message carried the model
        self.queried: list[int] = []  # nodes asked for their partition

    def get_node_ids(self):
        return list(range(1, self.nodes + 1))

    def get_nodes(self):
        # Registered in reverse id order: node `nodes` first, node 1 last.
        return [
            NodeInfo(node_id=n, registered_at=f"2026-12-01T00:00:{self.nodes - n:02d}")
            for n in self.get_node_ids()
        ]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, metadata=meta(dst_node_id, message_type))

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"e{len(self.pushed)}"
            self.pushed.append((m.metadata.message_id, unpack(m.content).clients, time.monotonic()))
            self.destinations.append(m.metadata.dst_node_id)
            self.with_model.append(unpack(m.content).model_bytes is not None)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        out = []
        for engine_id, clients, t in self.pushed:
            due = self.delay(clients)
            if engine_id in ids and due is not None and time.monotonic() - t >= due:
                answer = self.answer(clients)
                kind = "error" if isinstance(answer, Error) else "content"
                reply = Message(**{kind: answer}, metadata=meta(1, "train", engine_id))
                out.append(reply)
        return out

    def send_and_receive(self, messages, timeout=None):
        for m in messages:
            node = m.metadata.dst_node_id
            self.queried.append(node)
            partition, parts = self.partitions[node]
            own = ConfigRecord({"partition-id": partition, "num-partitions": parts})
            yield Message(RecordDict({"config": own}), metadata=meta(1, "query", "", src=node))
