"""Typed run configuration: dataclasses that validate Hydra's YAML before anything runs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_args, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_ondevice.errors import ConfigError

DATASETS = ("digits", "fashion_mnist", "mnist")
PARTITIONERS = ("iid", "dirichlet", "shards", "label_quantity")
MODELS = ("mlp", "2nn", "cnn", "simple_cnn", "tflite")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("fedavg",)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


@dataclass
class DatasetConfig:
    name: str = "digits"
    # Directory of the IDX .gz files (fashion_mnist, mnist); null = look in the standard places.
    data_dir: str | None = None
    # Allow a download through keras.datasets when no local copy is found.
    download: bool = True
    # digits has no official split: this fraction, stratified and seeded, is the central test set.
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, "dataset.name", self.name, f"choose one of {DATASETS}")
        _require(
            0.0 < self.test_fraction < 1.0,
            "dataset.test_fraction",
            self.test_fraction,
            "must be in (0, 1)",
        )


@dataclass
class PartitionConfig:
    name: str = "dirichlet"
    alpha: float = 0.5  # dirichlet: concentration; small = skewed (Hsu et al. 2019)
    min_partition_size: int = 10  # dirichlet: resample until every client holds this many
    max_retries: int = 100  # dirichlet: resampling attempts before giving up
    shards_per_client: int = 2  # shards: arXiv:1602.05629 gives each client 2 shards
    shard_size: int = 300  # shards: 200 shards of 300 MNIST images in the paper
    labels_per_client: int = 2  # label_quantity: NIID-Bench #C=k
    local_test_fraction: float = 0.2  # per-client local test split, for client-side evaluation

    def __post_init__(self) -> None:
        p = "partition"
        _require(self.name in PARTITIONERS, f"{p}.name", self.name, f"choose one of {PARTITIONERS}")
        _require(self.alpha > 0, f"{p}.alpha", self.alpha, "must be > 0")
        _require(
            self.min_partition_size >= 0,
            f"{p}.min_partition_size",
            self.min_partition_size,
            "must be >= 0",
        )
        _require(self.max_retries >= 1, f"{p}.max_retries", self.max_retries, "must be >= 1")
        _require(
            self.shards_per_client >= 1,
            f"{p}.shards_per_client",
            self.shards_per_client,
            "must be >= 1",
        )
        _require(self.shard_size >= 1, f"{p}.shard_size", self.shard_size, "must be >= 1")
        _require(
            self.labels_per_client >= 1,
            f"{p}.labels_per_client",
            self.labels_per_client,
            "must be >= 1",
        )
        _require(
            0.0 <= self.local_test_fraction < 1.0,
            f"{p}.local_test_fraction",
            self.local_test_fraction,
            "must be in [0, 1)",
        )


@dataclass
class ModelConfig:
    name: str = "mlp"
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.0  # sgd only
    beta_1: float = 0.9  # adam only
    beta_2: float = 0.999  # adam only
    epsilon: float = 1e-7  # adam only (Keras' default)
    path: str | None = None  # model=tflite: the user's .tflite file

    def __post_init__(self) -> None:
        _require(self.name in MODELS, "model.name", self.name, f"choose one of {MODELS}")
        _require(
            self.optimizer in OPTIMIZERS,
            "model.optimizer",
            self.optimizer,
            f"choose one of {OPTIMIZERS}",
        )
        _require(self.learning_rate > 0, "model.learning_rate", self.learning_rate, "must be > 0")
        _require(0.0 <= self.momentum < 1.0, "model.momentum", self.momentum, "must be in [0, 1)")
        _require(0.0 <= self.beta_1 < 1.0, "model.beta_1", self.beta_1, "must be in [0, 1)")
        _require(0.0 <= self.beta_2 < 1.0, "model.beta_2", self.beta_2, "must be in [0, 1)")
        _require(self.epsilon > 0, "model.epsilon", self.epsilon, "must be > 0")
        _require(
            self.name != "tflite" or bool(self.path),
            "model.path",
            self.path,
            "model=tflite needs model.path=FILE pointing at a .tflite with "
            "train/infer/save/restore signatures",
        )


@dataclass
class ClientConfig:
    local_epochs: int = 1  # E
    batch_size: int | None = 32  # B; None = the client's whole local set (B = inf)
    num_threads: int = 1  # interpreter threads; one client per core uses the cores best
    num_cpus: float = 1.0  # Ray resources per client: workers = cores / num_cpus
    dropout_rate: float = 0.0  # share of sampled clients that never reply (seeded per round)
    failure_rate: float = 0.0  # share of sampled clients that crash while training (seeded)
    # Simulated clients one engine message carries (trained one after another by one worker);
    # None = one each up to 16 clients per worker, else 4 messages per worker. Results do not
    # depend on it beyond float rounding (the server adds the same updates in another grouping).
    clients_per_message: int | None = None

    def __post_init__(self) -> None:
        _require(
            self.clients_per_message is None or self.clients_per_message >= 1,
            "client.clients_per_message",
            self.clients_per_message,
            "must be >= 1, or null to pick it from the number of workers",
        )
        _require(self.local_epochs >= 1, "client.local_epochs", self.local_epochs, "must be >= 1")
        _require(
            self.batch_size is None or self.batch_size >= 1,
            "client.batch_size",
            self.batch_size,
            "must be >= 1, or null for full batch",
        )
        _require(self.num_threads >= 1, "client.num_threads", self.num_threads, "must be >= 1")
        _require(self.num_cpus > 0, "client.num_cpus", self.num_cpus, "must be > 0")
        for key in ("dropout_rate", "failure_rate"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"client.{key}", value, "must be in [0, 1)")


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    fraction_train: float = 1.0  # C in arXiv:1602.05629
    fraction_evaluate: float = 0.0  # clients evaluating on their local test split; 0 = none
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2

    def __post_init__(self) -> None:
        p = "strategy"
        _require(self.name in STRATEGIES, f"{p}.name", self.name, f"choose one of {STRATEGIES}")
        _require(
            0.0 < self.fraction_train <= 1.0,
            f"{p}.fraction_train",
            self.fraction_train,
            "must be in (0, 1]",
        )
        _require(
            0.0 <= self.fraction_evaluate <= 1.0,
            f"{p}.fraction_evaluate",
            self.fraction_evaluate,
            "must be in [0, 1]",
        )
        _require(self.min_train_nodes >= 1, f"{p}.min_train_nodes", self.min_train_nodes, ">= 1")
        _require(
            self.min_evaluate_nodes >= 1, f"{p}.min_evaluate_nodes", self.min_evaluate_nodes, ">= 1"
        )


@dataclass
class Config:
    """One run: every group plus the top-level keys of ``conf/config.yaml``."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    seed: int = 0
    num_clients: int = 10
    num_rounds: int = 20
    target_accuracy: float | None = None
    eval_batch_size: int = 256
    cache_dir: str = "~/.cache/fl_ondevice"
    output_dir: str = "."  # the run directory; simulate.py sets it to Hydra's
    resume: str | None = None  # a run directory to continue from its last completed round

    def __post_init__(self) -> None:
        _require(self.num_clients >= 1, "num_clients", self.num_clients, "must be >= 1")
        _require(self.num_rounds >= 1, "num_rounds", self.num_rounds, "must be >= 1")
        _require(
            self.target_accuracy is None or 0.0 < self.target_accuracy <= 1.0,
            "target_accuracy",
            self.target_accuracy,
            "must be in (0, 1] or null",
        )
        _require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        _require(
            not self.evaluates or self.partition.local_test_fraction > 0,
            "strategy.fraction_evaluate",
            self.strategy.fraction_evaluate,
            "clients evaluate on their local test split, but partition.local_test_fraction=0 "
            "leaves none; set partition.local_test_fraction > 0 or strategy.fraction_evaluate=0",
        )
        for key in ("min_train_nodes", "min_evaluate_nodes"):
            value = getattr(self.strategy, key)
            _require(
                value <= self.num_clients or (key == "min_evaluate_nodes" and not self.evaluates),
                f"strategy.{key}",
                value,
                f"must be <= num_clients ({self.num_clients})",
            )

    @property
    def evaluates(self) -> bool:
        """Whether clients evaluate the global model on their local test splits."""
        return self.strategy.fraction_evaluate > 0

    @property
    def workers(self) -> int:
        """Clients this machine trains at once: its cores / ``client.num_cpus``."""
        return max(1, int((os.cpu_count() or 1) // self.client.num_cpus))

    @property
    def nodes(self) -> int:
        """Simulated nodes (message executors) the engine needs: one per message of a round."""
        return messages_per_round(
            self.clients_per_round, self.workers, self.client.clients_per_message
        )

    @property
    def clients_per_round(self) -> int:
        """Clients a round needs at once: its training sample or its evaluation sample."""
        train = sample_size(
            self.num_clients, self.strategy.fraction_train, self.strategy.min_train_nodes
        )
        if not self.evaluates:
            return train
        evaluate = sample_size(
            self.num_clients, self.strategy.fraction_evaluate, self.strategy.min_evaluate_nodes
        )
        return max(train, evaluate)


MESSAGES_PER_WORKER = 4  # few messages per round, enough to balance the workers
ONE_PER_MESSAGE_UP_TO = 16  # clients per worker: up to this, each client gets its own message


def messages_per_round(clients: int, workers: int, clients_per_message: int | None) -> int:
    """How many engine messages carry a round's ``clients``.

    One message per client makes the engine's per-message cost (Flower's link state scans every
    stored message for every node on each poll, Ray ships the ClientApp with each message)
    dominate small models once rounds hold many clients. So large rounds go out as
    ``MESSAGES_PER_WORKER`` messages per worker, each with several clients. Small rounds keep one
    client per message: there that cost is small, and whole clients as the unit of work balance
    the workers best (8 messages for 10 equal clients on 2 workers can take 6 client-times
    instead of 5).
    """
    if clients_per_message is not None:
        return max(1, -(-clients // clients_per_message))
    workers = max(1, workers)
    if clients <= ONE_PER_MESSAGE_UP_TO * workers:
        return max(1, clients)
    return MESSAGES_PER_WORKER * workers


def sample_size(num_clients: int, fraction: float, minimum: int) -> int:
    """Clients sampled in a round: max(int(n * fraction), minimum), as Flower's FedAvg, <= n."""
    return min(num_clients, max(int(num_clients * fraction), minimum))


def parse_config(node: DictConfig | dict) -> Config:
    """Validate a composed Hydra config; every bad value raises ``ConfigError`` naming its key."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    assert isinstance(node, dict)
    for group, cls in _GROUPS.items():  # per group, so the message names the group
        to_dataclass(cls, node.get(group, {}), group)
    return to_dataclass(Config, node, "config")  # type: ignore[no-any-return]


_GROUPS: dict[str, type] = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "partition": PartitionConfig,
    "strategy": StrategyConfig,
    "client": ClientConfig,
}


def to_run_config(cfg: Config) -> dict[str, int | float | str | bool]:
    """The one translation to Flower's flat, kebab-case run config (``group.key`` -> ``key``).

    Nulls become ``""`` (Flower's records hold no None); :func:`from_run_config` inverts this.
    """
    flat: dict[str, int | float | str | bool] = {}
    for key, value in asdict(cfg).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = f"{key}.{sub}" if sub else key
            flat[name.replace("_", "-")] = "" if v is None else v
    return flat


def from_run_config(flat: Mapping[str, Any]) -> Config:
    """Rebuild and validate a :class:`Config` from :func:`to_run_config`'s output."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        key = name.replace("-", "_")
        group, _, sub = key.partition(".")
        if value == "" and (sub or key) in _NULLABLE:
            value = None
        if sub:
            nested.setdefault(group, {})[sub] = value
        else:
            nested[key] = value
    return parse_config(nested)


def _nullable_keys(*classes: type) -> set[str]:
    # Fields typed `X | None`: their "" in a run config means null.
    return {
        f.name
        for cls in classes
        for f in fields(cls)
        if type(None) in get_args(get_type_hints(cls)[f.name])
    }


_NULLABLE = _nullable_keys(Config, *_GROUPS.values())


def to_dataclass(cls: type, node: DictConfig | dict, key: str) -> Any:
    """Validate a config node against dataclass ``cls`` and return an instance.

    Unknown keys and wrong types become a ``ConfigError`` naming ``key``; value checks run in the
    dataclass' ``__post_init__``.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config under '{key}': {err}") from None


__all__ = [
    "DATASETS",
    "MODELS",
    "OPTIMIZERS",
    "PARTITIONERS",
    "ClientConfig",
    "Config",
    "DatasetConfig",
    "ModelConfig",
    "PartitionConfig",
    "StrategyConfig",
    "from_run_config",
    "parse_config",
    "to_dataclass",
    "to_run_config",
]
