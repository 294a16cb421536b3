"""Model weights as ordered ``{name: ndarray}``, checked against a model's own weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fl_ondevice.errors import CheckpointError

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one weight tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class WeightSpec:
    """The ordered list of a model's weight tensors (sorted by name)."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> WeightSpec:
        """The spec of ``weights``, in sorted name order."""
        return cls(
            tuple(TensorSpec(n, tuple(weights[n].shape), weights[n].dtype) for n in sorted(weights))
        )

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def num_bytes(self) -> int:
        return sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in self.tensors)

    def validate(self, weights: Mapping[str, np.ndarray], source: str) -> None:
        """Raise ``CheckpointError`` unless ``weights`` has exactly these names, shapes and dtypes.

        ``source`` says where the weights came from (a file, a client) for the message.
        """
        expected = {t.name: t for t in self.tensors}
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{source} does not match the model's weights: missing tensors {missing}, "
                f"unexpected tensors {unexpected} (the model has {sorted(expected)}). "
                "Was it written by a different model?"
            )
        for name, spec in expected.items():
            arr = weights[name]
            if tuple(arr.shape) != spec.shape:
                raise CheckpointError(
                    f"{source}: tensor '{name}' has shape {tuple(arr.shape)}, the model expects "
                    f"{spec.shape}. Was it written by a model for another dataset or architecture?"
                )
            if arr.dtype != spec.dtype:
                raise CheckpointError(
                    f"{source}: tensor '{name}' has dtype {arr.dtype}, the model expects "
                    f"{spec.dtype}"
                )
