"""The round recorder: each round's record goes through the hooks in order."""

from __future__ import annotations

import numpy as np

from fl_ondevice.server.recorder import RoundRecord, RoundRecorder, local_columns
from fl_ondevice.wire.traffic import RoundTraffic


def test_hooks_see_one_record_in_order_and_the_rounds_traffic_is_taken_out():
    traffic = {1: RoundTraffic(sampled=3), 2: RoundTraffic(sampled=5)}
    seen: list[tuple] = []

    def evaluate(record: RoundRecord) -> None:
        record.row["accuracy"] = 0.5
        seen.append(("evaluate", record.round, record.traffic.sampled))

    def save(record: RoundRecord) -> None:
        seen.append(("save", dict(record.row)))

    recorder = RoundRecorder([evaluate, save], traffic)
    recorder.record(1, {"w": np.zeros(2, np.float32)})

    assert seen == [("evaluate", 1, 3), ("save", {"round": 1, "accuracy": 0.5})]
    assert list(traffic) == [2]  # round 2's traffic is left for round 2


def test_local_accuracy_columns_do_not_depend_on_the_order_replies_arrived_in():
    # 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1 in floats: a mean over reply order would differ.
    accuracies = {4: 0.1, 9: 0.2, 2: 0.3}
    columns = []
    for order in ([4, 9, 2], [2, 9, 4]):
        traffic = RoundTraffic(sampled=3)
        for client in order:
            traffic.evaluations[client] = {"eval-accuracy": accuracies[client]}
        columns.append(local_columns(traffic, personalize_epochs=1))
    globals_ = [{k: v for k, v in c.items() if k.startswith("local_acc_global")} for c in columns]
    assert globals_[0] == globals_[1]
    assert columns[0]["local_acc_global_mean"] == (0.3 + 0.1 + 0.2) / 3  # clients 2, 4, 9
