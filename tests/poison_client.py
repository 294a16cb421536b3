"""A misbehaving device for tests: fl_ondevice's ClientApp, except client 0 sends a bad update."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fl_ondevice.client_app import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID
from fl_ondevice.client_app import train as honest_train


def make_poison_app(kind: str) -> ClientApp:
    """A ClientApp whose client 0 replies with a ``kind`` of invalid update (``nan`` ...)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        if int(msg.content.config_records[CONFIG][PARTITION_ID]) != 0:
            return reply
        arrays = reply.content.array_records[ARRAYS]
        name = sorted(arrays)[0]
        value = arrays[name].numpy()
        if kind == "nan":
            value = np.full_like(value, np.nan)
        elif kind == "shape":
            value = np.zeros((*value.shape, 2), value.dtype)
        elif kind == "dtype":
            value = value.astype(np.float64)
        elif kind == "examples":
            reply.content.metric_records[METRICS] = MetricRecord(
                {**dict(reply.content.metric_records[METRICS]), NUM_EXAMPLES: 0}
            )
        from flwr.app import Array

        arrays[name] = Array(value)
        return reply

    return app
