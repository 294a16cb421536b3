"""What a file's signatures take and return: read once from the file, checked, named for use.

:class:`OnDeviceModel` calls a model of any layout (:mod:`fl_ondevice.ondevice.layouts`) the same
way; :func:`read_signatures` finds, in the file's own signatures, the input and output names,
shapes and label encoding that make that possible, or raises a ``ModelError`` naming what a
signature lacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fl_ondevice.errors import ModelError
from fl_ondevice.ondevice.layouts import (
    ANDROID,
    CHECKPOINT_IO,
    INFER,
    LOAD,
    PARAMETERS,
    PERSONALIZATION,
    RESTORE,
    SAVE,
    TENSOR_IO,
    TRAIN,
    TRAIN_PROXIMAL,
    Layout,
)

Details = dict[str, Any]  # a signature runner's input or output details, by tensor name


@dataclass(frozen=True)
class Signatures:
    """The names and shapes :class:`OnDeviceModel` passes to one file's signatures.

    Attributes
    ----------
    x_name_infer : str
        ``infer``'s input (the images).
    x_shape : tuple of int
        One example's image shape, as ``infer`` takes it.
    prob_name : str
        ``infer``'s class probabilities: ``output``, or ``logits`` alone (Flower's Android
        example names its softmax output so).
    has_logits : bool
        ``infer`` returns both ``output`` and ``logits`` (then the pre-softmax scores).
    num_classes : int
        Classes of ``infer``'s output.
    train_x_shape : tuple of int
        One example of ``train``'s x: ``x_shape``, or ``load``'s bottleneck (personalization).
    x_name, y_name : str
        ``train``'s inputs (examples, labels).
    y_dtype : numpy dtype
        ``train``'s label type: integers, or floats for one-hot labels.
    proximal : bool
        The file has ``train_proximal(x, y, mu)`` (FedProx).
    getter : str
        The signature that returns the weights: ``save``, or ``parameters`` (android).
    weight_io : str
        ``tensors`` or ``checkpoint``: how ``save`` and ``restore`` carry the weights.
    x_name_load, bottleneck_name : str
        Personalization layout: ``load``'s input and output ("" in the other layouts).
    path_names : dict of str to str
        Checkpoint weight io: ``save``'s and ``restore``'s checkpoint-path input (else empty).
    """

    x_name_infer: str
    x_shape: tuple[int, ...]
    prob_name: str
    has_logits: bool
    num_classes: int
    train_x_shape: tuple[int, ...]
    x_name: str
    y_name: str
    y_dtype: Any
    proximal: bool
    getter: str
    weight_io: str
    x_name_load: str = ""
    bottleneck_name: str = ""
    path_names: Mapping[str, str] = field(default_factory=dict)

    @property
    def one_hot(self) -> bool:
        """``train`` takes one-hot float labels (personalization, android), not integers."""
        return bool(np.issubdtype(self.y_dtype, np.floating))


def read_signatures(
    layout: Layout, signatures: Mapping[str, Any], runners: Mapping[str, Any], source: str
) -> Signatures:
    """The :class:`Signatures` of a file of ``layout``, from its signature list and runners.

    Raises ``ModelError`` naming ``source`` and what a signature takes or returns that
    :class:`OnDeviceModel` cannot use.
    """
    file = _File(signatures, runners, source)
    infer = _infer(file)
    load = _load(file, layout, infer["x_shape"])
    train_x_shape = load.pop("train_x_shape", infer["x_shape"])
    train = _train(file, layout, train_x_shape)
    weights = _weight_io(file, layout)
    return Signatures(**infer, train_x_shape=train_x_shape, **train, **weights, **load)


@dataclass(frozen=True)
class _File:
    signatures: Mapping[str, Any]
    runners: Mapping[str, Any]
    source: str

    def inputs(self, signature: str) -> Details:
        return dict(self.runners[signature].get_input_details())

    def outputs(self, signature: str) -> Details:
        return dict(self.runners[signature].get_output_details())


def _infer(file: _File) -> dict[str, Any]:
    infer_in = file.inputs(INFER)
    if len(infer_in) != 1:
        raise ModelError(f"{file.source}: infer must take one input, it takes {list(infer_in)}")
    ((x_name_infer, x_spec),) = infer_in.items()
    outputs = file.signatures[INFER]["outputs"]
    # The class probabilities: `output`, or `logits` alone (Flower's Android example names
    # its softmax output so); with both, `logits` are the pre-softmax scores.
    prob_name = "output" if "output" in outputs else "logits"
    if prob_name not in outputs:
        raise ModelError(
            f"{file.source}: infer must return 'output' (class probabilities) or, as "
            f"Flower's Android example, 'logits'; it returns {outputs}"
        )
    probe = file.outputs(INFER)[prob_name]["shape_signature"]
    return {
        "x_name_infer": x_name_infer,
        "x_shape": tuple(int(d) for d in x_spec["shape_signature"][1:]),
        "prob_name": prob_name,
        "has_logits": "output" in outputs and "logits" in outputs,
        "num_classes": int(probe[-1]),
    }


def _load(file: _File, layout: Layout, x_shape: tuple[int, ...]) -> dict[str, Any]:
    # train's x: images, or (personalization) the bottleneck `load` makes of them.
    if layout is not PERSONALIZATION:
        return {}
    ins, outs = file.inputs(LOAD), file.signatures[LOAD]["outputs"]
    shapes = {n: list(s["shape_signature"]) for n, s in ins.items()}
    if len(ins) != 1 or tuple(next(iter(shapes.values()))[1:]) != x_shape:
        raise ModelError(
            f"{file.source}: load must take one input shaped like infer's {x_shape} "
            f"(the images); it takes {shapes}"
        )
    bottleneck_name = "bottleneck" if "bottleneck" in outs else outs[0]
    if "bottleneck" not in outs and len(outs) != 1:
        raise ModelError(f"{file.source}: load must return 'bottleneck'; it returns {outs}")
    details = file.outputs(LOAD)[bottleneck_name]
    return {
        "x_name_load": next(iter(ins)),
        "bottleneck_name": bottleneck_name,
        "train_x_shape": tuple(int(d) for d in details["shape_signature"][1:]),
    }


def _train(file: _File, layout: Layout, train_x_shape: tuple[int, ...]) -> dict[str, Any]:
    train_in = file.inputs(TRAIN)
    if len(train_in) != 2 or "loss" not in file.signatures[TRAIN]["outputs"]:
        raise ModelError(
            f"{file.source}: train must take (x, y) and return 'loss'; it takes "
            f"{list(train_in)} and returns {file.signatures[TRAIN]['outputs']}"
        )
    # x is the train input shaped like infer's input (or load's bottleneck); y the other.
    names = sorted(train_in, key=lambda n: (n not in ("x", "bottleneck"), n))
    x_like = [n for n in names if tuple(train_in[n]["shape_signature"][1:]) == train_x_shape]
    if not x_like:
        what = "load's bottleneck" if layout is PERSONALIZATION else "infer's input"
        raise ModelError(
            f"{file.source}: no train input has {what} shape {train_x_shape}: "
            f"{ {n: list(s['shape_signature']) for n, s in train_in.items()} }"
        )
    x_name = x_like[0]
    y_name = next(n for n in train_in if n != x_name)
    proximal = TRAIN_PROXIMAL in file.signatures
    if proximal:
        ins = file.inputs(TRAIN_PROXIMAL)
        if set(ins) != {x_name, y_name, "mu"}:
            raise ModelError(
                f"{file.source}: {TRAIN_PROXIMAL} must take train's inputs "
                f"({x_name}, {y_name}) and a scalar 'mu'; it takes {sorted(ins)}"
            )
    return {
        "x_name": x_name,
        "y_name": y_name,
        "y_dtype": train_in[y_name]["dtype"],
        "proximal": proximal,
    }


def _weight_io(file: _File, layout: Layout) -> dict[str, Any]:
    # Weights out: `save` (`parameters` in the android layout); in: `restore`. Either both
    # take a checkpoint path, or the getter takes nothing and returns the tensors `restore`
    # takes.
    getter = PARAMETERS if layout is ANDROID else SAVE
    getter_in, restore_in = file.inputs(getter), file.inputs(RESTORE)
    if not getter_in:
        _check_restore_takes(file, getter, file.outputs(getter), restore_in)
        return {"getter": getter, "weight_io": TENSOR_IO}
    if layout is not ANDROID and all(
        len(ins) == 1 and next(iter(ins.values()))["dtype"] is np.bytes_
        for ins in (getter_in, restore_in)
    ):
        path_names = {SAVE: next(iter(getter_in)), RESTORE: next(iter(restore_in))}
        return {"getter": getter, "weight_io": CHECKPOINT_IO, "path_names": path_names}
    raise ModelError(
        f"{file.source}: {getter} must take no input and return the weights (then "
        "restore takes those tensors)"
        + (
            ""
            if layout is ANDROID
            else ", or save and restore each take one string input (checkpoint_path)"
        )
        + f"; {getter} takes {sorted(getter_in)} and restore takes {sorted(restore_in)}"
    )


def _check_restore_takes(file: _File, getter: str, out: Details, ins: Details) -> None:
    # restore(w0, ..., wN) must take exactly what the getter returns, shape for shape.
    if set(out) != set(ins):
        raise ModelError(
            f"{file.source}: restore must take the tensors {getter}() returns; "
            f"{getter} returns {sorted(out)}, restore takes {sorted(ins)}"
        )
    for name, spec in ins.items():
        if list(spec["shape_signature"]) != list(out[name]["shape_signature"]):
            raise ModelError(
                f"{file.source}: restore's input {name} has shape "
                f"{list(spec['shape_signature'])}, {getter} returns "
                f"{list(out[name]['shape_signature'])}"
            )
