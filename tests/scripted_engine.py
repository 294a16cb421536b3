"""A scripted stand-in for an engine's Grid, for transport and round-loop tests without Ray."""

from __future__ import annotations

import time

from flwr.app import Message
from flwr.app.metadata import Metadata
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from fl_ondevice.message import unpack


def meta(dst: int, kind: str, reply_to: str = "", src: int = 1) -> Metadata:
    """Message metadata without a running Flower app (no TaskIdentity needed)."""
    return Metadata(1, "", src, dst, reply_to, "", time.time(), 600.0, kind)


class ScriptedEngine:
    """The Grid calls ClientGrid makes of an engine: each engine message is answered by
    ``answer(clients)`` (a reply content, or None for a lost message) ``delay(clients)``
    seconds after it was pushed."""

    def __init__(self, answer, delay=lambda clients: 0.0, nodes: int = 8) -> None:
        self.answer, self.delay, self.nodes = answer, delay, nodes
        self.pushed: list[tuple[str, list[int], float]] = []  # (id, clients, time)
        self.destinations: list[int] = []  # node of each pushed message

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
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        out = []
        for engine_id, clients, t in self.pushed:
            due = self.delay(clients)
            if engine_id in ids and due is not None and time.monotonic() - t >= due:
                out.append(Message(self.answer(clients), metadata=meta(1, "train", engine_id)))
        return out
