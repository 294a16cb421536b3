"""Compressed client updates: what a client uploads instead of float32 weights, and back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fl_ondevice.config import ENCODINGS, FLOAT16, FLOAT32, INT8

if TYPE_CHECKING:  # checkpoint imports TensorFlow; this module needs only NumPy at run time
    from fl_ondevice.ondevice.weights import WeightSpec

# An int8 tensor's scale travels as its own array under this name: a TF variable name never
# holds "|" (TF names are [A-Za-z0-9.][A-Za-z0-9_.\-/>]*), so it cannot collide with a tensor.
SCALE_SUFFIX = "|scale"
INT8_LEVELS = 127  # q in [-127, 127]: symmetric, so -d encodes as -q


def scale_name(name: str) -> str:
    """The name of int8 tensor ``name``'s scale array."""
    return f"{name}{SCALE_SUFFIX}"


def encode_update(
    weights: Mapping[str, np.ndarray],
    global_weights: Mapping[str, np.ndarray],
    encoding: str,
    seed: int | Sequence[int] = 0,
) -> dict[str, np.ndarray]:
    """The arrays a client uploads for its trained ``weights`` w, given the global weights g
    it received.

    - ``float32``: w itself, unchanged (the same array objects).
    - ``float16``: the delta d = w - g as float16, under each tensor's name. Rounding to
      nearest: |error| <= |d| * 2**-11 where d is a normal float16 number, plus 2**-24
      absolute (the float16 subnormal spacing) for |d| < 2**-14; |d| > 65504 overflows to Inf,
      which the server rejects as non-finite.
    - ``int8``: per tensor, the scale s = max|d| / 127 (float32, shape ``()``, under
      ``"<name>|scale"``) and q = floor(d / s + u), u ~ U[0, 1) drawn from
      ``np.random.default_rng(seed)``, clipped to [-127, 127], as int8 under the tensor's name.
      Stochastic rounding is unbiased (E[q * s] = d) with |q * s - d| < s per element; s = 0
      (no change) sends all zeros. A non-finite delta gives a non-finite s, which decodes to
      NaN: the server rejects it, as it rejects a non-finite float32 update.

    Deltas, not weights, are quantised: a weight's own magnitude would set the step and swamp
    the much smaller change one round makes.

    Parameters
    ----------
    weights, global_weights
        w and g: the same tensor names and shapes.
    encoding
        One of :data:`ENCODINGS`.
    seed
        int8's rounding draws (any ``np.random.default_rng`` seed); tensors draw in sorted name
        order, so a seed gives the same bytes.

    Raises
    ------
    ValueError
        For an unknown ``encoding``, or ``weights`` whose names or shapes are not g's.
    """
    _check_encoding(encoding)
    if encoding == FLOAT32:
        return dict(weights)
    _check_same_tensors(weights, global_weights)
    names = sorted(weights)
    deltas = {n: np.asarray(weights[n]) - global_weights[n] for n in names}
    if encoding == FLOAT16:
        return {n: deltas[n].astype(np.float16) for n in names}
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in names:
        out[name], out[scale_name(name)] = _int8(deltas[name], rng)
    return out


def _int8(delta: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # (q, s) of one tensor's delta; the draws are made whatever s is, so that one tensor's
    # values never shift the random stream of the tensors after it.
    u = rng.random(delta.shape)
    peak = float(np.abs(delta).max()) if delta.size else 0.0
    scale = np.asarray(peak / INT8_LEVELS, np.float32)
    if not np.isfinite(scale) or scale == 0.0:
        return np.zeros(delta.shape, np.int8), scale
    q = np.floor(delta / scale.astype(np.float64) + u)
    return np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scale


def decode_update(
    arrays: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray], encoding: str
) -> dict[str, np.ndarray] | str:
    """The full weights g + d of an update :func:`encode_update` made, in g's dtypes; or, for
    arrays that do not fit ``encoding``, what is wrong with them (the server rejects the update
    with it).

    ``float32`` arrays are returned as they are: the server checks them as any update. The
    decoded values are not checked for NaN/Inf here either: the server's check of every update
    does that. Error bounds: see :func:`encode_update`; adding d to g in float32 rounds once
    more, by at most half a float32 step of the weight.
    """
    _check_encoding(encoding)
    if encoding == FLOAT32:
        return dict(arrays)
    wrong = _wrong_names(arrays, global_weights, encoding)
    if wrong:
        return wrong
    decoded: dict[str, np.ndarray] = {}
    wire = np.float16 if encoding == FLOAT16 else np.int8
    for name in sorted(global_weights):
        g = np.asarray(global_weights[name])
        d = arrays[name]
        if d.dtype != wire or d.shape != g.shape:
            return (
                f"{encoding} update: tensor '{name}' is {d.dtype} of shape {d.shape}, expected "
                f"{np.dtype(wire)} of shape {g.shape} (the global model's)"
            )
        if encoding == FLOAT16:
            decoded[name] = g + d.astype(g.dtype)
            continue
        scale = arrays[scale_name(name)]
        if scale.dtype != np.float32 or scale.shape != ():
            return (
                f"int8 update: scale '{scale_name(name)}' is {scale.dtype} of shape "
                f"{scale.shape}, expected float32 of shape ()"
            )
        decoded[name] = g + d.astype(g.dtype) * scale.astype(g.dtype)
    return decoded


def encoded_bytes(spec: WeightSpec, encoding: str) -> int:
    """Tensor bytes of an update in ``encoding`` for a model of ``spec`` (what
    ``fl_ondevice.wire.message.num_bytes`` counts of its ArrayRecord): float32 the weights' own
    bytes, float16 2 B per element, int8 1 B per element plus a 4 B scale per tensor."""
    _check_encoding(encoding)
    if encoding == FLOAT32:
        return spec.num_bytes
    elements = sum(int(np.prod(t.shape)) for t in spec.tensors)
    if encoding == FLOAT16:
        return 2 * elements
    return elements + 4 * len(spec.tensors)


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"update encoding {encoding!r} is unknown: choose one of {ENCODINGS}")


def _check_same_tensors(
    weights: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray]
) -> None:
    if sorted(weights) != sorted(global_weights):
        raise ValueError(
            f"the update's tensors {sorted(weights)} are not the global model's "
            f"{sorted(global_weights)}: a delta needs both"
        )
    for name, w in weights.items():
        if np.shape(w) != np.shape(global_weights[name]):
            raise ValueError(
                f"update tensor '{name}' has shape {np.shape(w)}, the global model's "
                f"{np.shape(global_weights[name])}: a delta needs both the same"
            )


def _wrong_names(
    arrays: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray], encoding: str
) -> str | None:
    expected = set(global_weights)
    if encoding == INT8:
        expected |= {scale_name(n) for n in global_weights}
    missing, unexpected = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if not missing and not unexpected:
        return None
    return (
        f"{encoding} update does not match the model: missing arrays {missing}, unexpected "
        f"arrays {unexpected}"
        + (" (an int8 tensor 'x' travels with its scale 'x|scale')" if encoding == INT8 else "")
    )
