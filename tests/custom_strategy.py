"""A user's own strategy, as a researcher would write one: a subclass of Flower's FedAvg."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class FirstClientWins(FedAvg):
    """Keeps the first valid update it is given (replies come in client order) as the model."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None, None
        return next(iter(valid[0].content.array_records.values())), None
