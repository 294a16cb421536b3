"""The round recorder: each round's record goes through the hooks in order."""

from __future__ import annotations

import numpy as np

from fl_ondevice.server.recorder import RoundRecord, RoundRecorder
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
