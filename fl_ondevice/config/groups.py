"""The config groups: one dataclass each, with every key's default and the reason beside it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fl_ondevice.config.choices import (
    ATTACKS,
    DATASET_CLASSES,
    DATASETS,
    DP_SAMPLING,
    ENCODINGS,
    MODELS,
    OPTIMIZERS,
    PARTITIONERS,
    TRAINABLE,
    check_classes,
    require,
)


@dataclass
class DatasetConfig:
    name: str = "digits"  # ships with scikit-learn: runs offline
    # Directory of the IDX .gz files (fashion_mnist, mnist) or of LEAF's train/ and test/ JSON
    # (femnist); null = look in the standard places.
    data_dir: str | None = None
    # dataset=files: a .npz with x (N, H, W), y (N,), optional client (N,), x_test and y_test.
    path: str | None = None
    # Allow a download (HTTPS from keras' dataset bucket or FL_ONDEVICE_DATASET_URL, checked by
    # SHA-256) when no local copy is found.
    download: bool = True
    # digits has no official split: this fraction, stratified and seeded, is the central test set.
    test_fraction: float = 0.2
    # Keep only these classes (train and test), relabelled 0..k-1 in this order; None = all.
    # model=transfer gives the clients classes its pretrained base has never seen.
    classes: list[int] | None = None

    def __post_init__(self) -> None:
        require(self.name in DATASETS, "dataset.name", self.name, f"choose one of {DATASETS}")
        if self.classes is not None:
            check_classes("dataset.classes", self.classes, DATASET_CLASSES.get(self.name))
        require(
            self.name != "files" or bool(self.path),
            "dataset.path",
            self.path,
            "dataset=files needs dataset.path=FILE.npz with arrays x (N, H, W) and y (N,), "
            "optionally client (N,), x_test and y_test",
        )
        require(
            0.0 < self.test_fraction < 1.0,
            "dataset.test_fraction",
            self.test_fraction,
            "must be in (0, 1)",
        )


@dataclass
class PartitionConfig:
    name: str = "dirichlet"
    # A Flower Datasets partitioner class (flwr_datasets.partitioner.X) instead of ours (name).
    # Its arguments are the keys below of the same name; num_partitions is num_clients, seed the
    # run's seed (fl_ondevice.data.flower).
    _target_: str | None = None
    alpha: float = 0.5  # dirichlet: concentration; small = skewed (Hsu et al. 2019)
    min_partition_size: int = 10  # dirichlet: resample until every client holds this many
    max_retries: int = 100  # dirichlet: resampling attempts before giving up
    shards_per_client: int = 2  # shards: arXiv:1602.05629 gives each client 2 shards
    shard_size: int = 300  # shards: 200 shards of 300 MNIST images in the paper
    labels_per_client: int = 2  # label_quantity: NIID-Bench #C=k
    local_test_fraction: float = 0.2  # per-client local test split, for client-side evaluation
    # Flower Datasets partitioners' arguments (null = the partitioner's default); alpha,
    # min_partition_size and shard_size above are theirs too. Other arguments: +partition.args.K=V.
    partition_by: str = "label"  # the column: label, or client for data with natural clients
    num_classes_per_partition: int | None = None  # PathologicalPartitioner
    class_assignment_mode: str | None = None  # PathologicalPartitioner
    num_shards_per_partition: int | None = None  # ShardPartitioner
    keep_incomplete_shard: bool | None = None  # ShardPartitioner
    self_balancing: bool | None = None  # DirichletPartitioner
    strictness: float | None = None  # ContinuousPartitioner
    group_size: int | None = None  # GroupedNaturalIdPartitioner
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = "partition"
        require(self.name in PARTITIONERS, f"{p}.name", self.name, f"choose one of {PARTITIONERS}")
        require(
            self._target_ is None or "." in self._target_,
            f"{p}._target_",
            self._target_,
            "name a partitioner class by its module path, e.g. "
            "flwr_datasets.partitioner.DirichletPartitioner, or null for partition.name",
        )
        require(self.alpha > 0, f"{p}.alpha", self.alpha, "must be > 0")
        for key in ("min_partition_size",):
            require(getattr(self, key) >= 0, f"{p}.{key}", getattr(self, key), "must be >= 0")
        for key in ("max_retries", "shards_per_client", "shard_size", "labels_per_client"):
            require(getattr(self, key) >= 1, f"{p}.{key}", getattr(self, key), "must be >= 1")
        require(
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
        require(self.name in MODELS, "model.name", self.name, f"choose one of {MODELS}")
        require(
            self.optimizer in OPTIMIZERS,
            "model.optimizer",
            self.optimizer,
            f"choose one of {OPTIMIZERS}",
        )
        require(self.learning_rate > 0, "model.learning_rate", self.learning_rate, "must be > 0")
        for key in ("momentum", "beta_1", "beta_2"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"model.{key}", value, "must be in [0, 1)")
        require(self.epsilon > 0, "model.epsilon", self.epsilon, "must be > 0")
        require(
            self.name != "tflite" or bool(self.path),
            "model.path",
            self.path,
            "model=tflite needs model.path=FILE pointing at an on-device training .tflite "
            "(guide, personalization or android layout; README: Bring your own model)",
        )
        require(
            self.trainable in TRAINABLE,
            "model.trainable",
            self.trainable,
            f"choose one of {TRAINABLE}",
        )
        check_classes("model.base_classes", self.base_classes, None)
        require(self.pretrain_epochs >= 1, "model.pretrain_epochs", self.pretrain_epochs, ">= 1")
        require(
            self.pretrain_learning_rate > 0,
            "model.pretrain_learning_rate",
            self.pretrain_learning_rate,
            "must be > 0",
        )
        if self.name == "transfer" and self.trainable == "head":
            # The personalization layout has no `reset` signature: its optimizer has no state.
            require(
                self.optimizer == "sgd" and self.momentum == 0.0,
                "model.optimizer",
                f"{self.optimizer} (momentum {self.momentum})",
                "model=transfer with trainable=head trains its head with plain SGD: use "
                "model.optimizer=sgd model.momentum=0, or model.trainable=all",
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
        require(self.kind in ATTACKS, "client.attack.kind", self.kind, f"choose one of {ATTACKS}")
        require(0.0 <= self.fraction <= 1.0, "client.attack.fraction", self.fraction, "in [0, 1]")
        require(self.scale > 0, "client.attack.scale", self.scale, "must be > 0")


@dataclass
class BackendConfig:
    """Where the simulation engine's workers run."""

    # An existing Ray cluster to run the clients on (``HOST:PORT`` of its head, as printed by
    # ``ray start --head``, or ``auto``); None = start a Ray instance on this machine. Every
    # node of the cluster needs fl_ondevice and its dependencies installed.
    address: str | None = None

    def __post_init__(self) -> None:
        require(
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
        require(
            self.clients_per_message is None or self.clients_per_message >= 1,
            "client.clients_per_message",
            self.clients_per_message,
            "must be >= 1, or null to pick it from the number of workers",
        )
        require(self.local_epochs >= 1, "client.local_epochs", self.local_epochs, "must be >= 1")
        require(
            self.batch_size is None or self.batch_size >= 1,
            "client.batch_size",
            self.batch_size,
            "must be >= 1, or null for full batch",
        )
        require(self.num_threads >= 1, "client.num_threads", self.num_threads, "must be >= 1")
        require(self.num_cpus > 0, "client.num_cpus", self.num_cpus, "must be > 0")
        require(
            self.update_encoding in ENCODINGS,
            "client.update_encoding",
            self.update_encoding,
            f"choose one of {ENCODINGS}",
        )
        for key in ("dropout_rate", "failure_rate"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"client.{key}", value, "must be in [0, 1)")
        for name, node in self.mods.items():
            require(
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
        require(self.share >= 0, f"{key}.share", self.share, "must be >= 0")
        for name in ("compute_factor", "down_mbps", "up_mbps"):
            value = getattr(self, name)
            require(value > 0, f"{key}.{name}", value, "must be > 0")
        require(self.latency_ms >= 0, f"{key}.latency_ms", self.latency_ms, "must be >= 0")
        require(0 < self.online_hours <= 24, f"{key}.online_hours", self.online_hours, "in (0, 24]")


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
        require(
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
        require(
            self.min_updates is None or self.min_updates >= 1,
            "round.min_updates",
            self.min_updates,
            "must be >= 1, or null for strategy.min_train_nodes",
        )
        require(self.overcommit >= 1.0, "round.overcommit", self.overcommit, "must be >= 1")
        require(
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
        require(
            self.epochs >= 0,
            "personalize.epochs",
            self.epochs,
            "must be >= 0 (0 = off, k > 0 = fine-tune k local epochs at each evaluation)",
        )


@dataclass
class DpConfig:
    """The (epsilon, delta) accounting of a run with a DP strategy (``strategy=dp_*``) or
    ``LocalDpMod``: its delta, the sampling it assumes, and a budget."""

    # The delta of every epsilon reported; null = num_clients ** -1.1, below 1/num_clients as a
    # user-level guarantee needs (Kairouz et al. 2021, "Practical and private (deep) learning").
    delta: float | None = None
    # How the clients of a round are drawn, for amplification by sampling:
    # - without_replacement: exactly m of the N clients, uniformly, each round (what this
    #   simulator does; replace-one neighbours): the default, because it is exact here;
    # - poisson: each client joins with probability m/N (add/remove-one neighbours), the model
    #   of TFF's, Opacus' and McMahan et al. 2018's epsilons; an approximation here;
    # - no_amplification: every round as a full-population Gaussian release (Flower's own
    #   accountant for fixed clipping); also what a run with device=... falls back to, since
    #   availability windows make the sample not uniform over the N clients.
    sampling: str = "without_replacement"
    # Solve for the strategy's noise_multiplier before the run starts so that the final epsilon
    # (num_rounds rounds, this sampling and delta) is at most this; null = take the
    # noise_multiplier the strategy names.
    target_epsilon: float | None = None
    # Stop the run cleanly before the round that would take epsilon above this; null = no limit.
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        require(
            self.delta is None or 0.0 < self.delta < 1.0,
            "dp.delta",
            self.delta,
            "must be in (0, 1), or null for num_clients ** -1.1",
        )
        require(self.sampling in DP_SAMPLING, "dp.sampling", self.sampling, f"one of {DP_SAMPLING}")
        for key in ("target_epsilon", "max_epsilon"):
            value = getattr(self, key)
            require(value is None or value > 0.0, f"dp.{key}", value, "must be > 0, or null")
