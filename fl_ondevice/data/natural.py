"""Natural partitions: one client per writer or per value of a data set's own client column."""

from __future__ import annotations

import logging

import numpy as np

from fl_ondevice.data.dataset import Dataset
from fl_ondevice.data.local import Partition, local_split
from fl_ondevice.errors import DataError

log = logging.getLogger(__name__)


def natural_partitions(
    dataset: Dataset, num_clients: int, local_test_fraction: float, seed: int
) -> list[Partition]:
    """One :class:`Partition` per natural client of ``dataset`` (``dataset.train_clients``).

    With as many clients as the data has, client i is the data's client i; with fewer, a sample
    of ``num_clients`` of them drawn from the seed, in their order. A client's local test set is
    its own test rows when the data has them (``dataset.local_test``, LEAF's per-user split),
    otherwise the ``local_test_fraction`` of its rows split off as for any partition.

    Parameters
    ----------
    dataset : Dataset
        A dataset with ``train_clients``.
    num_clients : int
        Clients to make, at most the data's number of natural clients.
    local_test_fraction : float
        Local test share for data without its own per-client test rows.
    seed : int
        Run seed: the sample of clients and the local splits.

    Returns
    -------
    list of Partition
        ``client_id`` 0..num_clients-1, in the data's client order.

    Raises
    ------
    DataError
        More clients asked for than the data has, or a chosen client has no training row.
    """
    assert dataset.train_clients is not None
    clients = dataset.train_clients
    available = int(clients.max()) + 1 if len(clients) else 0
    if num_clients > available:
        raise DataError(
            f"num_clients={num_clients}: {dataset.name} has {available} natural clients (one per "
            f"writer or client id); use num_clients <= {available}, or partition._target_=... "
            "to partition it another way"
        )
    chosen = np.arange(available)
    if num_clients < available:
        chosen = np.sort(np.random.default_rng(seed).choice(available, num_clients, replace=False))
        log.info(
            "natural partition: %d of %d clients, drawn from seed %d", num_clients, available, seed
        )
    local = dataset.local_test
    order = np.argsort(clients, kind="stable")  # rows grouped by client, in row order
    starts = np.searchsorted(clients[order], np.arange(available + 1))
    partitions = []
    for client_id, natural in enumerate(chosen):
        rows = order[starts[natural] : starts[natural + 1]]
        if local is not None:
            train, test = rows[~local[rows]], rows[local[rows]]
        else:
            train, test = local_split(rows, local_test_fraction, seed, client_id)
        if len(train) == 0:
            raise DataError(
                f"{dataset.name}: natural client {natural} has no training example; drop it "
                "from the data or use partition._target_=... to partition it another way"
            )
        partitions.append(Partition(client_id, np.sort(train), np.sort(test)))
    return partitions
