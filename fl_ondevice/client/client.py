"""A simulated client's local work, without Flower: restore, train on its shard, save."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fl_ondevice import seeds
from fl_ondevice.config import Config
from fl_ondevice.data.dataset import Dataset
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.data.partitioners import Partition, make_partitions
from fl_ondevice.errors import InputError, TrainingError
from fl_ondevice.ondevice.device import OnDeviceModel, Staged
from fl_ondevice.ondevice.layouts import PERSONALIZATION
from fl_ondevice.ondevice.weights import Weights
from fl_ondevice.wire.node import bottleneck_dir, run_key


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back after local training."""

    weights: Weights
    num_examples: int
    train_loss: float  # mean over the local steps
    seconds: float  # the whole update: restore, train, save, checkpoint I/O
    train_seconds: float  # inside the train signature only


@dataclass(frozen=True)
class ClientEvaluation:
    """A client's evaluation of the global model on its local test split, and (with
    ``personalize.epochs`` > 0) of the global model fine-tuned on its local train split."""

    num_examples: int
    loss: float
    accuracy: float
    personal_loss: float | None = None  # None: personalization is off
    personal_accuracy: float | None = None


def local_seed(seed: int, server_round: int, client_id: int) -> int:
    """Shuffling seed of one client in one round: distinct per (seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, client_id]).generate_state(1)[0])


def injected_failure(seed: int, server_round: int, client_id: int, rate: float) -> bool:
    """Whether ``client.failure_rate`` makes this client crash in this round (seeded draw)."""
    if rate <= 0.0:  # the default; a generator per client costs ~0.1 ms of a 4 ms mlp update
        return False
    draw = np.random.default_rng([seed, server_round, client_id, seeds.FAILURE]).random()
    return bool(draw < rate)


def personalize_seed(seed: int, server_round: int, client_id: int) -> int:
    """Shuffling seed of one client's fine-tuning (``personalize``) in one round: apart from
    its training's (:func:`local_seed`), so fine-tuning never replays the training order."""
    state = np.random.SeedSequence([seed, server_round, client_id, seeds.PERSONALIZE])
    return int(state.generate_state(1)[0])


_DATA: dict[str, tuple[Dataset, list[Partition]]] = {}


def client_data(cfg: Config) -> tuple[Dataset, list[Partition]]:
    """The dataset and every client's partition, computed once per process and config."""
    key = repr((cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed))
    if key not in _DATA:
        _DATA.clear()  # a worker serves one run at a time: keep one dataset in memory
        dataset = load_dataset(cfg.dataset, cfg.seed, cfg.cache_dir)
        _DATA[key] = dataset, make_partitions(dataset, cfg.num_clients, cfg.partition, cfg.seed)
    return _DATA[key]


def local_train_x(
    cfg: Config,
    model: OnDeviceModel,
    client_id: int,
    part: Partition,
    run_id: int | None = None,
) -> np.ndarray:
    """``train``'s inputs for a client's local train split: its images, or for a model in the
    personalization layout the bottlenecks ``load`` made of them, once per client and run.

    The app this layout comes from runs ``load`` once per sample, as the user adds it, and
    trains on the stored bottlenecks; here the first of a client's calls in a run computes
    them and stores them where every worker of this host finds them
    (``fl_ondevice.wire.node.bottleneck_dir``), as the phone keeps them in its storage. Without
    a ``run_id`` (no engine) they are kept in this process only.
    """
    dataset, _ = client_data(cfg)
    x = dataset.train_x(part.train_indices)  # (n, H, W) float32: this client's images only
    if model.layout is not PERSONALIZATION:
        return x
    run = ("process", str(id(model))) if run_id is None else ("run", run_key(cfg, run_id))
    if _BOTTLENECK_RUN != [run]:
        _BOTTLENECKS.clear()  # a worker serves one run at a time
        _BOTTLENECK_RUN[:] = [run]
    kept = _BOTTLENECKS.get(client_id)
    if kept is None or len(kept) != len(x):
        kept = _BOTTLENECKS[client_id] = _stored_bottlenecks(cfg, model, client_id, x, run_id)
    return kept


_BOTTLENECKS: dict[int, np.ndarray] = {}  # client id -> its bottlenecks, of _BOTTLENECK_RUN
_BOTTLENECK_RUN: list[tuple[str, str]] = []


def _stored_bottlenecks(
    cfg: Config, model: OnDeviceModel, client_id: int, x: np.ndarray, run_id: int | None
) -> np.ndarray:
    if run_id is None:
        return model.load(x)
    path = bottleneck_dir(cfg, run_id) / f"client-{client_id}.npy"
    try:
        stored = np.load(path)
        if stored.shape == (len(x), *model.train_x_shape):
            return stored
    except (OSError, ValueError):  # not there yet (or cut short): compute it
        pass
    bottlenecks = model.load(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
    np.save(tmp, bottlenecks)
    os.replace(tmp, path)  # atomic: another worker may read it meanwhile
    return bottlenecks


class StagedWeights:
    """The global weights a worker received, checked once for all the clients of a message,
    each of which loads them through ``restore``, as each phone would load the weights it
    downloaded.

    Keyed by the identity of the received object (``source``): a message's clients share it,
    and a mod that changes what a client receives gives it a new one.
    """

    def __init__(self) -> None:
        self._key: tuple[object, OnDeviceModel] | None = None
        self._value = Staged({})

    def get(self, model: OnDeviceModel, source: object, decode: Callable[[], Weights]) -> Staged:
        """``source``'s weights staged for ``model``; ``decode`` reads them."""
        if self._key is None or self._key[0] is not source or self._key[1] is not model:
            self._value = model.stage(decode())
            self._key = (source, model)  # holds `source`, so its id cannot be reused meanwhile
        return self._value


def train_client(
    cfg: Config,
    model: OnDeviceModel,
    staged: Staged,
    client_id: int,
    server_round: int,
    proximal_mu: float = 0.0,
    run_id: int | None = None,
) -> ClientUpdate:
    """E epochs of shuffled minibatches through ``train`` (``train_proximal`` when
    ``proximal_mu`` > 0), from the staged global weights; raises the client's error.

    The pooled interpreter's optimizer state is reset first, so momentum or Adam moments never
    pass from one client to the next. An attacking client (``client.attack``) trains honestly,
    then manipulates what it sends.
    """
    t0 = time.perf_counter()
    dataset, partitions = client_data(cfg)
    part = _partition(partitions, client_id)
    model.reset_optimizer()
    model.restore_staged(staged)
    if injected_failure(cfg.seed, server_round, client_id, cfg.client.failure_rate):
        raise TrainingError(
            f"injected failure (client.failure_rate={cfg.client.failure_rate}): the device "
            "crashed while training"
        )
    fit = model.fit(
        local_train_x(cfg, model, client_id, part, run_id),
        dataset.y_train[part.train_indices],
        epochs=cfg.client.local_epochs,
        batch_size=cfg.client.batch_size,
        seed=local_seed(cfg.seed, server_round, client_id),
        proximal_mu=proximal_mu,
    )
    new = model.get_weights()
    attack = cfg.client.attack
    if attack.kind != "none" and client_id in attackers(cfg.seed, cfg.num_clients, attack.fraction):
        new = attacked(new, staged.weights, attack.kind, attack.scale)
    return ClientUpdate(
        weights=new,
        num_examples=len(part.train_indices),
        train_loss=fit["loss"],
        seconds=time.perf_counter() - t0,
        train_seconds=fit["train_seconds"],
    )


def evaluate_client(
    cfg: Config,
    model: OnDeviceModel,
    staged: Staged,
    client_id: int,
    server_round: int = 0,
    run_id: int | None = None,
) -> ClientEvaluation:
    """Evaluate the staged global weights on a client's local test split (``infer``); with
    ``personalize.epochs`` > 0, also the weights :func:`personalize_client` fine-tunes.

    Fine-tuning leaves its weights and optimizer state in the pooled interpreter: whoever uses
    it next restores the weights it needs first (as this function and ``train_client`` do).
    """
    dataset, partitions = client_data(cfg)
    part = _partition(partitions, client_id)
    if not len(part.test_indices):
        raise InputError(
            f"client {client_id} has no local test examples; raise "
            "partition.local_test_fraction or set strategy.fraction_evaluate=0"
        )
    x_test, y_test = dataset.train_x(part.test_indices), dataset.y_train[part.test_indices]
    model.restore_staged(staged)
    result = model.evaluate(x_test, y_test, batch_size=cfg.eval_batch_size)
    if cfg.personalize.epochs == 0:
        return ClientEvaluation(len(part.test_indices), result["loss"], result["accuracy"])
    personal = personalize_client(cfg, model, staged, client_id, server_round, run_id)
    return ClientEvaluation(
        len(part.test_indices),
        result["loss"],
        result["accuracy"],
        personal_loss=personal["loss"],
        personal_accuracy=personal["accuracy"],
    )


def personalize_client(
    cfg: Config,
    model: OnDeviceModel,
    staged: Staged,
    client_id: int,
    server_round: int,
    run_id: int | None = None,
) -> dict[str, float]:
    """Fine-tune the global weights (``staged``) for ``personalize.epochs``
    on a client's local train split, as training does (batch size, learning rate, a fresh
    optimizer, ``train``'s inputs from :func:`local_train_x`), and return ``loss`` and
    ``accuracy`` of the result on its local test split (images, through ``infer``).

    The fine-tuned weights stay on the client: nothing of them is returned.
    """
    dataset, partitions = client_data(cfg)
    part = _partition(partitions, client_id)
    model.reset_optimizer()  # as train_client: no momentum or Adam moments from another client
    model.restore_staged(staged)
    model.fit(
        local_train_x(cfg, model, client_id, part, run_id),
        dataset.y_train[part.train_indices],
        epochs=cfg.personalize.epochs,
        batch_size=cfg.client.batch_size,
        seed=personalize_seed(cfg.seed, server_round, client_id),
    )
    return model.evaluate(
        dataset.train_x(part.test_indices),
        dataset.y_train[part.test_indices],
        batch_size=cfg.eval_batch_size,
    )


def attackers(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The clients that attack: round(fraction * num_clients) of them, drawn from the seed."""
    k = int(round(fraction * num_clients))
    order = np.random.default_rng([seed, seeds.ATTACKERS]).permutation(num_clients)
    return frozenset(int(c) for c in order[:k])


def attacked(weights: Weights, global_weights: Weights, kind: str, scale: float) -> Weights:
    """What an attacker sends instead of its trained ``weights`` w, with g the global weights:
    ``scale``: g + scale * (w - g); ``sign_flip``: g - scale * (w - g)."""
    sign = -1.0 if kind == "sign_flip" else 1.0
    return {
        name: (g + sign * scale * (weights[name] - g)).astype(g.dtype)
        for name, g in global_weights.items()
    }


def _partition(partitions: list[Partition], client_id: int) -> Partition:
    if not 0 <= client_id < len(partitions):
        raise InputError(f"client id {client_id} is outside 0..{len(partitions) - 1}")
    return partitions[client_id]
