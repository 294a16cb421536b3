"""Calibration: measured train-step times, interpolation, the cache and calibration files."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

import fl_ondevice.devicetime.measure as measuring
from fl_ondevice.devicetime.calibration import (
    Calibration,
    batch_sizes_needed,
    read_calibration,
    write_calibration,
)
from fl_ondevice.devicetime.measure import load_or_measure, measure
from fl_ondevice.errors import ConfigError, InputError

KEY = "mlp-digits"


def by_hand(step_seconds: dict[int, float], model_key: str = KEY) -> Calibration:
    return Calibration(
        model_key=model_key,
        host="test host",
        num_threads=1,
        step_seconds=step_seconds,
        repeats={b: 5 for b in step_seconds},
        measured_at="2025-01-01T00:00:00+00:00",
    )


@pytest.fixture()
def mlp_bytes(converted) -> bytes:
    return converted("mlp", (8, 8), learning_rate=0.1)[1]


@pytest.fixture()
def counted(monkeypatch):
    """The batch sizes of every call to ``measure`` (which still runs the real interpreter)."""
    calls: list[list[int]] = []
    real = measuring.measure

    def counting(model_file, x, y, batch_sizes, *args, **kwargs):
        calls.append(sorted(batch_sizes))
        return real(model_file, x, y, batch_sizes, *args, **kwargs)

    monkeypatch.setattr(measuring, "measure", counting)
    return calls


# -- measuring the real interpreter ---------------------------------------------------------------
def test_measure_times_each_size_with_the_stated_repeats(mlp_bytes, digits, caplog):
    x, y = digits[0], digits[1]
    sizes = [1, 32, len(x) + 5]  # the last is larger than the data: cycled

    with caplog.at_level(logging.INFO, logger="fl_ondevice.devicetime.measure"):
        got = measure(mlp_bytes, x, y, sizes, model_key=KEY, min_repeats=3, max_repeats=7)

    assert sorted(got.step_seconds) == sizes == sorted(got.repeats)
    assert all(math.isfinite(s) and s > 0 for s in got.step_seconds.values())
    assert all(3 <= n <= 7 for n in got.repeats.values())
    assert (got.model_key, got.num_threads) == (KEY, 1)
    assert got.runtime.startswith("ai-edge-litert ")  # the interpreter the clients run
    assert f"calibrated {KEY} on {got.host} ({got.runtime}): batch 1 " in caplog.text


@pytest.mark.parametrize(("budget", "want"), [(1e-12, 3), (1e9, 6)])
def test_measure_stops_at_min_repeats_after_budget_and_at_max_repeats(
    mlp_bytes, digits, budget, want
):
    # A budget no step fits in times min_repeats steps; one no run exhausts times max_repeats.
    got = measure(
        mlp_bytes,
        digits[0],
        digits[1],
        [4],
        model_key=KEY,
        max_seconds_per_size=budget,
        min_repeats=3,
        max_repeats=6,
        warmup=0,
    )

    assert got.repeats == {4: want}


def test_measure_rejects_bad_arguments(mlp_bytes, digits):
    x, y = digits[0], digits[1]
    with pytest.raises(InputError, match="batch_sizes"):
        measure(mlp_bytes, x, y, [0], model_key=KEY)
    with pytest.raises(InputError, match="x holds 0"):
        measure(mlp_bytes, x[:0], y[:0], [1], model_key=KEY)
    with pytest.raises(ConfigError, match="min_repeats=5 and max_repeats=2"):
        measure(mlp_bytes, x, y, [1], model_key=KEY, max_repeats=2)


# -- interpolation and a client's training time -------------------------------------------------
def test_seconds_returns_measured_values_exactly():
    cal = by_hand({1: 0.001, 32: 0.004})

    assert cal.seconds(1) == 0.001 and cal.seconds(32) == 0.004


def test_seconds_interpolates_between_neighbours():
    cal = by_hand({1: 0.001, 32: 0.004, 64: 0.010})

    assert cal.seconds(16) == pytest.approx(0.001 + 15 / 31 * 0.003, rel=1e-12)
    assert cal.seconds(48) == pytest.approx(0.004 + 16 / 32 * 0.006, rel=1e-12)


def test_seconds_extrapolates_through_the_last_two_points():
    cal = by_hand({1: 0.001, 32: 0.004})

    assert cal.seconds(63) == pytest.approx(0.004 + 31 / 31 * 0.003, rel=1e-12)


def test_seconds_extrapolates_proportionally_from_one_point():
    cal = by_hand({10: 0.002})

    assert cal.seconds(25) == pytest.approx(0.005, rel=1e-12)
    assert cal.seconds(5) == pytest.approx(0.001, rel=1e-12)


def test_seconds_below_the_smallest_size_is_proportional():
    cal = by_hand({4: 0.002, 8: 0.003})

    assert cal.seconds(2) == pytest.approx(0.001, rel=1e-12)


def test_seconds_never_drops_below_the_largest_when_the_last_segment_falls():
    # Noise can make a larger batch measure faster; a line through it would reach 0 and below.
    cal = by_hand({1: 0.004, 32: 0.003})

    assert cal.seconds(1000) == 0.003
    assert cal.seconds(16) == pytest.approx(0.004 - 15 / 31 * 0.001, rel=1e-12)


def test_train_seconds_counts_full_batches_and_the_remainder():
    cal = by_hand({1: 0.001, 32: 0.004})
    rest = 0.001 + 5 / 31 * 0.003  # batch of 70 mod 32 = 6

    assert cal.train_seconds(70, 32, 2) == pytest.approx(2 * (2 * 0.004 + rest), rel=1e-12)
    assert cal.train_seconds(64, 32, 3) == pytest.approx(3 * 2 * 0.004, rel=1e-12)
    assert cal.train_seconds(6, 32, 1) == pytest.approx(rest, rel=1e-12)  # one batch of 6


def test_train_seconds_full_batch_is_one_step_of_all_examples_per_epoch():
    cal = by_hand({1: 0.001, 50: 0.006, 200: 0.02})

    assert cal.train_seconds(100, None, 3) == pytest.approx(
        3 * (0.006 + 50 / 150 * 0.014), rel=1e-12
    )


def test_train_seconds_rejects_bad_arguments():
    cal = by_hand({1: 0.001})
    with pytest.raises(InputError, match="epochs=0"):
        cal.train_seconds(10, 2, 0)
    with pytest.raises(InputError, match="batch_size=0"):
        cal.train_seconds(10, 0, 1)
    with pytest.raises(InputError, match="batch=0"):
        cal.seconds(0)


@pytest.mark.parametrize(
    ("batch_size", "sizes", "want"),
    [
        (32, [10, 100, 50], [1, 32]),
        (32, [10, 20], [1, 20]),  # B capped at the largest client
        (1, [10, 20], [1]),
        (None, [10, 40, 20, 30], [1, 20, 40]),  # median_low of an even count: a real size
        (None, [7, 7, 7], [1, 7]),
        (None, [1], [1]),
    ],
)
def test_batch_sizes_needed(batch_size, sizes, want):
    assert batch_sizes_needed(batch_size, sizes) == want


def test_batch_sizes_needed_make_train_seconds_interpolate():
    sizes = [10, 45, 70]
    needed = batch_sizes_needed(32, sizes)
    cal = by_hand({b: 0.001 * b for b in needed})  # time proportional to batch: exact checks

    for n in sizes:
        assert cal.train_seconds(n, 32, 1) == pytest.approx(0.001 * n, rel=1e-12)


def test_batch_sizes_needed_rejects_no_clients():
    with pytest.raises(InputError, match="client_train_sizes"):
        batch_sizes_needed(32, [])


# -- JSON ------------------------------------------------------------------------------------------
def test_json_round_trip_is_exact():
    cal = by_hand({1: 0.1 + 0.2, 32: 1 / 3, 200: 2.5e-5})

    back = Calibration.from_json(cal.to_json())

    assert back == cal
    assert [back.step_seconds[b].hex() for b in (1, 32, 200)] == [
        (0.1 + 0.2).hex(),
        (1 / 3).hex(),
        (2.5e-5).hex(),
    ]
    assert json.loads(cal.to_json())["step_seconds"] == {"1": 0.1 + 0.2, "32": 1 / 3, "200": 2.5e-5}


def test_write_then_read_calibration(tmp_path):
    cal = by_hand({1: 0.001, 32: 0.004})

    write_calibration(cal, tmp_path / "run" / "calibration.json")

    assert read_calibration(tmp_path / "run" / "calibration.json", KEY) == cal
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["calibration.json"]


# -- read_calibration's errors --------------------------------------------------------------------
def _written(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "cal.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _good_doc() -> dict:
    return json.loads(by_hand({1: 0.001, 32: 0.004}).to_json())


def test_read_calibration_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="no such file") as err:
        read_calibration(path)
    assert str(path) in str(err.value) and "drop device.calibration" in str(err.value)


def test_read_calibration_not_json(tmp_path):
    path = _written(tmp_path, "{not json")
    with pytest.raises(ConfigError, match="not JSON") as err:
        read_calibration(path)
    assert str(path) in str(err.value) and "drop device.calibration" in str(err.value)


def test_read_calibration_missing_field(tmp_path):
    doc = _good_doc()
    del doc["repeats"]
    path = _written(tmp_path, doc)
    with pytest.raises(ConfigError, match=r"lacks the field\(s\) \['repeats'\]") as err:
        read_calibration(path)
    assert str(path) in str(err.value) and "drop device.calibration" in str(err.value)


# Raw JSON: NaN and Infinity are what Python's json writes for those floats; a quoted number is
# a string.
@pytest.mark.parametrize("literal", ["0", "-0.001", "NaN", "Infinity", '"0.001"'])
def test_read_calibration_rejects_values_not_finite_and_positive(tmp_path, literal):
    doc = _good_doc()
    doc["step_seconds"]["32"] = "BAD"
    path = _written(tmp_path, json.dumps(doc).replace('"BAD"', literal))
    with pytest.raises(ConfigError, match=r"step_seconds\[32\].*finite number of seconds > 0") as e:
        read_calibration(path)
    assert str(path) in str(e.value) and "drop device.calibration" in str(e.value)


def test_read_calibration_rejects_zero_repeats(tmp_path):
    doc = _good_doc()
    doc["repeats"]["1"] = 0
    with pytest.raises(ConfigError, match=r"repeats\[1\] = 0"):
        read_calibration(_written(tmp_path, doc))


def test_read_calibration_rejects_another_models_file(tmp_path):
    path = _written(tmp_path, _good_doc())
    with pytest.raises(ConfigError) as err:
        read_calibration(path, expect_model_key="cnn-femnist")
    text = str(err.value)
    assert str(path) in text and f"model {KEY!r}" in text and "'cnn-femnist'" in text
    assert "drop device.calibration to measure this model" in text


# -- the cache -------------------------------------------------------------------------------------
def test_load_or_measure_measures_once(tmp_path, mlp_bytes, digits, counted):
    x, y = digits[0], digits[1]

    first = load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1, 32], 1)
    second = load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [32, 1], 1)

    assert counted == [[1, 32]]
    assert second == first and sorted(first.step_seconds) == [1, 32]
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 1


def test_load_or_measure_measures_only_missing_sizes(tmp_path, mlp_bytes, digits, counted):
    x, y = digits[0], digits[1]
    first = load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1], 1)

    both = load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1, 8], 1)
    again = load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [8], 1)

    assert counted == [[1], [8]]
    assert both.step_seconds[1] == first.step_seconds[1] and sorted(both.step_seconds) == [1, 8]
    assert again == both  # the union was written back


def test_load_or_measure_keys_the_cache_by_model_and_threads(tmp_path, mlp_bytes, digits, counted):
    x, y = digits[0], digits[1]

    load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1], 1)
    other = load_or_measure(tmp_path, "another model", mlp_bytes, x, y, [1], 1)
    load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1], 2)

    assert counted == [[1], [1], [1]]
    assert other.model_key == "another model"
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 3


def test_load_or_measure_measures_again_over_a_corrupt_cache(
    tmp_path, mlp_bytes, digits, counted, caplog
):
    x, y = digits[0], digits[1]
    load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1], 1)
    (cached,) = (tmp_path / "calibration").glob("*.json")
    cached.write_text('{"model_key": "mlp-dig')  # a half-written file

    with caplog.at_level(logging.WARNING, logger="fl_ondevice.devicetime.measure"):
        got = load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1], 1)

    assert counted == [[1], [1]]
    assert str(cached) in caplog.text and "measuring again" in caplog.text
    assert read_calibration(cached, KEY) == got


def test_a_cached_calibration_of_another_runtime_is_measured_again(
    tmp_path, mlp_bytes, digits, counted, caplog
):
    # A calibration measured on another interpreter (e.g. TF 2.18's, before the LiteRT move)
    # is another measurement: the cache is keyed by the runtime and checks it.
    x, y = digits[0], digits[1]
    load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1], 1)
    (cached,) = (tmp_path / "calibration").glob("*.json")
    doc = json.loads(cached.read_text())
    cached.write_text(json.dumps({**doc, "runtime": "tensorflow 2.18.1"}))

    with caplog.at_level(logging.WARNING, logger="fl_ondevice.devicetime.measure"):
        got = load_or_measure(tmp_path, KEY, mlp_bytes, x, y, [1], 1)

    assert counted == [[1], [1]]
    assert got.runtime == doc["runtime"] != "tensorflow 2.18.1"
    assert "'tensorflow 2.18.1'" in caplog.text and "measuring again" in caplog.text


def test_a_calibration_file_written_before_runtimes_were_recorded_still_reads(tmp_path):
    doc = json.loads(by_hand({1: 0.001, 32: 0.004}).to_json())
    del doc["runtime"]
    (tmp_path / "old.json").write_text(json.dumps(doc))

    got = read_calibration(tmp_path / "old.json")

    assert got.runtime == "" and got.step_seconds == {1: 0.001, 32: 0.004}
