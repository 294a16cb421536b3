"""A simulated client's local work, without Flower: restore, train on its shard, save."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fl_ondevice.checkpoint import Weights
from fl_ondevice.config import Config
from fl_ondevice.data import Dataset, load_dataset
from fl_ondevice.device import OnDeviceModel, pooled_model
from fl_ondevice.errors import InputError, TrainingError
from fl_ondevice.partition import Partition, make_partitions


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
    """A client's evaluation of the global model on its local test split."""

    num_examples: int
    loss: float
    accuracy: float


def local_seed(seed: int, server_round: int, client_id: int) -> int:
    """Shuffling seed of one client in one round: distinct per (seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, client_id]).generate_state(1)[0])


def injected_failure(seed: int, server_round: int, client_id: int, rate: float) -> bool:
    """Whether ``client.failure_rate`` makes this client crash in this round (seeded draw)."""
    if rate <= 0.0:  # the default; a generator per client costs ~0.1 ms of a 4 ms mlp update
        return False
    draw = np.random.default_rng([seed, server_round, client_id, _FAILURE_STREAM]).random()
    return bool(draw < rate)


_FAILURE_STREAM = 1  # keeps failure draws independent of the shuffling seed


_DATA: dict[str, tuple[Dataset, list[Partition]]] = {}


def client_data(cfg: Config) -> tuple[Dataset, list[Partition]]:
    """The dataset and every client's partition, computed once per process and config."""
    key = repr((cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed))
    if key not in _DATA:
        _DATA.clear()  # a worker serves one run at a time: keep one dataset in memory
        dataset = load_dataset(cfg.dataset, cfg.seed)
        _DATA[key] = dataset, make_partitions(dataset, cfg.num_clients, cfg.partition, cfg.seed)
    return _DATA[key]


def train_clients(
    cfg: Config,
    model_path: str,
    client_ids: Sequence[int],
    server_round: int,
    weights: Mapping[str, np.ndarray],
) -> Iterator[tuple[int, ClientUpdate | Exception]]:
    """Local updates of several clients, one after another, from the same global weights.

    The global weights are checked and written as a checkpoint once; every client restores that
    file through the ``restore`` signature, as each phone would restore the one it downloaded.
    Yields ``(client_id, update)``, or ``(client_id, error)`` for a client that failed: one
    client's crash never costs the others their update.
    """
    t0 = time.perf_counter()
    model = pooled_model(model_path, cfg.client.num_threads)
    staged = model.stage(weights)
    # The shared staging cost is spread over the clients of the message.
    share = (time.perf_counter() - t0) / max(1, len(client_ids))
    for client_id in client_ids:
        try:
            yield client_id, _train(cfg, model, staged, client_id, server_round, share)
        except Exception as err:  # noqa: BLE001 - handed to the caller with the client id
            yield client_id, err


def train_client(
    cfg: Config,
    model_path: str,
    client_id: int,
    server_round: int,
    weights: Mapping[str, np.ndarray],
) -> ClientUpdate:
    """One client's local update (``train_clients`` for one client); raises its error."""
    [(_, update)] = train_clients(cfg, model_path, [client_id], server_round, weights)
    if isinstance(update, Exception):
        raise update
    return update


def _train(
    cfg: Config,
    model: OnDeviceModel,
    staged: str,
    client_id: int,
    server_round: int,
    overhead: float,
) -> ClientUpdate:
    """E epochs of shuffled minibatches through ``train``, from the staged global weights.

    The pooled interpreter's optimizer state is reset first, so momentum or Adam moments never
    pass from one client to the next.
    """
    t0 = time.perf_counter()
    dataset, partitions = client_data(cfg)
    part = _partition(partitions, client_id)
    model.reset_optimizer()
    model.restore(staged, check=False)
    if injected_failure(cfg.seed, server_round, client_id, cfg.client.failure_rate):
        raise TrainingError(
            f"injected failure (client.failure_rate={cfg.client.failure_rate}): the device "
            "crashed while training"
        )
    fit = model.fit(
        dataset.x_train[part.train_indices],
        dataset.y_train[part.train_indices],
        epochs=cfg.client.local_epochs,
        batch_size=cfg.client.batch_size,
        seed=local_seed(cfg.seed, server_round, client_id),
    )
    new = model.get_weights()
    return ClientUpdate(
        weights=new,
        num_examples=len(part.train_indices),
        train_loss=fit["loss"],
        seconds=time.perf_counter() - t0 + overhead,
        train_seconds=fit["train_seconds"],
    )


def evaluate_clients(
    cfg: Config, model_path: str, client_ids: Sequence[int], weights: Mapping[str, np.ndarray]
) -> Iterator[tuple[int, ClientEvaluation | Exception]]:
    """Evaluate global weights on each client's local test split (``infer`` signature).

    ``infer`` leaves the weights as they are, so they are restored once for all the clients.
    Yields ``(client_id, evaluation)`` or ``(client_id, error)``.
    """
    dataset, partitions = client_data(cfg)
    model = pooled_model(model_path, cfg.client.num_threads)
    model.set_weights(weights)
    for client_id in client_ids:
        try:
            part = _partition(partitions, client_id)
            if not len(part.test_indices):
                raise InputError(
                    f"client {client_id} has no local test examples; raise "
                    "partition.local_test_fraction or set strategy.fraction_evaluate=0"
                )
            result = model.evaluate(
                dataset.x_train[part.test_indices],
                dataset.y_train[part.test_indices],
                batch_size=cfg.eval_batch_size,
            )
        except Exception as err:  # noqa: BLE001 - handed to the caller with the client id
            yield client_id, err
        else:
            n = len(part.test_indices)
            yield client_id, ClientEvaluation(n, result["loss"], result["accuracy"])


def _partition(partitions: list[Partition], client_id: int) -> Partition:
    if not 0 <= client_id < len(partitions):
        raise InputError(f"client id {client_id} is outside 0..{len(partitions) - 1}")
    return partitions[client_id]
