"""A misbehaving device for tests: fl_ondevice's ClientApp, except client 0 sends a bad update."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fl_ondevice.client_app import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_IDS, client_key
from fl_ondevice.client_app import train as honest_train


def make_poison_app(kind: str) -> ClientApp:
    """A ClientApp whose client 0 replies with a ``kind`` of invalid update (``nan`` ...), or
    whose message holding client 0 raises (``raise``)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if kind == "raise" and 0 in msg.content.config_records[CONFIG][PARTITION_IDS]:
            raise RuntimeError("device lost")
        reply = honest_train(msg, context)
        content = reply.content
        if client_key(ARRAYS, 0) not in content.array_records:
            return reply  # client 0 is not in this message
        arrays = content.array_records[client_key(ARRAYS, 0)]
        name = sorted(arrays)[0]
        value = arrays[name].numpy()
        if kind == "nan":
            value = np.full_like(value, np.nan)
        elif kind == "shape":
            value = np.zeros((*value.shape, 2), value.dtype)
        elif kind == "dtype":
            value = value.astype(np.float64)
        elif kind == "examples":
            metrics = content.metric_records[client_key(METRICS, 0)]
            content[client_key(METRICS, 0)] = MetricRecord({**dict(metrics), NUM_EXAMPLES: 0})
        arrays[name] = Array(value)
        return reply

    return app
