"""The server's round loop: a Flower strategy's four phases per round, seeded by the round.

``Strategy.start`` runs the same phases; this loop owns them so that a resumed run counts
rounds from where it stopped, each phase draws from ``(seed, round, phase)``
(``fl_ondevice.server.strategy.seeded``), a round with too few valid updates keeps the global model,
and what happened in a round is handed to the caller as a :class:`RoundResult`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fl_ondevice.ondevice.weights import WeightSpec
from fl_ondevice.seeds import (
    AGGREGATE_EVALUATE,
    AGGREGATE_TRAIN,
    CONFIGURE_EVALUATE,
    CONFIGURE_TRAIN,
)
from fl_ondevice.server.strategy import nodes_needed, seeded, setting
from fl_ondevice.wire.message import from_arrays, to_arrays
from fl_ondevice.wire.transport import ClientGrid

log = logging.getLogger(__name__)

REPLY_TIMEOUT_SECONDS = 3600.0  # Flower's Strategy.start default


@dataclass(frozen=True)
class RoundResult:
    """The outcome of one round."""

    round: int
    arrays: ArrayRecord  # the global model after the round (unchanged if skipped)
    skipped: bool  # fewer valid updates than min_train_nodes: the global model was kept
    train_metrics: MetricRecord | None  # the strategy's aggregate of the clients' train metrics
    evaluate_metrics: MetricRecord | None  # ... of their local evaluations


def run_rounds(
    strategy: Strategy,
    grid: ClientGrid,
    arrays: ArrayRecord,
    rounds: Iterable[int],
    config: ConfigRecord,
    seed: int,
    after_round: Callable[[RoundResult], None],
    min_updates: int | None = None,
) -> ArrayRecord:
    """Train, aggregate, evaluate on clients, aggregate, for each of ``rounds``; call
    ``after_round`` with each round's result; return the final global arrays.

    ``min_updates``: a round with fewer valid updates keeps the global model (None: the
    strategy's ``min_train_nodes``)."""
    needed = nodes_needed(strategy)
    for r in rounds:
        grid.begin_round(r, needed)
        new, train_metrics = train_round(strategy, grid, r, arrays, config, seed, min_updates)
        arrays = arrays if new is None else new
        evaluate_metrics = evaluate_round(strategy, grid, r, arrays, config, seed)
        after_round(RoundResult(r, arrays, new is None, train_metrics, evaluate_metrics))
    return arrays


def train_round(
    strategy: Strategy,
    grid: ClientGrid,
    r: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    seed: int,
    min_updates: int | None = None,
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One round's training; ``(None, None)`` when the round is skipped: fewer valid updates
    than ``min_updates`` (None: the strategy's ``min_train_nodes``).

    A strategy that aggregates as replies arrive (``aggregates_as_replies_arrive``) gets the
    replies as a stream; any other gets the list, which it would build anyway, and is not
    asked to aggregate fewer than the minimum of valid updates.
    """
    with seeded(seed, r, CONFIGURE_TRAIN):
        messages = list(strategy.configure_train(r, arrays, ConfigRecord(dict(config)), grid))
    replies: Iterable[Message] = grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_SECONDS)
    minimum = int(setting(strategy, "min_train_nodes") if min_updates is None else min_updates)
    if not getattr(strategy, "aggregates_as_replies_arrive", False):
        replies = list(replies)
        if _too_few(grid, r, minimum):
            return None, None
    with seeded(seed, r, AGGREGATE_TRAIN):
        new, metrics = strategy.aggregate_train(r, replies)
    if _too_few(grid, r, minimum) or new is None:
        return None, None
    return conform(new, grid.replies.weight_spec, type(strategy).__name__), metrics


def _too_few(grid: ClientGrid, r: int, minimum: int) -> bool:
    valid = grid.traffic[r].valid if r in grid.traffic else 0
    if valid >= minimum:
        return False
    log.warning(
        "round %d skipped: %d valid updates, fewer than the %d required (round.min_updates, "
        "else strategy.min_train_nodes); the global model is unchanged",
        r,
        valid,
        minimum,
    )
    return True


def evaluate_round(
    strategy: Strategy,
    grid: ClientGrid,
    r: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    seed: int,
) -> MetricRecord | None:
    """One round's evaluation on the clients' local test splits (None if the strategy asks
    no client)."""
    with seeded(seed, r, CONFIGURE_EVALUATE):
        messages = list(strategy.configure_evaluate(r, arrays, ConfigRecord(dict(config)), grid))
    if not messages:
        return None
    replies = list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_SECONDS))
    with seeded(seed, r, AGGREGATE_EVALUATE):
        return strategy.aggregate_evaluate(r, replies)


def conform(arrays: ArrayRecord, spec: WeightSpec, source: str) -> ArrayRecord:
    """A strategy's aggregate as the model's tensors: same names and shapes required, cast to
    the model's dtypes (some strategies compute in float64; the model takes float32)."""
    weights = from_arrays(arrays)
    dtypes = {t.name: t.dtype for t in spec.tensors}
    cast = {n: w.astype(dtypes[n], copy=False) if n in dtypes else w for n, w in weights.items()}
    spec.validate(cast, f"the aggregate of {source}")
    if all(weights[n].dtype == dtypes[n] for n in dtypes):
        return arrays
    return to_arrays(cast)
