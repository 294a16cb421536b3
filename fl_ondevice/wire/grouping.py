"""Which engine node trains which clients: grouped for executors, or the SuperNode that owns them.

In the simulation the engine's nodes are executors that train whichever clients a message names
(:class:`Executors`): clients that got the same content share one engine message, trained one
after another by one worker. Why group: the engine's costs are per message (Flower's in-memory
link state scans every stored message for every node on each poll; Ray ships the ClientApp with
each message), so one message per client made them dominate small models in large rounds.

A deployed SuperNode owns its data (:class:`PartitionOwners`): the server asks each node that
connects which partition its node config gives it (a ``query``), and sends that client's
messages to that node only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Protocol, cast

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl_ondevice.errors import ConfigError
from fl_ondevice.wire.message import CONFIG, NUM_PARTITIONS, PARTITION_ID

log = logging.getLogger(__name__)

MESSAGES_PER_WORKER = 4  # few messages per round, enough to balance the workers
ONE_PER_MESSAGE_UP_TO = 16  # clients per worker: up to this, each client gets its own message
QUERY_SECONDS = 60.0  # how long a new SuperNode may take to say which partition it owns


class Placement(Protocol):
    """Where a round's clients go: which clients the engine can reach, and in which engine
    messages to which nodes."""

    def clients(self, grid: Grid, num_clients: int) -> Iterable[int]:
        """The clients whose messages the engine's nodes can take now."""
        ...

    def targets(self, grid: Grid, clients: list[int]) -> list[tuple[int, list[int]]]:
        """``clients`` as ``(node, clients of one engine message)``, in sending order."""
        ...


class Executors:
    """Engine nodes that train whichever clients a message names (the simulation).

    Parameters
    ----------
    workers, clients_per_message, client_sizes
        How many clients train at once, clients per engine message (None: see
        :func:`messages_per_round`) and each client's training examples, by which clients are
        spread over a round's messages (:func:`group_clients`).
    """

    def __init__(
        self,
        workers: int = 1,
        clients_per_message: int | None = None,
        client_sizes: Sequence[int] | None = None,
    ) -> None:
        self.workers = workers
        self.clients_per_message = clients_per_message
        self.client_sizes = client_sizes

    def clients(self, grid: Grid, num_clients: int) -> Iterable[int]:
        """Every client: any node trains any of them."""
        return range(num_clients)

    def targets(self, grid: Grid, clients: list[int]) -> list[tuple[int, list[int]]]:
        """Consecutive runs of ``clients``, one per engine message, to the nodes in the order
        they registered."""
        nodes = nodes_in_order(grid)
        wanted = messages_per_round(len(clients), self.workers, self.clients_per_message)
        groups = group_clients(clients, min(len(nodes), wanted), self.client_sizes)
        return list(zip(nodes, groups, strict=False))


class PartitionOwners:
    """Engine nodes that are SuperNodes owning one partition each: their node config's
    ``partition-id`` of ``num-partitions`` (= the run's ``num_clients``)."""

    def __init__(self) -> None:
        self.node_of: dict[int, int] = {}  # client -> the node that owns it
        self.live: set[int] = set()  # the nodes connected at the last look

    def clients(self, grid: Grid, num_clients: int) -> Iterable[int]:
        """The clients whose node is connected."""
        self._discover(grid, num_clients)
        return sorted(c for c, n in self.node_of.items() if n in self.live)

    def targets(self, grid: Grid, clients: list[int]) -> list[tuple[int, list[int]]]:
        """Each client's own engine message, to the node that owns it."""
        return [(self.node_of[c], [c]) for c in sorted(clients)]

    def _discover(self, grid: Grid, num_clients: int) -> None:
        # Ask each node not seen before which partition it owns. A node that comes back after
        # a crash registers with a new id and takes its partition over from the old one.
        self.live = set(grid.get_node_ids())
        new = sorted(self.live - set(self.node_of.values()))
        if not new:
            return
        queries = [
            grid.create_message(RecordDict(), MessageType.QUERY, n, group_id="partition")
            for n in new
        ]
        for reply in grid.send_and_receive(queries, timeout=QUERY_SECONDS):
            client, node = _owned_partition(reply, num_clients), reply.metadata.src_node_id
            old = self.node_of.get(client)
            if old is not None and old in self.live and old != node:
                log.warning("SuperNodes %d and %d both own partition %s", old, node, client)
            self.node_of[client] = node
            log.info("SuperNode %d owns partition %s", node, client)


def _owned_partition(reply: Message, num_clients: int) -> int:
    # The partition a SuperNode's query reply names; its num-partitions must be the run's.
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise ConfigError(f"SuperNode {node}: {reply.error.reason}")
    own = reply.content.config_records[CONFIG]
    client, parts = cast(int, own[PARTITION_ID]), cast(int, own[NUM_PARTITIONS])
    if parts != num_clients or not 0 <= client < num_clients:
        raise ConfigError(
            f"SuperNode {node} has {PARTITION_ID}={client} {NUM_PARTITIONS}={parts} "
            f"but the run has num_clients={num_clients}: start every SuperNode "
            f"with {NUM_PARTITIONS}={num_clients} and its own {PARTITION_ID} in "
            f"0..{num_clients - 1}"
        )
    return client


def content_key(msg: Message) -> tuple:
    """Clients whose messages hold the very same records (Flower's strategies send one
    RecordDict to all) share an engine message; small config records are compared by value."""
    return (msg.metadata.message_type,) + tuple(
        (key, id(record)) if key not in msg.content.config_records else (key, repr(record))
        for key, record in msg.content.items()
    )


def nodes_in_order(grid: Grid, timeout: float = 600.0) -> list[int]:
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
