"""Flower's FedAvg, whose aggregate_train folds each update in as it arrives."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from fl_ondevice.wire.message import array_view

log = logging.getLogger(__name__)


class FedAvg(FlowerFedAvg):
    """``flwr.serverapp.strategy.FedAvg`` (same arguments, sampling, messages and metrics) with
    an ``aggregate_train`` that consumes ``replies`` one at a time.

    Flower's FedAvg lists every reply of a round before it averages, so the server holds every
    update at once: 400 MB for 1,000 MLP updates. Here each update is added to a float64 sum
    sum(n_k * w_k) as it arrives and dropped; the average sum / sum(n_k) is cast back to the
    updates' dtype. It equals Flower's float32 average sum(w_k * n_k / N) up to float32
    rounding, and, given the replies in the same order, bit for bit run after run.

    ``equal_weights=True`` averages the updates with weight 1 each, sum(w_k) / K, whatever their
    ``weighted_by_key``: what a DP wrapper's noise is calibrated to (each of the K clipped
    updates moves the average by at most clipping_norm / K). The train metrics stay weighted.
    """

    #: The round loop may pass ``aggregate_train`` a stream instead of a list.
    aggregates_as_replies_arrive = True

    def __init__(self, *args: Any, equal_weights: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.equal_weights = equal_weights

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average of the valid replies' arrays; Flower's average of their metrics."""
        total = _WeightedSum()
        metrics: list[RecordDict] = []  # metric records only: a few numbers per reply
        failures = 0
        for msg in replies:
            if msg.has_error():
                failures += 1
                continue
            validate_message_reply_consistency([msg.content], self.weighted_by_key, True)
            record = next(iter(msg.content.metric_records.values()))
            weight = 1.0 if self.equal_weights else float(cast(float, record[self.weighted_by_key]))
            total.add(next(iter(msg.content.array_records.values())), weight)
            metrics.append(RecordDict({"metrics": record}))
        log.debug("aggregate_train: %d results, %d failures", len(metrics), failures)
        if not metrics:
            return None, None
        return total.average(), self.train_metrics_aggr_fn(metrics, self.weighted_by_key)


class _WeightedSum:
    """sum(n_k * w_k) and sum(n_k) in float64, one update at a time."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.weight = 0.0

    def add(self, arrays: ArrayRecord, n: float) -> None:
        if self.sums and list(arrays.keys()) != list(self.sums):
            raise InconsistentMessageReplies(
                reason="All ArrayRecords must have the same keys for aggregation."
            )
        for key, array in arrays.items():
            w = array_view(array)
            if key in self.sums:
                self.sums[key] += np.multiply(w, n, dtype=np.float64)
            else:
                self.sums[key] = np.multiply(w, n, dtype=np.float64)
                self.dtypes[key] = w.dtype
        self.weight += n

    def average(self) -> ArrayRecord:
        return ArrayRecord(
            {k: Array((s / self.weight).astype(self.dtypes[k])) for k, s in self.sums.items()}
        )
