"""Compressed client updates: float16 and int8 round trips, unbiased rounding, sizes, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import metrics_rows

from fl_ondevice.ondevice.checkpoint import read_checkpoint
from fl_ondevice.ondevice.weights import WeightSpec
from fl_ondevice.wire.encoding import ENCODINGS, decode_update, encode_update, encoded_bytes
from fl_ondevice.wire.message import num_bytes, to_arrays

SHAPES = {"a/scalar": (), "b/bias": (7,), "c/kernel": (6, 5), "d/conv": (3, 2, 4)}


def _weights(seed: int, spread: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    # (w, g): g ~ N(0, 1), w = g + a delta ~ N(0, spread), as float32; "e/frozen" does not change.
    rng = np.random.default_rng(seed)
    g = {n: rng.normal(0, 1, s).astype(np.float32) for n, s in SHAPES.items()}
    w = {n: (g[n] + rng.normal(0, spread, s)).astype(np.float32) for n, s in SHAPES.items()}
    g["e/frozen"] = rng.normal(0, 1, (4, 3)).astype(np.float32)
    w["e/frozen"] = g["e/frozen"].copy()
    return w, g


def test_float32_encoding_is_the_weights_themselves():
    w, g = _weights(0, 0.1)

    encoded = encode_update(w, g, "float32", seed=1)
    decoded = decode_update(encoded, g, "float32")

    assert all(encoded[n] is w[n] for n in w) and sorted(encoded) == sorted(w)
    assert isinstance(decoded, dict) and all(decoded[n] is w[n] for n in w)


@pytest.mark.parametrize("spread", [1e-1, 1e-3, 1e-6])  # 1e-6: many deltas float16-subnormal
def test_float16_delta_round_trip_within_its_bound(spread):
    # g = 0, so the decoded delta is exactly what float16 kept: the bound is float16's alone,
    # rounding to nearest with an 11-bit significand, 2**-24 apart below 2**-14.
    d, zero = _weights(1, spread)[0], {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    zero["e/frozen"] = np.zeros((4, 3), np.float32)

    encoded = encode_update(d, zero, "float16")
    decoded = decode_update(encoded, zero, "float16")

    assert isinstance(decoded, dict)
    for name, delta in d.items():
        assert encoded[name].dtype == np.float16 and decoded[name].dtype == np.float32
        bound = np.abs(delta.astype(np.float64)) * 2**-11 + 2**-24
        assert (np.abs(decoded[name].astype(np.float64) - delta) <= bound).all(), name


def test_float16_weights_round_trip_adds_one_float32_rounding():
    w, g = _weights(2, 1e-2)

    decoded = decode_update(encode_update(w, g, "float16"), g, "float16")

    assert isinstance(decoded, dict)
    for name in w:
        w64, d = w[name].astype(np.float64), w[name].astype(np.float64) - g[name]
        # float16's bound on d, float32's rounding of w - g and of g + d (2**-24 relative each).
        bound = np.abs(d) * (2**-11 + 2**-24) + 2**-24 + np.abs(w64) * 2**-24
        assert (np.abs(decoded[name] - w64) <= bound).all(), name
    assert np.array_equal(decoded["e/frozen"], g["e/frozen"])  # an all-zero delta is exact


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_round_trip_is_within_one_step_per_element(seed):
    w, g = _weights(seed, 1e-2)

    encoded = encode_update(w, g, "int8", seed=seed)
    decoded = decode_update(encoded, g, "int8")

    assert isinstance(decoded, dict)
    for name in w:
        d = w[name].astype(np.float64) - g[name].astype(np.float64)
        step = np.abs(d).max() / 127  # s, computed here in float64
        assert encoded[name].dtype == np.int8 and encoded[name].shape == w[name].shape
        assert encoded[f"{name}|scale"].dtype == np.float32 and encoded[f"{name}|scale"].shape == ()
        assert float(encoded[f"{name}|scale"]) == pytest.approx(step, rel=1e-6)
        assert np.abs(encoded[name].astype(int)).max() <= 127
        # One step s, plus float32's roundings of w - g and g + q * s (2**-24 relative each).
        bound = step * (1 + 1e-6) + (np.abs(d) + np.abs(w[name])) * 2**-24
        assert (np.abs(decoded[name] - w[name].astype(np.float64)) <= bound).all(), name
        assert decoded[name].dtype == np.float32
    assert not encoded["e/frozen"].any() and float(encoded["e/frozen|scale"]) == 0.0
    assert np.array_equal(decoded["e/frozen"], g["e/frozen"])


def test_int8_stochastic_rounding_is_unbiased():
    # Each draw's error e = (q - d / s) * s lies in an interval of width s, so by Hoeffding the
    # mean of N draws is within t of d with probability >= 1 - 2 exp(-2 N t**2 / s**2): for
    # t = 3 s / sqrt(N), 1 - 3e-8 per element. Round-to-nearest would miss d by up to s / 2.
    rng = np.random.default_rng(7)
    g = {"k": rng.normal(0, 1, 40).astype(np.float32)}
    w = {"k": (g["k"] + rng.normal(0, 0.01, 40)).astype(np.float32)}
    d = w["k"].astype(np.float64) - g["k"]
    n = 2000

    total = np.zeros(40)
    for seed in range(n):
        decoded = decode_update(encode_update(w, g, "int8", seed=seed), g, "int8")
        assert isinstance(decoded, dict)
        total += decoded["k"].astype(np.float64) - g["k"]
    mean = total / n

    step = np.abs(d).max() / 127
    tolerance = 3 * step / np.sqrt(n) + 1e-7  # + float32's roundings of w - g and g + q * s
    assert (np.abs(mean - d) <= tolerance).all()
    nearest = np.round(d / step) * step
    assert np.abs(nearest - d).max() > 5 * tolerance  # the test tells rounding to nearest apart


def test_int8_same_seed_same_bytes_other_seed_other_bytes():
    w, g = _weights(3, 1e-2)

    a, b = encode_update(w, g, "int8", seed=[0, 1, 2, 5]), encode_update(w, g, "int8", [0, 1, 2, 5])
    c = encode_update(w, g, "int8", seed=[0, 1, 3, 5])

    assert all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert any(a[n].tobytes() != c[n].tobytes() for n in a)


def test_encoded_bytes_is_what_the_encoded_record_carries():
    w, g = _weights(4, 1e-2)
    spec = WeightSpec.of(g)
    # 1 + 7 + 30 + 24 + 12 = 74 elements in 5 tensors.
    expected = {"float32": 74 * 4, "float16": 74 * 2, "int8": 74 * 1 + 5 * 4}

    for encoding in ENCODINGS:
        sent = num_bytes(to_arrays(encode_update(w, g, encoding, seed=0)))
        assert encoded_bytes(spec, encoding) == sent == expected[encoding], encoding


def test_a_zero_delta_and_a_non_finite_delta():
    g = {"x": np.ones(3, np.float32)}
    bad = {"x": np.array([1.0, np.nan, 2.0], np.float32)}

    same = decode_update(encode_update(g, g, "int8"), g, "int8")
    spoilt = decode_update(encode_update(bad, g, "int8"), g, "int8")

    assert isinstance(same, dict) and np.array_equal(same["x"], g["x"])
    # A NaN in the update decodes to NaN: the server's check rejects it, as in float32.
    assert isinstance(spoilt, dict) and np.isnan(spoilt["x"]).all()


@pytest.mark.parametrize(
    ("encoding", "change", "reason"),
    [
        (
            "int8",
            lambda e: e.pop("w|scale"),
            r"missing arrays \['w\|scale'\], unexpected arrays \[\]",
        ),
        ("int8", lambda e: e.update(z=np.zeros(2, np.int8)), r"unexpected arrays \['z'\]"),
        ("float16", lambda e: e.pop("w"), r"float16 update .* missing arrays \['w'\]"),
        (
            "int8",
            lambda e: e.update(w=np.zeros(3, np.float32)),
            r"tensor 'w' is float32 of shape \(3,\), expected int8 of shape \(3,\)",
        ),
        (
            "float16",
            lambda e: e.update(w=np.zeros((3, 1), np.float16)),
            r"tensor 'w' is float16 of shape \(3, 1\), expected float16 of shape \(3,\)",
        ),
        (
            "int8",
            lambda e: e.update({"w|scale": np.ones(1, np.float32)}),
            r"scale 'w\|scale' is float32 of shape \(1,\), expected float32 of shape \(\)",
        ),
    ],
)
def test_an_update_that_does_not_fit_its_encoding_says_what_is_wrong(encoding, change, reason):
    g = {"w": np.zeros(3, np.float32)}
    encoded = encode_update({"w": np.ones(3, np.float32)}, g, encoding, seed=0)
    change(encoded)

    result = decode_update(encoded, g, encoding)

    assert isinstance(result, str)
    assert re.search(reason, result), result


def test_encode_refuses_an_unknown_encoding_and_mismatched_tensors():
    g = {"w": np.zeros(3, np.float32)}

    with pytest.raises(ValueError, match=r"'bfloat16' is unknown: choose one of \('float32'"):
        encode_update(g, g, "bfloat16")
    with pytest.raises(ValueError, match=r"tensors \['v'\] are not the global model's \['w'\]"):
        encode_update({"v": np.zeros(3, np.float32)}, g, "int8")
    with pytest.raises(ValueError, match=r"'w' has shape \(3, 2\), the global model's \(3,\)"):
        encode_update({"w": np.zeros((3, 2), np.float32)}, g, "float16")


# -- end to end: Flower's simulation engine, TFLite clients ---------------------------------------
SMALL = ("num_clients=4", "num_rounds=3")  # as tests/test_simulate.py: the float32 run is shared


def _valid(row: dict[str, str]) -> int:
    return int(row["clients_replied"]) - int(row["clients_failed"]) - int(row["clients_rejected"])


def test_int8_updates_upload_a_quarter_of_the_bytes_and_learn_as_well(run):
    out32, out8 = run(*SMALL), run(*SMALL, "client.update_encoding=int8")
    rows32, rows8 = metrics_rows(out32), metrics_rows(out8)
    # Independently of encoded_bytes: the model's tensors, as the run saved them.
    tensors = read_checkpoint(out8 / "global_model.ckpt").values()
    elements = sum(t.size for t in tensors)  # 64*128 + 128 + 128*10 + 10 = 9,610 for the mlp
    int8_update = elements * 1 + 4 * len(tensors)  # 1 B per element + a float32 scale per tensor

    for r8, r32 in zip(rows8[1:], rows32[1:], strict=True):
        assert _valid(r8) == _valid(r32) == 4
        assert int(r8["bytes_up"]) == 4 * int8_update
        assert int(r32["bytes_up"]) == 4 * 4 * elements
        assert int(r8["bytes_down"]) == int(r32["bytes_down"])  # the download stays float32
    assert int(rows8[-1]["bytes_up"]) / int(rows32[-1]["bytes_up"]) == pytest.approx(0.25, abs=0.01)
    # float32 and int8 both ended at 0.7722 with seeds 0 and 1 (float16: 0.7722, 0.7694);
    # round 2 differed by at most 0.003. Chance is 0.1 (10 digits).
    acc8, acc32 = float(rows8[-1]["accuracy"]), float(rows32[-1]["accuracy"])
    assert abs(acc8 - acc32) <= 0.03 and acc8 > 0.5


def test_int8_encoding_comes_after_a_mod_that_clips_the_update(run):
    # fixedclipping_mod compares the reply's tensors with the ones it received: it must see
    # float32 weights, and the server then gets the clipped update as int8.
    out = run(*SMALL, "strategy=dp_client_fixed", "client.update_encoding=int8")
    tensors = read_checkpoint(out / "global_model.ckpt").values()

    for row in metrics_rows(out)[1:]:
        assert _valid(row) == 4
        assert int(row["bytes_up"]) == 4 * (sum(t.size for t in tensors) + 4 * len(tensors))
