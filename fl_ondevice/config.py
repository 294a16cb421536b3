"""Typed run configuration: every default in one place, validated before anything runs.

The dataclasses below are the defaults of every key (Hydra composes ``conf/`` on top of them,
registered as the ``schema`` config) and the checks of every value. The strategy group is the
exception: its keys are the arguments of whichever Flower strategy class ``strategy._target_``
names, so their values live in ``conf/strategy/<name>.yaml`` and are checked when the strategy is
built (``fl_ondevice.server.strategy.make_strategy``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, get_args, get_type_hints

from flwr.common.config import flatten_dict, unflatten_dict
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_ondevice.errors import ConfigError

DATASETS = ("digits", "fashion_mnist", "mnist")
PARTITIONERS = ("iid", "dirichlet", "shards", "label_quantity")
MODELS = ("mlp", "2nn", "cnn", "simple_cnn", "tflite", "transfer")
# Classes and image shape (H, W) per dataset, to check class lists and export a model before any
# data is loaded.
DATASET_CLASSES = {"digits": 10, "fashion_mnist": 10, "mnist": 10}
DATASET_SHAPES = {"digits": (8, 8), "fashion_mnist": (28, 28), "mnist": (28, 28)}
# Where converted models, datasets' caches and a node's received models go (cache_dir).
CACHE_DIR = "~/.cache/fl_ondevice"
# What a client uploads (client.update_encoding; fl_ondevice.wire.encoding encodes and decodes).
FLOAT32, FLOAT16, INT8 = "float32", "float16", "int8"
ENCODINGS = (FLOAT32, FLOAT16, INT8)
TRAINABLE = ("head", "all")
OPTIMIZERS = ("sgd", "adam")
ATTACKS = ("none", "sign_flip", "scale")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


@dataclass
class DatasetConfig:
    name: str = "digits"  # ships with scikit-learn: runs offline
    # Directory of the IDX .gz files (fashion_mnist, mnist); null = look in the standard places.
    data_dir: str | None = None
    # Allow a download (HTTPS from keras' dataset bucket or FL_ONDEVICE_DATASET_URL, checked by
    # SHA-256) when no local copy is found.
    download: bool = True
    # digits has no official split: this fraction, stratified and seeded, is the central test set.
    test_fraction: float = 0.2
    # Keep only these classes (train and test), relabelled 0..k-1 in this order; None = all.
    # model=transfer gives the clients classes its pretrained base has never seen.
    classes: list[int] | None = None

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, "dataset.name", self.name, f"choose one of {DATASETS}")
        if self.classes is not None:
            _check_classes("dataset.classes", self.classes, DATASET_CLASSES[self.name])
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
        for key in ("min_partition_size",):
            _require(getattr(self, key) >= 0, f"{p}.{key}", getattr(self, key), "must be >= 0")
        for key in ("max_retries", "shards_per_client", "shard_size", "labels_per_client"):
            _require(getattr(self, key) >= 1, f"{p}.{key}", getattr(self, key), "must be >= 1")
        _require(
            0.0 <= self.local_test_fraction < 1.0,
            f"{p}.local_test_fraction",
            self.local_test_fraction,
            "must be in [0, 1)",
        )


@dataclass
class ModelConfig:
    name: str = "mlp"  # TFLite on-device training guide's Flatten -> Dense 128 ReLU -> Dense
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.0  # sgd only
    beta_1: float = 0.9  # adam only
    beta_2: float = 0.999  # adam only
    epsilon: float = 1e-7  # adam only (Keras' default)
    path: str | None = None  # model=tflite: the user's .tflite file
    # model=transfer (fl_ondevice.ondevice.transfer). `head`: the clients train a head on a frozen
    # base, in TensorFlow's model_personalization layout (load/train/infer/save/restore/
    # initialize), the on-device personalization use case; `all`: base and head are trained,
    # in the guide layout, for comparing with full-model FL.
    trainable: str = "head"
    # Start from a base pretrained centrally on base_classes; false = a random base from the
    # seed (with trainable=all: full-model FL from scratch).
    pretrained: bool = True
    # The classes the base is pretrained on; dataset.classes (the clients' task) must avoid
    # them, so the head meets classes the base has never seen. Half of the 10 digits.
    base_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    pretrain_epochs: int = 5  # digits' base classes reach > 95% test accuracy in 5 epochs
    pretrain_learning_rate: float = 0.05  # SGD with momentum 0.9, batch 32, for pretraining

    def __post_init__(self) -> None:
        _require(self.name in MODELS, "model.name", self.name, f"choose one of {MODELS}")
        _require(
            self.optimizer in OPTIMIZERS,
            "model.optimizer",
            self.optimizer,
            f"choose one of {OPTIMIZERS}",
        )
        _require(self.learning_rate > 0, "model.learning_rate", self.learning_rate, "must be > 0")
        for key in ("momentum", "beta_1", "beta_2"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"model.{key}", value, "must be in [0, 1)")
        _require(self.epsilon > 0, "model.epsilon", self.epsilon, "must be > 0")
        _require(
            self.name != "tflite" or bool(self.path),
            "model.path",
            self.path,
            "model=tflite needs model.path=FILE pointing at an on-device training .tflite "
            "(guide, personalization or android layout; README: Bring your own model)",
        )
        _require(
            self.trainable in TRAINABLE,
            "model.trainable",
            self.trainable,
            f"choose one of {TRAINABLE}",
        )
        _check_classes("model.base_classes", self.base_classes, None)
        _require(self.pretrain_epochs >= 1, "model.pretrain_epochs", self.pretrain_epochs, ">= 1")
        _require(
            self.pretrain_learning_rate > 0,
            "model.pretrain_learning_rate",
            self.pretrain_learning_rate,
            "must be > 0",
        )
        if self.name == "transfer" and self.trainable == "head":
            # The personalization layout has no `reset` signature: its optimizer has no state.
            _require(
                self.optimizer == "sgd" and self.momentum == 0.0,
                "model.optimizer",
                f"{self.optimizer} (momentum {self.momentum})",
                "model=transfer with trainable=head trains its head with plain SGD: use "
                "model.optimizer=sgd model.momentum=0, or model.trainable=all",
            )


def _check_classes(key: str, classes: list[int], num_classes: int | None) -> None:
    _require(len(classes) >= 2, key, classes, "list at least 2 classes")
    _require(len(set(classes)) == len(classes), key, classes, "list each class once")
    _require(min(classes) >= 0, key, classes, "classes are label numbers >= 0")
    if num_classes is not None:
        _require(
            max(classes) < num_classes,
            key,
            classes,
            f"the dataset's classes are 0..{num_classes - 1}",
        )


@dataclass
class AttackConfig:
    """Clients that send manipulated updates, to test robust aggregation.

    The attackers are a fixed set of ``round(fraction * num_clients)`` clients drawn from the
    seed (``fl_ondevice.client.client.attackers``). Each trains honestly, then sends, with the
    global weights g and its trained weights w: ``scale``: g + scale * (w - g); ``sign_flip``:
    g - scale * (w - g).
    """

    kind: str = "none"
    fraction: float = 0.0  # share of clients that attack
    scale: float = 1.0  # how far they push: 1 = an honest-sized step (sign_flip: reversed)

    def __post_init__(self) -> None:
        _require(self.kind in ATTACKS, "client.attack.kind", self.kind, f"choose one of {ATTACKS}")
        _require(0.0 <= self.fraction <= 1.0, "client.attack.fraction", self.fraction, "in [0, 1]")
        _require(self.scale > 0, "client.attack.scale", self.scale, "must be > 0")


@dataclass
class BackendConfig:
    """Where the simulation engine's workers run."""

    # An existing Ray cluster to run the clients on (``HOST:PORT`` of its head, as printed by
    # ``ray start --head``, or ``auto``); None = start a Ray instance on this machine. Every
    # node of the cluster needs fl_ondevice and its dependencies installed.
    address: str | None = None

    def __post_init__(self) -> None:
        _require(
            self.address is None or self.address == "auto" or _host_port(self.address),
            "backend.address",
            self.address,
            "must be HOST:PORT (the head's GCS address from `ray start --head`), auto, or null",
        )


def _host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


@dataclass
class ClientConfig:
    local_epochs: int = 1  # E
    batch_size: int | None = 32  # B; None = the client's whole local set (B = inf)
    num_threads: int = 1  # interpreter threads; one client per core uses the cores best
    num_cpus: float = 1.0  # Ray resources per client: workers = cores / num_cpus
    dropout_rate: float = 0.0  # share of sampled clients that never reply (seeded per round)
    failure_rate: float = 0.0  # share of sampled clients that crash while training (seeded)
    # What a client uploads (fl_ondevice.wire.encoding): its weights as float32, or its change to
    # the global weights as float16 or int8 with a per-tensor scale. A phone's upload is its
    # slowest link: float16 sends 1/2 of float32's bytes, int8 about 1/4.
    update_encoding: str = "float32"
    # About how many simulated clients one engine message carries (trained one after another by
    # one worker); None = one each up to 16 clients per worker, else 4 messages per worker.
    # Results do not depend on it: the strategy sees one reply per client, in client order.
    clients_per_message: int | None = None
    # Flower ClientApp mods every client's messages pass through, outermost first: name ->
    # a Hydra node (``_target_`` and arguments; ``_partial_: true`` for a mod function), e.g.
    # {clip: {_target_: flwr.clientapp.mod.fixedclipping_mod, _partial_: true}}.
    mods: dict[str, Any] = field(default_factory=dict)
    attack: AttackConfig = field(default_factory=AttackConfig)

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
        _require(
            self.update_encoding in ENCODINGS,
            "client.update_encoding",
            self.update_encoding,
            f"choose one of {ENCODINGS}",
        )
        for key in ("dropout_rate", "failure_rate"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"client.{key}", value, "must be in [0, 1)")
        for name, node in self.mods.items():
            _require(
                isinstance(node, Mapping) and "_target_" in node,
                f"client.mods.{name}",
                node,
                "each mod is a mapping with a _target_ (a Flower mod function with "
                "_partial_: true, or a mod class such as flwr.clientapp.mod.LocalDpMod)",
            )


@dataclass
class DeviceClassConfig:
    """One class of phones: how fast it trains, its network, and when it is online."""

    share: float = 1.0  # share of the clients in this class (shares are normalized)
    # Train-step time on this phone / the host's measured interpreter time (the calibration).
    compute_factor: float = 1.0
    down_mbps: float = 50.0  # download bandwidth, Mbit/s
    up_mbps: float = 10.0  # upload bandwidth, Mbit/s
    latency_ms: float = 50.0  # round-trip time; paid once for the download, once for the upload
    # Hours a day the phone may train (e.g. while charging overnight), one window per client at
    # a seeded time of day; 24 = always online.
    online_hours: float = 24.0

    def check(self, key: str) -> None:
        """Raise ``ConfigError`` naming ``key`` for a bad value."""
        _require(self.share >= 0, f"{key}.share", self.share, "must be >= 0")
        for name in ("compute_factor", "down_mbps", "up_mbps"):
            value = getattr(self, name)
            _require(value > 0, f"{key}.{name}", value, "must be > 0")
        _require(self.latency_ms >= 0, f"{key}.latency_ms", self.latency_ms, "must be >= 0")
        _require(
            0 < self.online_hours <= 24, f"{key}.online_hours", self.online_hours, "in (0, 24]"
        )


@dataclass
class DeviceConfig:
    """The phones the clients run on: a simulated clock per round (``devicetime.clock``).

    No classes (``device=none``, the default) means no device clock: the simulated-time
    columns stay empty.
    """

    name: str = "none"  # the profile, for titles and tables
    classes: dict[str, DeviceClassConfig] = field(default_factory=dict)
    # A CSV file whose rows replace ``classes``: a ``name`` column plus DeviceClassConfig's keys.
    table: str | None = None
    # A calibration.json (a run directory's) whose step times to use; None = measure this model
    # on this machine (cached in cache_dir).
    calibration: str | None = None

    def __post_init__(self) -> None:
        for name, cls in self.classes.items():
            cls.check(f"device.classes.{name}")
        _require(
            not self.classes or sum(c.share for c in self.classes.values()) > 0,
            "device.classes",
            {k: c.share for k, c in self.classes.items()},
            "the shares must not all be 0",
        )

    @property
    def enabled(self) -> bool:
        """Whether the run has a device clock."""
        return bool(self.classes or self.table)


@dataclass
class RoundConfig:
    """When the server closes a training round (over-commitment and deadlines act on the
    simulated clock: they need a device) and how many updates it needs."""

    # Sample ceil(K x overcommit) clients and aggregate the first K to finish, K being the
    # strategy's sample; 1 = off. FedScale's default is 1.3 (arXiv:2105.11367).
    overcommit: float = 1.0
    # Updates that arrive later than this many simulated seconds after the round started are
    # stragglers: counted, not aggregated. None = wait for every sampled client.
    deadline_s: float | None = None
    # A round with fewer valid updates is abandoned: the global model is kept (production FL's
    # minimum reporting count, arXiv:1902.01046). None = strategy.min_train_nodes.
    min_updates: int | None = None

    def __post_init__(self) -> None:
        _require(
            self.min_updates is None or self.min_updates >= 1,
            "round.min_updates",
            self.min_updates,
            "must be >= 1, or null for strategy.min_train_nodes",
        )
        _require(self.overcommit >= 1.0, "round.overcommit", self.overcommit, "must be >= 1")
        _require(
            self.deadline_s is None or self.deadline_s > 0,
            "round.deadline_s",
            self.deadline_s,
            "must be > 0 seconds, or null to wait for every client",
        )


@dataclass
class PersonalizeConfig:
    """Personalization metrics: at each client-side evaluation, each evaluated client also
    fine-tunes a copy of the global model on its local train split and evaluates it on its
    local test split. The fine-tuned weights never reach the server."""

    # Local epochs of fine-tuning (batch size and learning rate as in training); 0 = off, the
    # default: no fine-tuning, so runs keep their speed and their metrics.
    epochs: int = 0

    def __post_init__(self) -> None:
        _require(
            self.epochs >= 0,
            "personalize.epochs",
            self.epochs,
            "must be >= 0 (0 = off, k > 0 = fine-tune k local epochs at each evaluation)",
        )


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
    seed: int = 0  # one seed: initial weights, partitions, sampling, shuffling, faults
    num_clients: int = 10
    num_rounds: int = 50  # digits + mlp reach >= 90% central accuracy well before this
    target_accuracy: float | None = None  # report the first round whose accuracy reaches this
    eval_batch_size: int = 256  # central evaluation batch (infer); each interpreter keeps buffers
    cache_dir: str = CACHE_DIR  # converted .tflite files, keyed by model config
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
        _check_classes("model.base_classes", base, DATASET_CLASSES[self.dataset.name])
        _require(
            classes is not None,
            "dataset.classes",
            classes,
            f"model=transfer needs the clients' classes, disjoint from model.base_classes={base}, "
            "e.g. dataset.classes=[5,6,7,8,9]",
        )
        overlap = sorted(set(base) & set(classes or []))
        _require(
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
        _require(self.num_nodes >= 1, "num_nodes", self.num_nodes, "must be >= 1")
        super().__post_init__()


def parse_config(node: DictConfig | Mapping[str, Any]) -> Config:
    """Validate a composed Hydra config; every bad value raises ``ConfigError`` naming its key."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    node = dict(node)
    for group, cls in _GROUPS.items():  # per group, so the message names the group
        to_dataclass(cls, node.get(group, {}), group)
    return to_dataclass(Config, node, "config")  # type: ignore[no-any-return]


_GROUPS: dict[str, type] = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "partition": PartitionConfig,
    "client": ClientConfig,
    "backend": BackendConfig,
    "device": DeviceConfig,
    "round": RoundConfig,
    "personalize": PersonalizeConfig,
}


def to_run_config(cfg: Config) -> dict[str, int | float | str | bool]:
    """The one translation to Flower's flat, kebab-case run config (``client.batch-size``).

    Nulls become ``""`` and lists of ints ``"5,6,7"`` (Flower's run config holds scalars only);
    :func:`from_run_config` inverts this.
    """
    return {_kebab(k): v for k, v in flatten_dict(_no_nulls(asdict(cfg))).items()}


def from_run_config(flat: Mapping[str, Any]) -> Config:
    """Rebuild and validate a :class:`Config` from :func:`to_run_config`'s output."""
    nested = unflatten_dict({k.replace("-", "_"): v for k, v in flat.items()})
    return parse_config(_nulls(nested, Config))


def _kebab(key: str) -> str:
    return key.replace("_", "-")


def _no_nulls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _no_nulls(v) for k, v in node.items()}
    if isinstance(node, list):
        return ",".join(str(int(v)) for v in node)
    return "" if node is None else node


def _nulls(node: dict[str, Any], cls: type | None) -> dict[str, Any]:
    # "" back to None: for fields typed `X | None`, and anywhere in the free-form nodes
    # (strategy arguments, mods), where no argument takes an empty string.
    hints = get_type_hints(cls) if cls is not None else {}
    out: dict[str, Any] = {}
    for key, value in node.items():
        sub = _dataclass_of(hints.get(key))
        if isinstance(value, dict):
            out[key] = _nulls(value, sub)
        elif value == "" and (cls is None or type(None) in get_args(hints.get(key))):
            out[key] = None
        elif isinstance(value, str) and _is_int_list(hints.get(key)):
            out[key] = [int(v) for v in value.split(",") if v]
        else:
            out[key] = value
    return out


def _is_int_list(hint: Any) -> bool:
    return hint == list[int] or list[int] in get_args(hint)


def _dataclass_of(hint: Any) -> type | None:
    return hint if isinstance(hint, type) and is_dataclass(hint) else None


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


register_schema()

__all__ = [
    "ATTACKS",
    "DATASETS",
    "DATASET_CLASSES",
    "MODELS",
    "OPTIMIZERS",
    "PARTITIONERS",
    "TRAINABLE",
    "AttackConfig",
    "ClientConfig",
    "Config",
    "DatasetConfig",
    "DeployConfig",
    "DeviceClassConfig",
    "DeviceConfig",
    "ModelConfig",
    "PartitionConfig",
    "PersonalizeConfig",
    "RoundConfig",
    "from_run_config",
    "parse_config",
    "to_dataclass",
    "to_run_config",
]
