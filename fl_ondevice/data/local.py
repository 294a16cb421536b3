"""One client's share of the training set (:class:`Partition`) and its local train/test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_ondevice.errors import DataError


@dataclass(frozen=True, eq=False)
class Partition:
    """One client's share of the training set, as indices into ``Dataset.train_images``/``y_train``.

    Attributes
    ----------
    client_id : int
        0-based client number.
    train_indices : np.ndarray
        (n_train,) int64, sorted; the client trains on these.
    test_indices : np.ndarray
        (n_test,) int64, sorted, disjoint from ``train_indices``; the client's local test set
        (may be empty for tiny clients).
    """

    client_id: int
    train_indices: np.ndarray
    test_indices: np.ndarray

    @property
    def num_examples(self) -> int:
        """Number of examples the client holds, train and local test together."""
        return int(len(self.train_indices) + len(self.test_indices))


def local_split(
    indices: np.ndarray, fraction: float, seed: int, client_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into local train and local test parts, seeded per client.

    ``n_test = min(round(fraction * n), n - 1)``: a client always keeps at least one training
    example, and a client with one example (or a fraction that rounds to 0) has an empty local
    test set. The random source is seeded by ``(seed, client_id)``, independent of the other
    clients.

    Parameters
    ----------
    indices : np.ndarray
        (n,) the client's indices into the training set.
    fraction : float
        Share held out for the local test set, in [0, 1).
    seed : int
        Run seed.
    client_id : int
        Client number (makes the split differ between clients of one run).

    Returns
    -------
    tuple of np.ndarray
        ``(train_idx, test_idx)``, both sorted int64, disjoint, together equal to ``indices``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"local test fraction {fraction} is invalid: must be in [0, 1)")
    n_test = min(int(np.floor(fraction * n + 0.5)), max(n - 1, 0))
    shuffled = np.random.default_rng([seed, client_id]).permutation(indices)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])
