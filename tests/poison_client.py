"""Misbehaving devices for tests: a ClientApp mod that spoils client 0's update, and a ClientApp
whose engine message holding client 0 dies."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fl_ondevice.client.client_app import train as honest_train
from fl_ondevice.wire.message import ARRAYS, METRICS, NUM_EXAMPLES, PARTITION_ID, unpack


class Poison:
    """A Flower mod: client 0 replies with a ``kind`` of invalid update (``nan``, ``shape``,
    ``dtype``, ``examples``); use as ``client.mods.poison={_target_: poison_client.Poison,
    kind: nan}``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if context.node_config[PARTITION_ID] != 0 or reply.has_error():
            return reply
        arrays = reply.content.array_records[ARRAYS]
        name = sorted(arrays)[0]
        value = arrays[name].numpy()
        if self.kind == "nan":
            value = np.full_like(value, np.nan)
        elif self.kind == "shape":
            value = np.zeros((*value.shape, 2), value.dtype)
        elif self.kind == "dtype":
            value = value.astype(np.float64)
        elif self.kind == "examples":
            metrics = reply.content.metric_records[METRICS]
            reply.content[METRICS] = MetricRecord({**dict(metrics), NUM_EXAMPLES: 0})
        arrays[name] = Array(value)
        return reply


def dying_app() -> ClientApp:
    """A ClientApp whose engine message holding client 0 raises before any client trains."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if 0 in unpack(msg.content).clients:
            raise RuntimeError("device lost")
        return honest_train(msg, context)

    return app
