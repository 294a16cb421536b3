"""Config, one run: the groups and the top-level keys; parsing a composed Hydra config into it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_ondevice.config.choices import DATASET_CLASSES, DATASET_SHAPES, check_classes, require
from fl_ondevice.config.groups import (
    BackendConfig,
    ClientConfig,
    DatasetConfig,
    DeviceConfig,
    DpConfig,
    ModelConfig,
    PartitionConfig,
    PersonalizeConfig,
    RoundConfig,
)
from fl_ondevice.errors import ConfigError


@dataclass
class Config:
    """One run: every group plus the top-level keys."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    # A Flower Message-API strategy as a Hydra node: ``_target_`` (the class) and its arguments.
    # Composed from conf/strategy/<name>.yaml; checked by fl_ondevice.server.strategy.make_strategy.
    strategy: dict[str, Any] = field(default_factory=dict)
    client: ClientConfig = field(default_factory=ClientConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    seed: int = 0  # one seed: initial weights, partitions, sampling, shuffling, faults
    num_clients: int = 10
    num_rounds: int = 50  # digits + mlp reach >= 90% central accuracy well before this
    target_accuracy: float | None = None  # report the first round whose accuracy reaches this
    # Examples per infer call in evaluations; each interpreter keeps buffers of this batch. The
    # value of OnDeviceModel's own default (ondevice.device.EVAL_BATCH_SIZE, which the config,
    # a layer below the interpreter, cannot import; tests/test_config.py keeps them equal).
    eval_batch_size: int = 256
    # Converted .tflite files (keyed by model config), datasets' and calibrations' caches, a
    # node's received models. `~` is expanded where the path is used, on each node.
    cache_dir: str = "~/.cache/fl_ondevice"
    output_dir: str = "."  # the run directory; simulate.py sets it to Hydra's
    resume: str | None = None  # a run directory to continue from its last completed round

    def __post_init__(self) -> None:
        require(self.num_clients >= 1, "num_clients", self.num_clients, "must be >= 1")
        require(self.num_rounds >= 1, "num_rounds", self.num_rounds, "must be >= 1")
        require(
            self.target_accuracy is None or 0.0 < self.target_accuracy <= 1.0,
            "target_accuracy",
            self.target_accuracy,
            "must be in (0, 1] or null",
        )
        require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        require(
            self.device.enabled or (self.round.overcommit == 1.0 and self.round.deadline_s is None),
            "round",
            asdict(self.round),
            "over-commitment and deadlines act on the simulated clock: choose phones with "
            "device=NAME (conf/device/*.yaml) or drop round.overcommit/round.deadline_s",
        )
        if self.model.name == "transfer":
            self._check_transfer()

    def _check_transfer(self) -> None:
        base, classes = self.model.base_classes, self.dataset.classes
        require(
            len(DATASET_SHAPES.get(self.dataset.name, ())) != 3,
            "model",
            "transfer",
            f"model=transfer's base takes grey images; dataset={self.dataset.name} is colour: "
            "use model=cnn or model=simple_cnn",
        )
        check_classes("model.base_classes", base, DATASET_CLASSES.get(self.dataset.name))
        require(
            classes is not None,
            "dataset.classes",
            classes,
            f"model=transfer needs the clients' classes, disjoint from model.base_classes={base}, "
            "e.g. dataset.classes=[5,6,7,8,9]",
        )
        overlap = sorted(set(base) & set(classes or []))
        require(
            not overlap,
            "dataset.classes",
            classes,
            f"classes {overlap} are also in model.base_classes={base}: the pretrained base must "
            "not have seen the clients' classes, or the transfer task measures nothing; make the "
            "two lists disjoint",
        )

    @property
    def local_workers(self) -> int:
        """Workers this machine could run: its cores / ``client.num_cpus`` (the server evaluates
        on as many interpreters; the engine's own count is ``runtime.cluster.engine_workers``)."""
        return max(1, int((os.cpu_count() or 1) // self.client.num_cpus))


@dataclass
class DeployConfig(Config):
    """``python -m fl_ondevice.deploy``: a run on one SuperLink and ``num_nodes`` SuperNodes
    started on this machine. Each SuperNode owns one partition: ``num_clients`` is
    ``num_nodes``."""

    num_nodes: int = 4
    insecure: bool = False  # no TLS and no SuperNode authentication (Flower's --insecure)

    def __post_init__(self) -> None:
        require(self.num_nodes >= 1, "num_nodes", self.num_nodes, "must be >= 1")
        super().__post_init__()


def parse_config(node: DictConfig | Mapping[str, Any]) -> Config:
    """Validate a composed Hydra config; every bad value raises ``ConfigError`` naming its key."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    node = dict(node)
    for group, cls in GROUPS.items():  # per group, so the message names the group
        to_dataclass(cls, node.get(group, {}), group)
    return to_dataclass(Config, node, "config")  # type: ignore[no-any-return]


GROUPS: dict[str, type] = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "partition": PartitionConfig,
    "client": ClientConfig,
    "backend": BackendConfig,
    "device": DeviceConfig,
    "round": RoundConfig,
    "personalize": PersonalizeConfig,
    "dp": DpConfig,
}


def to_dataclass(cls: type, node: DictConfig | Mapping[str, Any], key: str) -> Any:
    """Validate a config node against dataclass ``cls`` and return an instance.

    Unknown keys and wrong types become a ``ConfigError`` naming ``key``; value checks run in the
    dataclass' ``__post_init__``.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config under '{key}': {err}") from None


def register_schema() -> None:
    """Register :class:`Config` with Hydra as ``schema``: conf/config.yaml starts from it."""
    ConfigStore.instance().store(name="schema", node=Config)
