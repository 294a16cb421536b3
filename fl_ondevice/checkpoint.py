"""TF (V1) checkpoint files <-> ordered {name: ndarray}, validated against a model's own weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

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
    """The ordered list of a model's weight tensors (sorted by name: checkpoint order)."""

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


def read_checkpoint(path: str | os.PathLike[str]) -> Weights:
    """Read every tensor of a TF checkpoint file, in sorted name order.

    Raises
    ------
    CheckpointError
        If the file is missing, truncated, corrupt or not a TF checkpoint.
    """
    path = os.fspath(path)
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    try:
        reader = tf.train.load_checkpoint(path)
        names = sorted(reader.get_variable_to_shape_map())
        weights = {n: np.asarray(reader.get_tensor(n)) for n in names}
    except (tf.errors.OpError, ValueError, RuntimeError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path!r} cannot be read as a TF checkpoint ({cause}); the file is corrupt, "
            "truncated or of another format (V2 checkpoints from tf.train.Checkpoint are not "
            "accepted: write V1 files with the model's save signature or write_checkpoint)"
        ) from None
    if not weights:
        raise CheckpointError(f"checkpoint file {path!r} holds no tensors")
    return weights


def write_checkpoint(path: str | os.PathLike[str], weights: Mapping[str, np.ndarray]) -> None:
    """Write ``weights`` as a V1 TF checkpoint that a model's ``restore`` signature accepts.

    The file is written next to ``path`` and renamed into place, so a reader never sees half a
    file.
    """
    path = os.fspath(path)
    names = sorted(weights)
    tmp = f"{path}.tmp-{os.getpid()}"
    tf.raw_ops.Save(
        filename=tmp, tensor_names=names, data=[np.ascontiguousarray(weights[n]) for n in names]
    )
    os.replace(tmp, path)
