"""Flower Datasets partitioners, named by ``partition._target_``, as indices into our training set.

Any ``flwr_datasets.partitioner`` class (or one with its interface: ``dataset``,
``num_partitions``, ``load_partition(i)``) splits an in-memory ``datasets.Dataset`` built from the
training set's columns: ``label``, ``client`` when the data has natural clients, and a row
``index`` that maps each partition back to our rows, so no image is copied. Arguments come from
the ``partition`` keys of the same name (``partition.args`` for the others); ``num_partitions``
is ``num_clients`` and ``seed`` the run's seed. A partitioner without a ``seed`` (``Iid``,
``Linear``, ``NaturalId`` ...) splits rows in the order given, so it is given them in an order
drawn from the run's seed. ``flwr_datasets`` is imported only here, when such a partitioner is
used: clients of our own partitioners never load ``datasets`` or ``pyarrow``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from fl_ondevice.config import PartitionConfig
from fl_ondevice.errors import DataError

log = logging.getLogger(__name__)

INDEX_COLUMN = "index"  # the row of our training set each partitioner row came from
# Arguments the run sets itself rather than the partition keys.
_RUN_ARGUMENTS = ("num_partitions", "seed")
# PartitionConfig fields that are ours only, never a Flower partitioner's argument.
_OURS = ("name", "_target_", "max_retries", "shards_per_client", "labels_per_client")


def flower_partition_indices(
    columns: Mapping[str, np.ndarray], num_clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Split the rows of a training set with the Flower Datasets partitioner ``cfg._target_``.

    Parameters
    ----------
    columns : mapping of str to np.ndarray
        The training set's columns a partitioner may use, each (N,): ``label``, and ``client``
        for data with natural clients.
    num_clients : int
        Number of clients; a partitioner whose count follows from the data (``NaturalId``)
        must give exactly this many.
    cfg : PartitionConfig
        ``_target_`` and the partitioner's arguments.
    seed : int
        Run seed: the partitioner's ``seed``, or the row order of one that has none.

    Returns
    -------
    list of np.ndarray
        One sorted int64 array of row indices per client.

    Raises
    ------
    DataError
        The class cannot be loaded, an argument is missing or unknown, ``partition_by`` names a
        column the data lacks, the partitioner fails, or a client would get no example.
    """
    target = str(cfg._target_)
    cls = _load_class(target)
    params = inspect.signature(cls).parameters
    kwargs = _arguments(target, params, cfg, num_clients, seed)
    if "partition_by" in kwargs and kwargs["partition_by"] not in columns:
        raise DataError(
            f"partition.partition_by={kwargs['partition_by']!r}: {target} partitions by a column "
            f"this data lacks; its columns are {sorted(columns)} (client only for data with "
            "natural clients, e.g. dataset=femnist or a files dataset with a client array)"
        )
    n = len(next(iter(columns.values())))
    # Without a seed of its own the partitioner cuts rows in order: give them a seeded order.
    order = np.arange(n) if "seed" in params else np.random.default_rng(seed).permutation(n)
    parts = _run(cls, target, kwargs, columns, order)
    if len(parts) != num_clients:
        raise DataError(
            f"partition._target_={target} made {len(parts)} partitions of this data but "
            f"num_clients={num_clients}; set num_clients={len(parts)}"
        )
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"partition._target_={target} left clients {empty[:10]} without examples; change its "
            "arguments (e.g. partition.min_partition_size, partition.alpha) or use fewer clients"
        )
    return [np.sort(p) for p in parts]


def _load_class(target: str) -> Any:
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise DataError(
            f"partition._target_={target!r} cannot be loaded ({err}); name a class such as "
            "flwr_datasets.partitioner.DirichletPartitioner (pip install flwr-datasets)"
        ) from None
    if not inspect.isclass(cls):
        raise DataError(f"partition._target_={target!r} is not a class")
    return cls


def _arguments(
    target: str,
    params: Mapping[str, inspect.Parameter],
    cfg: PartitionConfig,
    num_clients: int,
    seed: int,
) -> dict[str, Any]:
    """The constructor's keyword arguments: run values, then configured keys of the same name."""
    unknown = sorted(set(cfg.args) - set(params))
    if unknown:
        raise DataError(
            f"partition.args {unknown} are not arguments of {target}; it takes "
            f"{sorted(set(params) - set(_RUN_ARGUMENTS))}"
        )
    given = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in _OURS and f.name != "args" and getattr(cfg, f.name) is not None
    }
    given.update(cfg.args)
    kwargs: dict[str, Any] = {"num_partitions": num_clients, "seed": seed}
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    kwargs.update({k: v for k, v in given.items() if k in params and k not in _RUN_ARGUMENTS})
    missing = [
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and name not in kwargs
    ]
    if missing:
        raise DataError(
            f"partition._target_={target} needs {missing}: set them as partition.<name>=VALUE "
            "(or +partition.args.<name>=VALUE for a key the partition config lacks)"
        )
    return kwargs


def _run(
    cls: Any,
    target: str,
    kwargs: dict[str, Any],
    columns: Mapping[str, np.ndarray],
    order: np.ndarray,
) -> list[np.ndarray]:
    from datasets import Dataset as HFDataset  # flwr-datasets' dependency; loaded only here

    table = {INDEX_COLUMN: order.astype(np.int64)}
    table.update({name: np.asarray(values)[order] for name, values in columns.items()})
    try:
        partitioner = cls(**kwargs)
        partitioner.dataset = HFDataset.from_dict(table)
        num = int(partitioner.num_partitions)
        return [
            np.asarray(partitioner.load_partition(i)[INDEX_COLUMN], np.int64) for i in range(num)
        ]
    except (ValueError, TypeError, KeyError, IndexError) as err:
        message = " ".join(str(err).split())
        raise DataError(
            f"partition._target_={target} with {kwargs} failed: {message}; change its arguments "
            "(partition.<name>=VALUE) or num_clients"
        ) from None
