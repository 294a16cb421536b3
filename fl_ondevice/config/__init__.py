"""Typed run configuration: every default in one place, validated before anything runs.

The dataclasses are the defaults of every key (Hydra composes ``conf/`` on top of them,
registered as the ``schema`` config) and the checks of every value. The strategy group is the
exception: its keys are the arguments of whichever Flower strategy class ``strategy._target_``
names, so their values live in ``conf/strategy/<name>.yaml`` and are checked when the strategy is
built (``fl_ondevice.server.strategy.make_strategy``).

- ``choices``: the values a key may take (datasets, models, encodings ...) and the checks;
- ``groups``: one dataclass per config group (dataset, model, partition, client, device ...);
- ``schema``: :class:`Config` (one run) and :class:`DeployConfig`, and :func:`parse_config`;
- ``runconfig``: :func:`to_run_config` / :func:`from_run_config`, Flower's kebab-case run config.
"""

from fl_ondevice.config.choices import (
    ATTACKS,
    DATASET_CLASSES,
    DATASET_SHAPES,
    DATASETS,
    DP_SAMPLING,
    ENCODINGS,
    FLOAT16,
    FLOAT32,
    INT8,
    MODELS,
    NO_AMPLIFICATION,
    OPTIMIZERS,
    PARTITIONERS,
    POISSON,
    TRAINABLE,
    WITHOUT_REPLACEMENT,
)
from fl_ondevice.config.groups import (
    AttackConfig,
    BackendConfig,
    ClientConfig,
    DatasetConfig,
    DeviceClassConfig,
    DeviceConfig,
    DpConfig,
    ModelConfig,
    PartitionConfig,
    PersonalizeConfig,
    RoundConfig,
)
from fl_ondevice.config.runconfig import from_run_config, to_run_config
from fl_ondevice.config.schema import (
    Config,
    DeployConfig,
    parse_config,
    register_schema,
    to_dataclass,
)

register_schema()

__all__ = [
    "ATTACKS",
    "DATASETS",
    "DATASET_CLASSES",
    "DATASET_SHAPES",
    "DP_SAMPLING",
    "NO_AMPLIFICATION",
    "POISSON",
    "WITHOUT_REPLACEMENT",
    "ENCODINGS",
    "FLOAT16",
    "FLOAT32",
    "INT8",
    "MODELS",
    "OPTIMIZERS",
    "PARTITIONERS",
    "TRAINABLE",
    "AttackConfig",
    "BackendConfig",
    "ClientConfig",
    "Config",
    "DatasetConfig",
    "DeployConfig",
    "DeviceClassConfig",
    "DeviceConfig",
    "DpConfig",
    "ModelConfig",
    "PartitionConfig",
    "PersonalizeConfig",
    "RoundConfig",
    "from_run_config",
    "parse_config",
    "register_schema",
    "to_dataclass",
    "to_run_config",
]
