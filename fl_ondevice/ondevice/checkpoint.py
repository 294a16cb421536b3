"""TF (V1) checkpoint files <-> ordered {name: ndarray}: the server's global_model.ckpt, resume
state, and the weights of models whose save/restore signatures take a checkpoint path.

The one module outside model building that needs TensorFlow (its checkpoint reader and Save op).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf

from fl_ondevice.errors import CheckpointError
from fl_ondevice.ondevice.weights import Weights


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
