"""The wire format: several clients in one engine message, their replies, array views."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

from fl_ondevice.wire.message import (
    array_view,
    pack,
    pack_replies,
    to_arrays,
    unpack,
    unpack_replies,
)


def test_a_group_message_round_trips_and_hides_its_transport_records():
    content = RecordDict(
        {"arrays": to_arrays({"w": np.ones(3, np.float32)}), "config": ConfigRecord({"a": 1})}
    )
    packed = pack(content, [3, 7], ("ab" * 32, b"tflite bytes"), ConfigRecord({"seed": 4}))

    group = unpack(packed)

    assert group.clients == [3, 7]
    assert (group.model_sha256, group.model_bytes) == ("ab" * 32, b"tflite bytes")
    assert group.run_config == {"seed": 4}
    assert sorted(group.content.keys()) == ["arrays", "config"]  # what a client's handler sees
    assert group.content["arrays"] is content["arrays"]  # shared, not copied
    later = unpack(pack(content, [3], ("ab" * 32, None), ConfigRecord()))
    assert later.model_bytes is None and later.model_sha256 == "ab" * 32


def test_replies_of_a_group_come_apart_per_client():
    ok = RecordDict({"metrics": MetricRecord({"num-examples": 2})})
    packed = pack_replies([(3, ok), (7, "client 7, round 1, train: boom")])

    parts = unpack_replies(packed, [3, 7, 12])

    assert isinstance(parts[3], RecordDict) and parts[3]["metrics"]["num-examples"] == 2
    assert parts[7] == "client 7, round 1, train: boom"
    assert parts[12] == "client 12 is missing from the reply"


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a,  # what our clients send: C order, native byte order -> a view
        np.asfortranarray,  # decoded instead
        lambda a: a.astype(a.dtype.newbyteorder()),  # other byte order: decoded instead
    ],
    ids=["c-order", "fortran", "byteswapped"],
)
def test_array_view_equals_flowers_decoding(make):
    value = make(np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7)
    array = Array(value)

    view = array_view(array)

    np.testing.assert_array_equal(view, array.numpy())
    assert view.shape == (2, 3, 4)
