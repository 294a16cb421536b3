"""Split one training set among clients: iid, dirichlet, shards, label_quantity, or Flower's.

Every partitioner returns, per client, an int64 array of indices into the one shared training set:
no client holds a copy of the images. ``partition._target_`` selects any Flower Datasets
partitioner instead (``fl_ondevice.data.flower``). Ours stay for what they add: they are numpy
only (no ``datasets``/``pyarrow`` in the client processes), ``iid`` shuffles (Flower's
``IidPartitioner`` cuts rows in order), ``dirichlet`` retries ``partition.max_retries`` times
(Flower's gives up after 10), ``shards`` picks random shards of one label-sorted order as in
arXiv:1602.05629, ``label_quantity`` is NIID-Bench's #C=k draw (client i always holds label i mod C,
which Flower's ``PathologicalPartitioner`` does not guarantee); each has a documented
random-number order, tested property by property.
"""

from __future__ import annotations

import logging

import numpy as np

from fl_ondevice.config import PartitionConfig
from fl_ondevice.data.dataset import Dataset
from fl_ondevice.data.flower import flower_partition_indices
from fl_ondevice.data.local import Partition, local_split
from fl_ondevice.data.natural import natural_partitions
from fl_ondevice.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "Partition",
    "dirichlet_partition",
    "iid_partition",
    "label_quantity_partition",
    "local_split",
    "make_partitions",
    "partition_indices",
    "shards_partition",
]


# ---------------------------------------------------------------------------------------------
# Partitioners: labels (N,) -> list of per-client index arrays
# ---------------------------------------------------------------------------------------------


def partition_indices(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int, num_classes: int
) -> list[np.ndarray]:
    """Split the indices ``0..N-1`` of a training set among ``num_clients`` clients.

    Parameters
    ----------
    labels : np.ndarray
        (N,) integer labels of the training set, values in ``[0, num_classes)``.
    num_clients : int
        Number of clients, >= 1.
    cfg : PartitionConfig
        ``cfg.name`` selects ``iid``, ``dirichlet``, ``shards`` or ``label_quantity``; the
        partitioner's own fields are read from it.
    seed : int
        Seed; equal seeds give equal partitions.
    num_classes : int
        Number of classes C.

    Returns
    -------
    list of np.ndarray
        One sorted int64 index array per client; the arrays are pairwise disjoint and non-empty.

    Raises
    ------
    DataError
        The request is impossible (more clients than examples, k > C, shards that do not fit,
        Dirichlet draws that keep leaving a client too small); the message states the limit.
    """
    labels = _check_labels(labels, num_classes)
    n = len(labels)
    if num_clients < 1:
        raise DataError(f"num_clients={num_clients} is invalid: need at least 1 client")
    if num_clients > n:
        raise DataError(
            f"cannot give {num_clients} clients at least one example each: the training set has "
            f"{n} examples; use num_clients <= {n}"
        )
    rng = np.random.default_rng(seed)
    if cfg.name == "iid":
        parts = iid_partition(n, num_clients, rng)
    elif cfg.name == "dirichlet":
        parts = dirichlet_partition(
            labels,
            num_clients,
            num_classes,
            cfg.alpha,
            cfg.min_partition_size,
            cfg.max_retries,
            rng,
        )
    elif cfg.name == "shards":
        parts = shards_partition(labels, num_clients, cfg.shards_per_client, cfg.shard_size, rng)
    elif cfg.name == "label_quantity":
        parts = label_quantity_partition(
            labels, num_clients, num_classes, cfg.labels_per_client, rng
        )
    else:
        raise DataError(f"unknown partitioner {cfg.name!r}")
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")
    return labels


def iid_partition(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``0..n-1`` and cut it into ``num_clients`` near-equal parts (sizes differ by <= 1).

    Parameters
    ----------
    n : int
        Number of examples.
    num_clients : int
        Number of clients, <= n.
    rng : np.random.Generator
        Source of the one permutation drawn.

    Returns
    -------
    list of np.ndarray
        Index arrays covering ``0..n-1`` exactly once.
    """
    return list(np.array_split(rng.permutation(n), num_clients))


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    alpha: float,
    min_partition_size: int,
    max_retries: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients in proportions drawn from Dir(alpha).

    For every class c (in order 0..C-1) the class' indices are shuffled, proportions
    ``p ~ Dir(alpha * 1_K)`` over the K clients are drawn, and the shuffled indices are cut at
    ``floor(cumsum(p) * n_c)``. The whole draw is repeated until every client holds at least
    ``max(min_partition_size, 1)`` examples (an empty client is never useful), at most
    ``max_retries`` times. This is the plain construction of Hsu et al. 2019 (arXiv:1909.06335),
    without NIID-Bench's re-balancing step. Every example is assigned: the parts cover the set.

    Parameters
    ----------
    labels : np.ndarray
        (N,) int labels.
    num_clients : int
        Number of clients K.
    num_classes : int
        Number of classes C.
    alpha : float
        Concentration; large (1e3) is near IID, small (0.1) gives each client few labels.
    min_partition_size : int
        Minimum examples per client (values below 1 are treated as 1).
    max_retries : int
        Number of complete draws tried before giving up.
    rng : np.random.Generator
        Random source.

    Returns
    -------
    list of np.ndarray
        K index arrays covering ``0..N-1`` exactly once.

    Raises
    ------
    DataError
        ``K * min_partition_size > N`` (stated limit), or no draw satisfied the minimum.
    """
    n = len(labels)
    min_size = max(int(min_partition_size), 1)
    if num_clients * min_size > n:
        raise DataError(
            f"dirichlet: {num_clients} clients x partition.min_partition_size={min_size} needs "
            f"{num_clients * min_size} examples but the training set has {n}; use at most "
            f"{n // min_size} clients or lower partition.min_partition_size"
        )
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    smallest = 0
    for attempt in range(1, max_retries + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        smallest = min(len(p) for p in merged)
        if smallest >= min_size:
            if attempt > 1:
                log.info(
                    "dirichlet(alpha=%s): draw %d gave every client >= %d examples",
                    alpha,
                    attempt,
                    min_size,
                )
            return merged
    raise DataError(
        f"dirichlet: after partition.max_retries={max_retries} draws of Dir(alpha={alpha}) over "
        f"{num_clients} clients, some client still held fewer than {min_size} examples (smallest: "
        f"{smallest}); raise partition.alpha, lower partition.min_partition_size, raise "
        "partition.max_retries, or use fewer clients"
    )


def shards_partition(
    labels: np.ndarray,
    num_clients: int,
    shards_per_client: int,
    shard_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Pathological non-IID of McMahan et al. 2017 (arXiv:1602.05629, Sec. 3): label-sorted shards.

    The indices are sorted by label (stable, so ties keep index order) and cut into
    ``S = N // shard_size`` consecutive shards of ``shard_size``. One permutation of the S shard
    numbers is drawn; client i receives shards ``perm[i*s : (i+1)*s]`` with
    ``s = shards_per_client``. The paper's MNIST setting, 100 clients x 2 shards x 300 = 60,000,
    uses every example. When ``num_clients * s * shard_size < N`` the shards no client draws, and
    the last ``N % shard_size`` examples of the sorted order, stay unused (random shards rather
    than the first ones, so every label can still appear); the parts then do not cover the set.

    Parameters
    ----------
    labels : np.ndarray
        (N,) int labels.
    num_clients : int
        Number of clients.
    shards_per_client : int
        Shards per client (2 in the paper).
    shard_size : int
        Examples per shard (300 in the paper).
    rng : np.random.Generator
        Random source (one permutation).

    Returns
    -------
    list of np.ndarray
        One index array of ``shards_per_client * shard_size`` examples per client.

    Raises
    ------
    DataError
        ``num_clients * shards_per_client * shard_size > N``; the message states the limit.
    """
    n = len(labels)
    needed = num_clients * shards_per_client
    available = n // shard_size
    if needed > available:
        raise DataError(
            f"shards: {num_clients} clients x partition.shards_per_client={shards_per_client} x "
            f"partition.shard_size={shard_size} = {needed * shard_size} examples, but the "
            f"training set has {n} ({available} shards of {shard_size}); need num_clients * "
            f"shards_per_client * shard_size <= {n}, e.g. partition.shard_size="
            f"{max(n // needed, 1)} or num_clients={available // shards_per_client}"
        )
    order = np.argsort(labels, kind="stable")  # (N,) indices, grouped by label
    shards = order[: available * shard_size].reshape(available, shard_size)  # (S, shard_size)
    chosen = rng.permutation(available)[:needed].reshape(num_clients, shards_per_client)
    return [shards[row].reshape(-1) for row in chosen]


def label_quantity_partition(
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    labels_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Quantity-based label skew #C=k of NIID-Bench (Li et al., ICDE 2022, arXiv:2102.02079).

    Client i first gets label ``i % C``; then, in client order, ``k - 1`` further distinct labels,
    drawn uniformly among the labels no client holds yet while there are such labels, otherwise
    uniformly among the labels it does not hold. With ``num_clients >= C`` no label is uncovered
    after the first step, so this is exactly NIID-Bench's draw; with fewer clients the preference
    for uncovered labels guarantees that every label is held when ``num_clients * k >= C``. When
    ``num_clients * k < C`` only ``num_clients * k`` labels can be held: the examples of the other
    labels stay unused (a warning is logged). Each label's examples are shuffled and split into
    near-equal parts among the clients holding it (``np.array_split``), so whenever every label is
    held the parts cover the set.

    Parameters
    ----------
    labels : np.ndarray
        (N,) int labels.
    num_clients : int
        Number of clients.
    num_classes : int
        Number of classes C.
    labels_per_client : int
        k, labels per client, 1 <= k <= C.
    rng : np.random.Generator
        Random source.

    Returns
    -------
    list of np.ndarray
        One index array per client, holding examples of exactly k labels.

    Raises
    ------
    DataError
        k > C, or a label has fewer examples than clients holding it.
    """
    k = labels_per_client
    if k > num_classes:
        raise DataError(
            f"label_quantity: partition.labels_per_client={k} but the dataset has only "
            f"{num_classes} labels; use labels_per_client <= {num_classes}"
        )
    held = [[i % num_classes] for i in range(num_clients)]
    covered = {i % num_classes for i in range(num_clients)}
    for client_labels in held:
        for _ in range(k - 1):
            uncovered = sorted(set(range(num_classes)) - covered - set(client_labels))
            pool = uncovered or sorted(set(range(num_classes)) - set(client_labels))
            choice = int(pool[rng.integers(len(pool))])
            client_labels.append(choice)
            covered.add(choice)
    if len(covered) < num_classes:
        log.warning(
            "label_quantity: %d clients x %d labels cannot hold all %d labels; the examples of "
            "labels %s are unused",
            num_clients,
            k,
            num_classes,
            sorted(set(range(num_classes)) - covered),
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        holders = [i for i, client_labels in enumerate(held) if c in client_labels]
        if not holders:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(holders):
            raise DataError(
                f"label_quantity: label {c} has {len(idx)} training examples but {len(holders)} "
                f"clients hold it, so some would get none of it; use fewer clients or a larger "
                "partition.labels_per_client"
            )
        for client, chunk in zip(holders, np.array_split(idx, len(holders)), strict=True):
            parts[client].append(chunk)
    return [np.concatenate(p) for p in parts]


# ---------------------------------------------------------------------------------------------
# Per-client local split and the combined entry point
# ---------------------------------------------------------------------------------------------


def make_partitions(
    dataset: Dataset, num_clients: int, cfg: PartitionConfig, seed: int
) -> list[Partition]:
    """Partition ``dataset``'s training set among clients and split each share locally.

    Parameters
    ----------
    dataset : Dataset
        The shared dataset; only ``y_train`` is read, no image is copied.
    num_clients : int
        Number of clients.
    cfg : PartitionConfig
        Partitioner choice (ours by ``name``, Flower's by ``_target_``) and parameters;
        ``cfg.local_test_fraction`` is the local test share.
    seed : int
        Run seed.

    Returns
    -------
    list of Partition
        One per client, ``client_id`` 0..num_clients-1.

    Data with natural clients (``dataset.train_clients``) is split by them unless
    ``cfg._target_`` names a partitioner (``fl_ondevice.data.natural``); Flower's partitioners
    then see them as the ``client`` column.

    Raises
    ------
    DataError
        The partition request is impossible (see ``partition_indices``).
    """
    if dataset.train_clients is not None and cfg._target_ is None:
        log.info("%s: one client per natural client (partition.name ignored)", dataset.name)
        return natural_partitions(dataset, num_clients, cfg.local_test_fraction, seed)
    # Natural clients' own test rows (LEAF's per-user test split) are never partitioned.
    rows = np.arange(len(dataset.y_train))
    if dataset.local_test is not None:
        rows = np.flatnonzero(~dataset.local_test)
    labels = dataset.y_train[rows]
    if cfg._target_ is not None:
        columns = {"label": labels}
        if dataset.train_clients is not None:
            columns["client"] = dataset.train_clients[rows]
        parts = flower_partition_indices(columns, num_clients, cfg, seed)
    else:
        parts = partition_indices(labels, num_clients, cfg, seed, dataset.num_classes)
    partitions = []
    for client_id, indices in enumerate(parts):
        train_idx, test_idx = local_split(rows[indices], cfg.local_test_fraction, seed, client_id)
        partitions.append(Partition(client_id, train_idx, test_idx))
    return partitions
