"""What the server checks of a client's reply before any strategy sees it."""

from __future__ import annotations

import re

import numpy as np
from flwr.app import RecordDict

from fl_ondevice.errors import CheckpointError
from fl_ondevice.ondevice.weights import Weights, WeightSpec
from fl_ondevice.wire.message import array_view


def checked_update(
    content: RecordDict, spec: WeightSpec, weighted_by_key: str
) -> tuple[float, Weights] | str:
    """A client's ``(num_examples, weights)``, or what is wrong with its update.

    One ArrayRecord whose tensor names, shapes and dtypes equal the global model's (``spec``),
    every value finite, and one MetricRecord whose ``weighted_by_key`` is a number > 0: what
    every Flower strategy assumes and a phone may fail to deliver.
    """
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected one ArrayRecord and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    examples = metrics.get(weighted_by_key)
    if not isinstance(examples, int | float) or not examples > 0:
        return f"{weighted_by_key}={examples!r}, must be > 0"
    weights = {k: array_view(a) for k, a in next(iter(content.array_records.values())).items()}
    try:
        spec.validate(weights, "update")
    except CheckpointError as err:
        return str(err)
    bad = [name for name, w in weights.items() if not np.isfinite(w).all()]
    return f"non-finite values (NaN/Inf) in {bad}" if bad else (float(examples), weights)


def client_error(reason: str, client: int, server_round: int) -> str:
    """A client's crash in one line: client, round and cause, not the worker's stack dump."""
    # Flower's reason reads "<class '...ClientAppException'>:<'...Message: client 3, round 2,
    # train: cause'>"; our ClientApp put the client, round and cause in that message.
    ours = re.findall(r"client \d+, round \d+, \w+: [^\n]*", reason)
    if ours:
        return ours[-1].removesuffix("'>")
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    cause = lines[-1].removesuffix("'>") if lines else "no reason"
    return f"client {client}, round {server_round} failed: {cause}"
