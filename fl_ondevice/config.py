"""Typed run configuration: dataclasses that validate Hydra's YAML before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_ondevice.errors import ConfigError

DATASETS = ("digits", "fashion_mnist", "mnist")
PARTITIONERS = ("iid", "dirichlet", "shards", "label_quantity")
MODELS = ("mlp", "2nn", "cnn", "simple_cnn", "tflite")
OPTIMIZERS = ("sgd", "adam")


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
    "DatasetConfig",
    "ModelConfig",
    "PartitionConfig",
    "to_dataclass",
]
