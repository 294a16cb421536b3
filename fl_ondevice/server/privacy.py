"""The (epsilon, delta) a run spends: central DP (Flower's DP wrappers) and local DP (LocalDpMod).

Central DP: a ``DifferentialPrivacy*Clipping`` wrapper clips each of a round's m updates to C,
averages them with equal weights and adds N(0, (z C / m)^2) to the average: one sampled Gaussian
release per round. :class:`Accountant` composes those releases with Renyi DP (Google's
``dp-accounting``, the library under Flower's own ``RdpAccountant``) for the sampling
``dp.sampling`` names and reports epsilon at ``dp.delta`` after every round. The sampling is
known exactly here (the strategy draws m of the N clients, seeded), so the default accounting,
m of N without replacement, is exact rather than assumed.

Adaptive clipping also releases a noisy count of clipped updates (std sigma_b); Flower inflates
the update noise so that both together are one Gaussian mechanism of the configured multiplier
(Andrew et al. 2021, Theorem 1): :func:`effective_noise_multiplier` recomputes it from what the
wrapper adds, so the epsilon follows the noise really added.

Local DP: ``LocalDpMod`` adds N(0, sigma^2), sigma = sensitivity sqrt(2 ln(1.25 / delta')) /
epsilon', to each update a client sends; :class:`LocalAccountant` composes a client's releases
(no amplification: a client knows it took part) into its local epsilon at ``dp.delta``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_accounting
from flwr.client.mod import LocalDpMod as LegacyLocalDpMod
from flwr.clientapp.mod import LocalDpMod
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from fl_ondevice.config import NO_AMPLIFICATION, POISSON, WITHOUT_REPLACEMENT, Config
from fl_ondevice.errors import ConfigError
from fl_ondevice.server.strategy import layers

log = logging.getLogger(__name__)

# dp.sampling -> its neighbouring relation (the pairs Flower's PrivacyConfig supports too).
RELATIONS = {
    WITHOUT_REPLACEMENT: dp_accounting.NeighboringRelation.REPLACE_ONE,
    POISSON: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    NO_AMPLIFICATION: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
}
LOCAL_DP_MODS = (LocalDpMod, LegacyLocalDpMod)


@dataclass(frozen=True)
class Mechanism:
    """A run's central Gaussian mechanism: the DP layer at config ``key``, its effective noise
    multiplier, the clients it expects per round and the population they are drawn from."""

    key: str
    name: str
    noise_multiplier: float
    sample_size: int
    population: int


def effective_noise_multiplier(update_noise: float, count_stddev: float) -> float:
    """The noise multiplier of adaptive clipping's two releases together (Andrew et al. 2021,
    Theorem 1): (z_update^-2 + (2 sigma_count)^-2)^-1/2; 0 when either release is noiseless."""
    if update_noise <= 0.0 or count_stddev <= 0.0:
        return 0.0
    return float((update_noise**-2 + (2.0 * count_stddev) ** -2) ** -0.5)


def find_mechanism(strategy: Strategy, num_clients: int) -> Mechanism | None:
    """The outermost DP wrapper among the strategy's layers, or None without one.

    Raises ``ConfigError`` when the layer inside it does not average with equal weights: a
    weighted average lets one client move the model by more than C / m, past what the noise
    covers (Flower: "Accounted aggregation requires equal client weights").
    """
    for key, layer in layers(strategy):
        if isinstance(layer, DifferentialPrivacyFixedClippingBase):
            z = float(layer.noise_multiplier)
        elif isinstance(layer, DifferentialPrivacyAdaptiveBase):
            z = effective_noise_multiplier(layer.noise_multiplier, layer.clipped_count_stddev)
        else:
            continue
        _check_equal_weights(key, layer)
        m = int(layer.num_sampled_clients)
        return Mechanism(key, type(layer).__name__, z, m, num_clients)
    return None


def _check_equal_weights(key: str, layer: Strategy) -> None:
    inner = getattr(layer, "strategy", None)
    if getattr(inner, "equal_weights", False) is True:
        return
    key_name = getattr(inner, "weighted_by_key", None)
    how = f"weights updates by {key_name!r}" if key_name else "may weight updates"
    raise ConfigError(
        f"{key}={type(layer).__name__} calibrates its noise to an average with equal weights, "
        f"but {key}.strategy={type(inner).__name__} {how}, which breaks the sensitivity bound "
        f"and the epsilon: set {key}.strategy._target_=fl_ondevice.server.fedavg.FedAvg and "
        f"{key}.strategy.equal_weights=true (conf/strategy/dp_*.yaml do)"
    )


def run_delta(cfg: Config) -> float:
    """The delta of every epsilon the run reports: ``dp.delta``, else num_clients ** -1.1."""
    return float(cfg.dp.delta) if cfg.dp.delta is not None else float(cfg.num_clients**-1.1)


def run_sampling(cfg: Config) -> str:
    """``dp.sampling``, or no amplification when phones' availability makes the sample not
    uniform over the clients (``device=...``); the fallback is logged."""
    if cfg.device.enabled and cfg.dp.sampling != NO_AMPLIFICATION:
        log.warning(
            "device=%s: phones' availability windows make a round's sample not uniform over "
            "the %d clients, so the epsilon claims no amplification by sampling "
            "(dp.sampling=%s, not %s)",
            cfg.device.name,
            cfg.num_clients,
            NO_AMPLIFICATION,
            cfg.dp.sampling,
        )
        return NO_AMPLIFICATION
    return cfg.dp.sampling


class Accountant:
    """The cumulative epsilon of a mechanism's releases, one per round, by Renyi DP;
    ``sampling`` is a ``dp.sampling`` value.

    The RDP of one round's release is computed once per sample size with ``dp-accounting``'s
    ``RdpAccountant`` (for m of N without replacement ~0.1 s: too slow to repeat every round);
    composition adds RDP, so the RDP of the run is each sample size's rounds times its
    release's, and epsilon is ``dp-accounting``'s conversion of that sum at ``delta``. The
    ledger (``releases``: rounds per sample size) is all the state there is.
    """

    def __init__(self, mechanism: Mechanism, delta: float, sampling: str) -> None:
        self.mechanism, self.delta, self.sampling = mechanism, delta, sampling
        self.releases: dict[int, int] = {}
        self._rdp: dict[int, np.ndarray] = {}
        self._orders = rdp_accounting.RdpAccountant().orders

    def event(self, sample_size: int) -> dp_accounting.DpEvent:
        """One round's release, its ``sample_size`` clients drawn from the population."""
        gaussian = dp_accounting.GaussianDpEvent(self.mechanism.noise_multiplier)
        n = self.mechanism.population
        if self.sampling == WITHOUT_REPLACEMENT:
            return dp_accounting.SampledWithoutReplacementDpEvent(n, sample_size, gaussian)
        if self.sampling == POISSON:
            return dp_accounting.PoissonSampledDpEvent(sample_size / n, gaussian)
        return gaussian

    def compose(self, sample_size: int, rounds: int = 1) -> None:
        """Add ``rounds`` releases of ``sample_size`` clients each."""
        self.releases[sample_size] = self.releases.get(sample_size, 0) + rounds

    def replay(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Compose the releases of the rounds a resumed run's metrics rows record (each
        ``clients_sampled``): the state the accountant had after the last of them."""
        for row in rows:
            if row["round"] > 0 and row.get("clients_sampled"):
                self.compose(int(row["clients_sampled"]))

    @property
    def epsilon(self) -> float:
        """Epsilon at ``delta`` of every release so far (0 before the first)."""
        return self._epsilon(self.releases)

    def after(self, rounds: int) -> float:
        """Epsilon at ``delta`` once ``rounds`` more releases of the expected sample size have
        followed those so far."""
        m = self.mechanism.sample_size
        return self._epsilon({**self.releases, m: self.releases.get(m, 0) + rounds})

    def would_exceed(self, max_epsilon: float) -> bool:
        """Whether one more round of the expected sample size takes epsilon above the limit."""
        return self.after(1) > max_epsilon

    def _epsilon(self, releases: Mapping[int, int]) -> float:
        if not releases:
            return 0.0
        total = sum(count * self._release_rdp(m) for m, count in sorted(releases.items()))
        return float(rdp_accounting.compute_epsilon(self._orders, total, self.delta)[0])

    def _release_rdp(self, sample_size: int) -> np.ndarray:
        if sample_size not in self._rdp:
            relation = RELATIONS[self.sampling]
            one = rdp_accounting.RdpAccountant(neighboring_relation=relation)
            self._rdp[sample_size] = one.compose(self.event(sample_size)).rdp
        return self._rdp[sample_size]


def epsilon_after(
    noise_multiplier: float,
    sample_size: int,
    population: int,
    rounds: int,
    delta: float,
    sampling: str,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` identical releases (0 noise: infinite)."""
    if noise_multiplier <= 0.0:
        return math.inf
    mechanism = Mechanism("", "", noise_multiplier, sample_size, population)
    return Accountant(mechanism, delta, sampling).after(rounds)


def solve_noise_multiplier(
    target_epsilon: float,
    sample_size: int,
    population: int,
    rounds: int,
    delta: float,
    sampling: str,
) -> float:
    """The smallest noise multiplier (to 1e-6 relative) whose epsilon after ``rounds`` rounds is
    at most ``target_epsilon``: bisection, epsilon falling as the noise grows."""

    def eps(z: float) -> float:
        return epsilon_after(z, sample_size, population, rounds, delta, sampling)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > 1e6:
            raise ConfigError(
                f"dp.target_epsilon={target_epsilon} cannot be met with any noise multiplier "
                f"at dp.delta={delta} over {rounds} rounds; raise it or dp.delta"
            )
    while high - low > 1e-6 * high:
        mid = (low + high) / 2.0
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return high


def within_budget(
    rounds: Iterable[int], accountant: Accountant | None, max_epsilon: float | None, info: dict
) -> Iterator[int]:
    """``rounds`` up to the one that would take epsilon above ``max_epsilon`` (what Flower's
    ``would_exceed`` asks); that round goes into ``info["stopped_before_round"]`` and the log."""
    for r in rounds:
        if (
            accountant is not None
            and max_epsilon is not None
            and accountant.would_exceed(max_epsilon)
        ):
            info["stopped_before_round"] = r
            log.warning(
                "privacy budget: round %d would take epsilon above dp.max_epsilon=%g "
                "(now %.4f at delta %.3g); the run stops after round %d",
                r,
                max_epsilon,
                accountant.epsilon,
                accountant.delta,
                r - 1,
            )
            return
        yield r


class LocalAccountant:
    """Each client's local epsilon at ``delta`` after k updates sent through ``LocalDpMod``."""

    def __init__(self, mod: Any, delta: float) -> None:
        # sigma / sensitivity: the Gaussian mechanism's noise multiplier per release.
        self.noise_multiplier = math.sqrt(2.0 * math.log(1.25 / mod.delta)) / mod.epsilon
        self.delta = delta
        self.per_release = {"epsilon": float(mod.epsilon), "delta": float(mod.delta)}
        self._cache: dict[int, float] = {0: 0.0}

    def epsilon(self, releases: int) -> float:
        """Local epsilon after ``releases`` updates (Renyi DP composition, no amplification)."""
        if releases not in self._cache:
            self._cache[releases] = epsilon_after(
                self.noise_multiplier, 1, 1, releases, self.delta, NO_AMPLIFICATION
            )
        return self._cache[releases]

    def summary(self, epsilons: Sequence[float]) -> dict[str, Any]:
        """The worst client's and the median client's local epsilon."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "per_release": self.per_release,
            "delta": self.delta,
            "epsilon_max": max(epsilons, default=0.0),
            "epsilon_median": statistics.median(epsilons) if epsilons else 0.0,
        }


def find_local_dp(mods: Sequence[Any]) -> Any | None:
    """The first ``LocalDpMod`` among the clients' built mods, or None."""
    return next((m for m in mods if isinstance(m, LOCAL_DP_MODS)), None)


@dataclass
class Privacy:
    """What a run accounts: its central mechanism's epsilon, its clients' local epsilons, and
    ``info``, the ``privacy`` entry of ``metrics.json`` (kept up to date by the hooks)."""

    accountant: Accountant | None
    local: LocalAccountant | None
    max_epsilon: float | None
    info: dict[str, Any]


def with_target_noise(cfg: Config, strategy: Strategy) -> Config:
    """``cfg`` with the DP layer's ``noise_multiplier`` solved from ``dp.target_epsilon``
    (unchanged without a target); the value is logged and lands in the run's config.yaml."""
    target = cfg.dp.target_epsilon
    if target is None:
        return cfg
    mechanism = find_mechanism(strategy, cfg.num_clients)
    if mechanism is None:
        raise ConfigError(
            f"dp.target_epsilon={target} needs a central DP strategy to set the noise of: "
            "strategy=dp_server_fixed|dp_server_adaptive|dp_client_fixed|dp_client_adaptive"
        )
    delta, sampling = run_delta(cfg), run_sampling(cfg)
    z = solve_noise_multiplier(
        target, mechanism.sample_size, mechanism.population, cfg.num_rounds, delta, sampling
    )
    log.info(
        "dp.target_epsilon=%g: %s.noise_multiplier=%.6f (%d rounds of %d of %d clients, %s, "
        "delta %.3g)",
        target,
        mechanism.key,
        z,
        cfg.num_rounds,
        mechanism.sample_size,
        mechanism.population,
        sampling,
        delta,
    )
    spec = copy.deepcopy(cfg.strategy)
    node = spec
    for part in mechanism.key.split(".")[1:]:
        node = node[part]
    node["noise_multiplier"] = z
    return dataclasses.replace(cfg, strategy=spec)


def plan_privacy(cfg: Config, strategy: Strategy, mods: Sequence[Any]) -> Privacy | None:
    """The run's accounting, or None for a run with neither central nor local DP.

    Raises ``ConfigError`` for a budget without a mechanism to account or without noise.
    """
    mechanism = find_mechanism(strategy, cfg.num_clients)
    mod = find_local_dp(mods)
    if mechanism is None and cfg.dp.max_epsilon is not None:
        raise ConfigError(
            f"dp.max_epsilon={cfg.dp.max_epsilon} needs a central DP strategy to account: "
            "strategy=dp_server_fixed|dp_server_adaptive|dp_client_fixed|dp_client_adaptive"
        )
    if mechanism is None and mod is None:
        return None
    delta = run_delta(cfg)
    info: dict[str, Any] = {"delta": delta}
    accountant = None
    if mechanism is not None:
        accountant = _central(cfg, mechanism, delta, info)
    local = LocalAccountant(mod, delta) if mod is not None else None
    return Privacy(accountant, local, cfg.dp.max_epsilon, info)


def _central(cfg: Config, mechanism: Mechanism, delta: float, info: dict) -> Accountant | None:
    sampling = run_sampling(cfg)
    info.update(
        mechanism=mechanism.name,
        noise_multiplier=mechanism.noise_multiplier,
        sample_size=mechanism.sample_size,
        population=mechanism.population,
        sampling=sampling,
        max_epsilon=cfg.dp.max_epsilon,
        stopped_before_round=None,
    )
    if mechanism.noise_multiplier <= 0.0:
        if cfg.dp.max_epsilon is not None:
            raise ConfigError(
                f"dp.max_epsilon={cfg.dp.max_epsilon}: {mechanism.key}.noise_multiplier=0 adds "
                "no noise, so any round spends an unbounded epsilon; set a noise_multiplier > 0 "
                "or dp.target_epsilon"
            )
        log.warning(
            "%s.noise_multiplier=0: the run clips but adds no noise, it is not differentially "
            "private; no epsilon is reported",
            mechanism.key,
        )
        return None
    # The accountant computes one release's RDP for this, and keeps it for the rounds.
    accountant = Accountant(mechanism, delta, sampling)
    planned = accountant.after(cfg.num_rounds)
    log.info(
        "differential privacy: %s, noise multiplier %.4f, %d of %d clients a round (%s): "
        "epsilon %.4f at delta %.3g after %d rounds",
        mechanism.name,
        mechanism.noise_multiplier,
        mechanism.sample_size,
        mechanism.population,
        sampling,
        planned,
        delta,
        cfg.num_rounds,
    )
    return accountant
