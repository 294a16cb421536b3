"""ClientGrid against a scripted engine: grouping, client order, faults, validation, timeouts."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from scripted_engine import ScriptedEngine, meta

from fl_ondevice.errors import ConfigError
from fl_ondevice.ondevice.weights import WeightSpec
from fl_ondevice.wire.encoding import encode_update
from fl_ondevice.wire.grouping import Executors, PartitionOwners, group_clients
from fl_ondevice.wire.message import MODEL_MISSING, pack_replies, to_arrays
from fl_ondevice.wire.node import model_sha256
from fl_ondevice.wire.policy import RoundPolicy
from fl_ondevice.wire.replies import ReplyCheck
from fl_ondevice.wire.transport import FIRST_NODE_ID, ClientGrid

SPEC = WeightSpec.of({"w": np.zeros(3, np.float32)})
MODEL = (model_sha256(b"tflite"), b"tflite")


def _update(value: float, examples: int = 5) -> RecordDict:
    return RecordDict(
        {
            "arrays": to_arrays({"w": np.full(3, value, np.float32)}),
            "metrics": MetricRecord({"num-examples": examples, "client-seconds": 0.1}),
        }
    )


def _grid(
    engine,
    workers=1,
    clients_per_message=None,
    dropout_rate=0.0,
    pull_seconds=0.005,
    update_encoding="float32",
) -> ClientGrid:
    grid = ClientGrid(
        engine,
        6,
        MODEL,
        ConfigRecord({"seed": 0}),
        ReplyCheck(SPEC, update_encoding),
        Executors(workers, clients_per_message),
        RoundPolicy(0, dropout_rate),
        pull_seconds,
    )
    grid.round = 1
    return grid


def _messages(clients, kind: str = "train", g=None) -> list[Message]:
    g = np.zeros(3, np.float32) if g is None else g
    content = RecordDict({"arrays": to_arrays({"w": g}), "config": ConfigRecord()})
    return [Message(content, metadata=meta(FIRST_NODE_ID + c, kind)) for c in clients]


def _client(reply: Message) -> int:
    return reply.metadata.src_node_id - FIRST_NODE_ID


def test_clients_that_got_the_same_content_share_engine_messages():
    engine = ScriptedEngine(lambda cs: pack_replies([(c, _update(c)) for c in cs]))
    grid = _grid(engine, workers=1, clients_per_message=2)

    replies = list(grid.send_and_receive(_messages([4, 0, 2, 5, 1]), timeout=5))

    assert [cs for _, cs, _ in engine.pushed] == [[0, 1], [2], [4, 5]]  # consecutive runs
    assert engine.destinations == [8, 7, 6]  # to the nodes in the order they registered
    assert [_client(r) for r in replies] == [0, 1, 2, 4, 5]  # client order, not push order
    assert [float(r.content["arrays"]["w"].numpy()[0]) for r in replies] == [0, 1, 2, 4, 5]
    traffic = grid.traffic[1]
    assert (traffic.sampled, traffic.replied, traffic.valid, traffic.examples) == (5, 5, 5, 25)
    assert traffic.bytes_down == traffic.bytes_up == 5 * 3 * 4


def test_replies_come_in_client_order_as_soon_as_the_ones_before_them_are_in():
    # Client 0 answers after 0.3 s, client 1 at once, client 2 never (its phone is gone).
    delays = {0: 0.3, 1: 0.0, 2: None}
    engine = ScriptedEngine(
        lambda cs: pack_replies([(c, _update(c)) for c in cs]), lambda cs: delays[cs[0]]
    )
    grid = _grid(engine, workers=1, clients_per_message=1, pull_seconds=0.01)
    t0 = time.monotonic()

    stream = grid.send_and_receive(_messages([0, 1, 2]), timeout=0.6)
    first = next(stream)
    t_first = time.monotonic() - t0
    second = next(stream)
    t_second = time.monotonic() - t0
    rest = list(stream)
    t_end = time.monotonic() - t0

    assert (_client(first), _client(second), rest) == (0, 1, [])
    assert 0.3 <= t_first < 0.45  # held back until client 0 was in ...
    assert t_second - t_first < 0.05  # ... then client 1 at once
    assert 0.6 <= t_end < 0.9  # client 2 given up at the timeout


def test_failed_missing_and_invalid_updates_reach_the_strategy_as_errors():
    def answer(clients):
        parts = []
        for c in clients:
            if c == 1:
                parts.append((c, "client 1, round 1, train: out of memory"))
            elif c == 2:
                parts.append((c, _update(float("nan"))))
            elif c == 3:
                parts.append((c, _update(1.0, examples=0)))
            elif c != 4:  # client 4 is missing from its message's reply
                parts.append((c, _update(c)))
        return pack_replies(parts)

    grid = _grid(ScriptedEngine(answer), workers=1, clients_per_message=3)

    replies = {_client(r): r for r in grid.send_and_receive(_messages(range(6)), timeout=5)}

    assert not replies[0].has_error() and not replies[5].has_error()
    assert replies[1].error.reason == "client 1, round 1, train: out of memory"
    assert "rejected: non-finite values" in replies[2].error.reason
    assert "rejected: num-examples=0, must be > 0" in replies[3].error.reason
    assert replies[4].error.reason == "client 4 is missing from the reply"
    t = grid.traffic[1]
    assert (t.replied, t.failed, t.rejected, t.valid) == (6, 2, 2, 2)


def test_a_failed_engine_message_fails_each_of_its_clients():
    from flwr.app import Error

    class Dying(ScriptedEngine):
        def pull_messages(self, ids):
            return [
                Message(Error(0, "worker died"), metadata=meta(1, "train", i))
                for i, cs, _ in self.pushed
                if i in ids
            ]

    grid = _grid(Dying(None), workers=1, clients_per_message=2)

    replies = list(grid.send_and_receive(_messages([0, 3]), timeout=5))

    assert [r.has_error() for r in replies] == [True, True]
    assert "client 3, round 1 failed: worker died" in replies[1].error.reason


def test_dropped_out_clients_are_not_sent_and_not_waited_for():
    engine = ScriptedEngine(lambda cs: pack_replies([(c, _update(c)) for c in cs]))
    grid = _grid(engine, workers=1, dropout_rate=0.5)
    dropped = [c for c in range(6) if np.random.default_rng([0, 1, c, 2]).random() < 0.5]
    assert 0 < len(dropped) < 6

    replies = list(grid.send_and_receive(_messages(range(6)), timeout=5))

    assert sorted(_client(r) for r in replies) == sorted(set(range(6)) - set(dropped))
    assert (grid.traffic[1].sampled, grid.traffic[1].dropped) == (6, len(dropped))
    assert grid.traffic[1].bytes_down == 6 * 12  # the dropouts downloaded the model too


def test_evaluate_replies_are_passed_on_unvalidated_and_uncounted():
    metrics = RecordDict({"metrics": MetricRecord({"num-examples": 3, "eval-accuracy": 0.5})})
    grid = _grid(ScriptedEngine(lambda cs: pack_replies([(c, metrics) for c in cs])))

    replies = list(grid.send_and_receive(_messages([2, 3], "evaluate"), timeout=5))

    assert [r.content["metrics"]["eval-accuracy"] for r in replies] == [0.5, 0.5]
    assert grid.traffic.get(1) is None or grid.traffic[1].replied == 0


def test_clients_are_split_into_consecutive_runs_of_near_equal_work():
    sizes = [100, 10, 10, 10, 60, 40, 30, 30]  # client c trains on sizes[c] examples; 290 in all
    groups = group_clients([7, 6, 5, 4, 3, 2, 1, 0], 3, sizes)
    # By hand: the runs end closest to 290/3 = 96.7 and 2 * 290/3 = 193.3 cumulative examples:
    # client 0 (100), then clients 1-4 (cumulative 190), the rest: loads 100, 90, 100.
    assert groups == [[0], [1, 2, 3, 4], [5, 6, 7]]
    assert group_clients([5, 2, 9], 8) == [[2], [5], [9]]  # never an empty message
    assert [len(g) for g in group_clients(range(10), 4)] == [3, 2, 3, 2]
    assert sum(group_clients(range(1000), 8), []) == list(range(1000))


def _answer_all(clients):
    return pack_replies([(c, _update(c)) for c in clients])


def test_a_node_gets_the_model_bytes_once_then_only_their_name():
    engine = ScriptedEngine(_answer_all, nodes=2)
    grid = _grid(engine, workers=1, clients_per_message=1)

    list(grid.send_and_receive(_messages([0, 1, 2]), timeout=5))  # to nodes 2, 1 (order)
    grid.round = 2
    list(grid.send_and_receive(_messages([0, 1, 2]), timeout=5))

    assert engine.destinations == [2, 1, 2, 1]  # 2 nodes: the third client waits a message
    assert engine.with_model == [True, True, False, False]


def test_a_node_that_lost_the_model_is_sent_its_bytes_again_and_its_clients_still_reply():
    asked = []

    def answer(clients):
        asked.append(engine.with_model[len(asked)])
        if not asked[-1]:  # the node's cache was cleared
            return Error(code=MODEL_MISSING, reason="model not on this node")
        return _answer_all(clients)

    engine = ScriptedEngine(answer, nodes=1)
    grid = _grid(engine, workers=1, clients_per_message=6)
    list(grid.send_and_receive(_messages([0, 1]), timeout=5))
    grid.round = 2

    replies = list(grid.send_and_receive(_messages([0, 1]), timeout=5))

    assert engine.with_model == [True, False, True]
    assert [_client(r) for r in replies] == [0, 1] and not any(r.has_error() for r in replies)
    assert grid.traffic[2].failed == 0


def test_supernodes_that_own_their_data_each_get_their_own_clients_messages():
    # Nodes 1..3 own partitions 2, 0, 1 (their node configs); the strategy sees clients.
    engine = ScriptedEngine(_answer_all, nodes=3, partitions={1: (2, 3), 2: (0, 3), 3: (1, 3)})
    grid = ClientGrid(engine, 3, MODEL, ConfigRecord(), ReplyCheck(SPEC), PartitionOwners())
    grid.round = 1

    nodes = list(grid.get_node_ids())
    replies = list(grid.send_and_receive(_messages([2, 0, 1]), timeout=5))

    assert nodes == [FIRST_NODE_ID + c for c in (0, 1, 2)]
    assert [cs for _, cs, _ in engine.pushed] == [[0], [1], [2]]
    assert engine.destinations == [2, 3, 1]
    assert [_client(r) for r in replies] == [0, 1, 2]
    list(grid.get_node_ids())
    assert sorted(engine.queried) == [1, 2, 3]  # each node asked once


def test_a_node_gone_offline_takes_its_client_out_of_the_sample_until_it_is_back():
    engine = ScriptedEngine(_answer_all, nodes=2, partitions={1: (0, 2), 2: (1, 2), 3: (1, 2)})
    grid = ClientGrid(engine, 2, MODEL, ConfigRecord(), ReplyCheck(SPEC), PartitionOwners())
    assert list(grid.get_node_ids()) == [FIRST_NODE_ID, FIRST_NODE_ID + 1]

    engine.get_node_ids = lambda: [1]  # node 2 crashed
    assert list(grid.get_node_ids()) == [FIRST_NODE_ID]
    engine.get_node_ids = lambda: [1, 3]  # it came back, registered as node 3
    assert list(grid.get_node_ids()) == [FIRST_NODE_ID, FIRST_NODE_ID + 1]
    grid.round = 1
    list(grid.send_and_receive(_messages([1]), timeout=5))
    assert engine.destinations == [3]


def test_a_supernode_with_another_num_partitions_stops_the_run_with_the_fix():
    engine = ScriptedEngine(_answer_all, nodes=1, partitions={1: (0, 2)})
    grid = ClientGrid(engine, 4, MODEL, ConfigRecord(), ReplyCheck(SPEC), PartitionOwners())

    with pytest.raises(ConfigError, match="num-partitions=2 but the run has num_clients=4"):
        list(grid.get_node_ids())


# -- encoded updates (client.update_encoding) -----------------------------------------------------
G = np.array([1.0, -2.0, 0.5], np.float32)  # the global weights the strategy sends


def _encoded(client: int, encoding: str, drop: str | None = None) -> RecordDict:
    w = {"w": G + np.array([0.1 * client, -0.03, 0.007], np.float32)}
    arrays = encode_update(w, {"w": G}, encoding, seed=client)
    if drop:
        del arrays[drop]
    metrics = MetricRecord({"num-examples": 5 + client, "client-seconds": 0.1})
    return RecordDict({"arrays": to_arrays(arrays), "metrics": metrics})


@pytest.mark.parametrize(("encoding", "bytes_per_update"), [("float16", 3 * 2), ("int8", 3 + 4)])
def test_an_encoded_update_reaches_the_strategy_as_float32_weights(encoding, bytes_per_update):
    sent = {c: _encoded(c, encoding) for c in range(3)}
    engine = ScriptedEngine(lambda cs: pack_replies([(c, sent[c]) for c in cs]))
    grid = _grid(engine, workers=1, update_encoding=encoding)

    replies = list(grid.send_and_receive(_messages(range(3), g=G), timeout=5))

    for c, r in enumerate(replies):
        arrays = sent[c]["arrays"]
        if encoding == "int8":  # g + q * s, from what the client sent
            delta = arrays["w"].numpy().astype(np.float32) * arrays["w|scale"].numpy()
        else:
            delta = arrays["w"].numpy().astype(np.float32)
        got = r.content["arrays"]
        assert list(got) == ["w"] and got["w"].dtype == "float32"
        assert np.array_equal(got["w"].numpy(), G + delta)
        assert r.content["metrics"]["num-examples"] == 5 + c
    t = grid.traffic[1]
    assert (t.valid, t.rejected, t.examples) == (3, 0, 5 + 6 + 7)
    assert (t.bytes_down, t.bytes_up) == (3 * 3 * 4, 3 * bytes_per_update)


def test_an_update_that_does_not_decode_is_rejected_with_the_reason():
    float32 = {"w": np.ones(3, np.float32), "w|scale": np.array(1.0, np.float32)}
    sent = {0: _encoded(0, "int8", drop="w|scale"), 1: _encoded(1, "int8"), 2: _encoded(2, "int8")}
    sent[1]["arrays"] = to_arrays(float32)  # a client that did not encode its update
    engine = ScriptedEngine(lambda cs: pack_replies([(c, sent[c]) for c in cs]))
    grid = _grid(engine, workers=1, update_encoding="int8")

    replies = list(grid.send_and_receive(_messages(range(3), g=G), timeout=5))

    assert replies[0].error.reason == (
        "update of client 0 rejected: int8 update does not match the model: missing arrays "
        "['w|scale'], unexpected arrays [] (an int8 tensor 'x' travels with its scale 'x|scale')"
    )
    assert replies[1].error.reason == (
        "update of client 1 rejected: int8 update: tensor 'w' is float32 of shape (3,), "
        "expected int8 of shape (3,) (the global model's)"
    )
    assert not replies[2].has_error()
    t = grid.traffic[1]
    assert (t.replied, t.rejected, t.valid, t.bytes_up) == (3, 2, 1, 3 + 4)
