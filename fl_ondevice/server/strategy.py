"""Flower strategies from the config: built and checked before any engine starts, seeded by round.

``strategy`` in the config is a Hydra node: ``_target_`` names any ``flwr.serverapp.strategy``
class (or a user's own ``Strategy`` subclass) and the other keys are its arguments, so the
strategy is Flower's own code. Two things fl_ondevice adds around it, both here:

- checks of the sampling arguments against the run (a ``min_train_nodes`` above
  ``num_clients`` would make Flower wait forever for nodes that never come);
- :func:`seeded`: Flower's strategies sample with Python's global ``random`` and its DP wrappers
  add noise with NumPy's global generator, so each phase of each round runs with both drawn from
  ``(seed, round, phase)``; which clients train, and the noise, then follow the seed alone.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
from flwr.serverapp.strategy import Strategy
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate

from fl_ondevice.config import Config
from fl_ondevice.errors import ConfigError


def make_strategy(cfg: Config) -> Strategy:
    """The Flower strategy ``cfg.strategy`` describes, checked against the run.

    Raises ``ConfigError`` naming the key and the fix: no or unknown ``_target_``, an argument
    the class does not take, a value the class rejects, or sampling the run cannot satisfy.
    """
    spec = dict(cfg.strategy)
    if "_target_" not in spec:
        raise ConfigError(
            "strategy has no _target_: choose one with strategy=NAME (conf/strategy/*.yaml) or "
            "name a class with strategy._target_=module.Class"
        )
    flwr_log = logging.getLogger("flwr")
    quiet = _DropLines("fraction_evaluate is set to 0.0")  # our default, not news
    flwr_log.addFilter(quiet)
    try:
        strategy = instantiate(spec, _convert_="all")
    except InstantiationException as err:
        raise ConfigError(_explain(spec, err)) from None
    finally:
        flwr_log.removeFilter(quiet)
    if not isinstance(strategy, Strategy):
        raise ConfigError(
            f"strategy._target_={spec['_target_']!r} is not a flwr.serverapp.strategy.Strategy"
        )
    check_sampling(strategy, cfg)
    return strategy


def _explain(spec: dict[str, Any], err: InstantiationException) -> str:
    cause = err.__cause__ or err
    text = f"{type(cause).__name__}: {cause}".strip().splitlines()[0]
    target = spec["_target_"]
    try:
        cls = get_object(target)
    except Exception:  # noqa: BLE001 - the target itself is what failed
        return f"strategy._target_={target!r} cannot be loaded ({text})"
    takes = [p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")]
    return f"strategy={target!r} cannot be built ({text}); {cls.__name__} takes {takes}"


class _DropLines(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def layers(strategy: Strategy) -> Iterator[tuple[str, Strategy]]:
    """The strategy and the strategies it wraps (``.strategy``, as Flower's DP wrappers), with
    the config key of each: ``strategy``, ``strategy.strategy``, ..."""
    key, layer = "strategy", strategy
    while isinstance(layer, Strategy):
        yield key, layer
        key, layer = f"{key}.strategy", cast(Strategy, getattr(layer, "strategy", None))


# The one fallback of each sampling setting, for a strategy without that attribute (a user's own
# Strategy class): it waits for one node, needs one valid update, trains every client and asks
# none to evaluate. Flower's strategies have them all, valued by conf/strategy/*.yaml or the
# class' own defaults (conf/strategy/fedavg.yaml says where ours differ from Flower's).
WITHOUT: dict[str, Any] = {
    "fraction_train": None,  # no sampling: every client trains
    "fraction_evaluate": 0.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
    "proximal_mu": 0.0,
}


def setting(strategy: Strategy, name: str) -> Any:
    """The outermost value of attribute ``name`` (a key of :data:`WITHOUT`) among the strategy's
    layers; ``WITHOUT[name]`` when none has it."""
    return next((getattr(s, name) for _, s in layers(strategy) if hasattr(s, name)), WITHOUT[name])


def _own(s: Strategy, name: str) -> Any:
    # One layer's value of a sampling setting, or its fallback.
    return getattr(s, name, WITHOUT[name])


def nodes_needed(strategy: Strategy) -> int:
    """How many nodes the strategy waits for before it samples (Flower's ``sample_nodes``
    waits, polling once a second, until at least this many are connected)."""
    needed = 1
    for _, s in layers(strategy):
        needed = max(needed, _own(s, "min_available_nodes"), _own(s, "min_train_nodes"))
        if _own(s, "fraction_evaluate") > 0.0:
            needed = max(needed, _own(s, "min_evaluate_nodes"))
    return int(needed)


def check_sampling(strategy: Strategy, cfg: Config) -> None:
    """Raise ``ConfigError`` for sampling settings the run cannot satisfy."""
    n = cfg.num_clients
    for key, s in layers(strategy):
        for name in ("fraction_train", "fraction_evaluate"):
            value = _own(s, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}.{name}={value!r} is invalid: must be in [0, 1]")
        if _own(s, "fraction_train") == 0.0:
            raise ConfigError(f"{key}.fraction_train=0.0 is invalid: must be in (0, 1]")
        fraction_evaluate = _own(s, "fraction_evaluate")
        evaluates = fraction_evaluate > 0.0
        for name in ("min_train_nodes", "min_available_nodes", "min_evaluate_nodes"):
            value = _own(s, name)
            if value is None or (name == "min_evaluate_nodes" and not evaluates):
                continue
            if not 1 <= value <= n:
                raise ConfigError(
                    f"{key}.{name}={value!r} is invalid: must be >= 1 and <= num_clients ({n})"
                )
        if evaluates and cfg.partition.local_test_fraction == 0:
            raise ConfigError(
                f"{key}.fraction_evaluate={fraction_evaluate!r} is invalid: clients evaluate "
                "on their local test split, but partition.local_test_fraction=0 leaves none; set "
                "partition.local_test_fraction > 0 or strategy.fraction_evaluate=0"
            )
        _check_num_sampled(key, s, cfg)
    k = cfg.personalize.epochs
    if k > 0 and not setting(strategy, "fraction_evaluate") > 0.0:
        # The fine-tuning runs inside the clients' evaluation: no evaluation, no metrics.
        raise ConfigError(
            f"personalize.epochs={k} needs client-side evaluation, but "
            f"strategy.fraction_evaluate={setting(strategy, 'fraction_evaluate')!r}: set "
            "strategy.fraction_evaluate>0 (the share of clients that evaluate and fine-tune) "
            "or personalize.epochs=0"
        )
    mu = setting(strategy, "proximal_mu")
    if not mu >= 0.0:
        raise ConfigError(f"strategy.proximal_mu={mu!r} is invalid: must be >= 0")


def _check_num_sampled(key: str, s: Strategy, cfg: Config) -> None:
    # Flower's DP wrappers scale their noise by num_sampled_clients: it must be the sample size.
    wanted = getattr(s, "num_sampled_clients", None)
    fraction = getattr(getattr(s, "strategy", None), "fraction_train", None)
    if wanted is None or fraction is None:
        return
    minimum = _own(s.strategy, "min_train_nodes")  # type: ignore[attr-defined]
    k = sample_size(cfg.num_clients, fraction, minimum)
    if wanted != k:
        raise ConfigError(
            f"{key}.num_sampled_clients={wanted!r} is invalid: the inner strategy samples {k} "
            f"clients per round (num_clients={cfg.num_clients}, fraction_train={fraction}); the "
            "noise is calibrated to that number"
        )


def sample_size(num_clients: int, fraction: float, minimum: int) -> int:
    """Clients Flower's strategies sample per round: max(int(n * fraction), minimum)."""
    return max(int(num_clients * fraction), minimum)


@contextmanager
def seeded(seed: int, server_round: int, phase: int) -> Iterator[None]:
    """Run the block with Python's and NumPy's global generators seeded from ``(seed,
    server_round, phase)``; their previous states are restored after it."""
    saved_py, saved_np = random.getstate(), np.random.get_state()
    py_seed, np_seed = np.random.SeedSequence([seed, server_round, phase]).generate_state(2)
    random.seed(int(py_seed))
    np.random.seed(int(np_seed))
    try:
        yield
    finally:
        random.setstate(saved_py)
        np.random.set_state(saved_np)
