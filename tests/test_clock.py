"""The phones' simulated clock: classes, availability, client time, round closing, end to end."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, metrics_rows, stable_rows

from fl_ondevice.config import DeviceConfig
from fl_ondevice.devicetime.calibration import Calibration
from fl_ondevice.devicetime.clock import (
    SECONDS_PER_DAY,
    DeviceClass,
    DeviceClock,
    assign_classes,
    close_round,
    device_classes,
)
from fl_ondevice.errors import ConfigError

HOUR = 3600.0
CAL = Calibration("m", "host", 1, {1: 0.001, 32: 0.004}, {1: 5, 32: 5}, "2026-12-02T00:00:00")


def _phone(name="p", factor=1.0, down=8.0, up=4.0, latency=50.0, hours=24.0, share=1.0):
    return DeviceClass(name, share, factor, down, up, latency, hours)


def _clock(classes, sizes, starts_h=None, batch_size=32, epochs=1) -> DeviceClock:
    clock = DeviceClock(classes, len(sizes), 0, CAL, sizes, batch_size, epochs)
    if starts_h is not None:  # hand-placed windows instead of the seeded ones
        clock.window_start = np.array(starts_h, dtype=float) * HOUR
    return clock


# -- classes ---------------------------------------------------------------------------------------
def test_the_mix_of_classes_is_exact_and_follows_the_seed():
    a = assign_classes([0.2, 0.5, 0.3], 10, seed=0)

    assert np.bincount(a, minlength=3).tolist() == [2, 5, 3]
    assert np.array_equal(a, assign_classes([0.2, 0.5, 0.3], 10, seed=0))
    assert not np.array_equal(a, assign_classes([0.2, 0.5, 0.3], 10, seed=1))
    # 7 clients, shares 1:1:1 -> quotas 2.33 each: the largest remainders get the extra one.
    assert sorted(np.bincount(assign_classes([1, 1, 1], 7, 0)).tolist()) == [2, 2, 3]


def test_a_csv_table_replaces_the_classes(tmp_path):
    table = tmp_path / "fleet.csv"
    table.write_text(
        "name,share,compute_factor,down_mbps,up_mbps\nslow,1,3.5,10,2\nfast,3,1,100,20\n"
    )

    classes = device_classes(DeviceConfig(table=str(table)))

    assert [(c.name, c.share, c.compute_factor, c.up_mbps) for c in classes] == [
        ("slow", 1.0, 3.5, 2.0),
        ("fast", 3.0, 1.0, 20.0),
    ]
    assert classes[0].online_hours == 24.0  # a missing column takes the default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,speed\na,1\n", r"unknown columns \['speed'\]"),
        ("name,compute_factor\na,fast\n", "line 2: could not convert"),
        ("name,compute_factor\na,0\n", r"device.table line 2.compute_factor=0.0 is invalid"),
        ("share\n1\n", "needs a header row with a 'name' column"),
    ],
)
def test_a_bad_table_names_the_file_and_the_problem(tmp_path, text, message):
    table = tmp_path / "fleet.csv"
    table.write_text(text)
    with pytest.raises(ConfigError, match=message):
        device_classes(DeviceConfig(table=str(table)))


# -- one client's time -----------------------------------------------------------------------------
def test_client_time_is_latency_transfers_and_calibrated_steps_times_the_factor():
    clock = _clock([_phone(factor=2.0, down=8.0, up=4.0, latency=50.0)], sizes=[70])

    t = clock.client_time(0, bytes_down=1_000_000, bytes_up=500_000)

    # 70 examples, B = 32: two steps of 32 and one of 6; 6 lies between the measured 1 and 32.
    step6 = 0.001 + (6 - 1) / (32 - 1) * (0.004 - 0.001)
    assert t.compute == pytest.approx(2.0 * (2 * 0.004 + step6), rel=1e-12)
    assert t.download == pytest.approx(1.0)  # 8 Mbit at 8 Mbit/s
    assert t.upload == pytest.approx(1.0)  # 4 Mbit at 4 Mbit/s
    assert t.latency == pytest.approx(0.1)
    assert t.total == pytest.approx(2.1 + t.compute)


# -- availability ----------------------------------------------------------------------------------
def test_online_windows_wrap_around_midnight():
    clock = _clock([_phone(hours=8.0)], sizes=[1, 1, 1], starts_h=[0, 10, 20])

    assert clock.online(1 * HOUR) == [0, 2]  # client 2 is online 20:00-04:00
    assert clock.online(12 * HOUR) == [1]
    assert clock.online_until(0, 1 * HOUR) == pytest.approx(8 * HOUR)
    assert clock.online_until(2, 23 * HOUR) == pytest.approx(28 * HOUR)
    assert clock.most_online() == 2


def test_the_server_waits_until_enough_phones_are_online_and_fails_if_never():
    clock = _clock([_phone(hours=8.0)], sizes=[1, 1, 1], starts_h=[0, 10, 20])
    clock.now = 5 * HOUR
    assert clock.online() == [0]  # 00:00-08:00; client 1 comes at 10:00, client 2 at 20:00

    waited = clock.wait_for(2)

    # Two are online together only from 24:00 (client 0 again, client 2 since 20:00).
    assert waited == pytest.approx(19 * HOUR)
    assert clock.now == pytest.approx(SECONDS_PER_DAY)
    with pytest.raises(ConfigError, match="at most 2 clients are ever online at once"):
        clock.wait_for(3)


def test_always_online_phones_never_wait():
    clock = _clock([_phone()], sizes=[1, 1])
    assert clock.wait_for(2) == 0.0 and clock.online_until(1, 5.0) == math.inf


# -- how a round closes ----------------------------------------------------------------------------
FINISH = {0: 30.0, 1: 10.0, 2: 50.0, 3: 20.0}


def test_waiting_for_all_closes_at_the_last_upload():
    closed = close_round(FINISH, missing=0, keep=None, deadline=None)
    assert (closed.seconds, closed.kept, closed.stragglers) == (50.0, (0, 1, 2, 3), ())


def test_overcommitment_closes_when_the_first_k_are_in():
    closed = close_round(FINISH, missing=0, keep=2, deadline=None)
    assert (closed.seconds, closed.kept, closed.stragglers) == (20.0, (1, 3), (0, 2))


def test_a_deadline_drops_late_updates_and_waits_for_missing_phones():
    late = close_round(FINISH, missing=0, keep=None, deadline=25.0)
    assert (late.seconds, late.kept, late.stragglers) == (25.0, (1, 3), (0, 2))
    # Everybody in before the deadline: the round closes at the last upload...
    early = close_round(FINISH, missing=0, keep=None, deadline=60.0)
    assert (early.seconds, early.stragglers) == (50.0, ())
    # ...unless a sampled phone dropped out: the server cannot know it will not come.
    waiting = close_round(FINISH, missing=1, keep=None, deadline=60.0)
    assert (waiting.seconds, waiting.kept) == (60.0, (0, 1, 2, 3))


def test_overcommitment_and_deadline_close_at_whichever_comes_first():
    assert close_round(FINISH, 0, keep=3, deadline=25.0).seconds == 25.0
    assert close_round(FINISH, 0, keep=2, deadline=25.0).seconds == 20.0
    assert close_round({}, missing=3, keep=2, deadline=None).seconds == 0.0


def test_round_policies_need_phones(tmp_path):
    with pytest.raises(ConfigError, match="act on the simulated clock: choose phones"):
        compose_config(tmp_path, "round.deadline_s=30")
    with pytest.raises(ConfigError, match=r"round.overcommit=0.5 is invalid"):
        compose_config(tmp_path, "device=phones", "round.overcommit=0.5")


# -- end to end ------------------------------------------------------------------------------------
FAST = ("num_clients=6", "num_rounds=3", "device=fast_phones")


def _int(row, key):
    return int(row[key])


def _client_times(out: Path) -> list[float]:
    # Round 1's time of every client, worked out from the run's recorded calibration, its
    # partitions and its bytes: fast_phones have compute factor 1, 166 Mbit/s down, 21 up,
    # 30 ms, and are always online.
    cal = json.loads((out / "calibration.json").read_text())
    steps = Calibration(
        cal["model_key"],
        cal["host"],
        cal["num_threads"],
        {int(k): v for k, v in cal["step_seconds"].items()},
        {int(k): v for k, v in cal["repeats"].items()},
        cal["measured_at"],
    )
    with (out / "partition.csv").open() as f:
        sizes = [int(r["n_train"]) for r in csv.DictReader(f)]
    r1 = metrics_rows(out)[1]
    down = _int(r1, "bytes_down") / _int(r1, "clients_sampled")
    up = _int(r1, "bytes_up") / _int(r1, "clients_replied")
    return [0.06 + down * 8 / 166e6 + steps.train_seconds(n, 32, 1) + up * 8 / 21e6 for n in sizes]


@pytest.mark.parametrize("encoding", ["float32", "int8"])
def test_simulated_round_time_is_the_slowest_phones_time_from_the_recorded_calibration(
    run, encoding
):
    out = run(*FAST, *([f"client.update_encoding={encoding}"] if encoding != "float32" else []))

    rows = metrics_rows(out)
    assert float(rows[1]["sim_round_seconds"]) == pytest.approx(max(_client_times(out)), rel=1e-9)
    elapsed = [float(r["sim_elapsed_seconds"]) for r in rows]
    assert elapsed == pytest.approx(np.cumsum([float(r["sim_round_seconds"]) for r in rows]))
    assert all(r["clients_unavailable"] == "0" and r["clients_stragglers"] == "0" for r in rows)


def test_no_phones_leaves_the_simulated_columns_empty(run):
    rows = metrics_rows(run("num_clients=4", "num_rounds=3"))
    assert {r["sim_round_seconds"] for r in rows} == {""}


def test_a_deadline_counts_stragglers_and_aggregates_only_the_punctual(run):
    full = run(*FAST)
    times = sorted(_client_times(full))
    deadline = (times[2] + times[3]) / 2  # between the 3rd and 4th phone to upload

    rows = metrics_rows(run(*FAST, f"round.deadline_s={deadline!r}"))

    r1 = rows[1]
    assert (_int(r1, "clients_stragglers"), _int(r1, "clients_replied")) == (3, 3)
    assert _int(r1, "examples") < _int(metrics_rows(full)[1], "examples")
    assert float(r1["sim_round_seconds"]) == pytest.approx(deadline, rel=1e-12)
    # Fewer valid updates than round.min_updates: the round is abandoned, the model kept.
    strict = metrics_rows(run(*FAST, f"round.deadline_s={deadline!r}", "round.min_updates=4"))
    assert strict[1]["skipped"] == "1" and strict[1]["accuracy"] == strict[0]["accuracy"]


def test_overcommitment_samples_more_and_keeps_the_first_k(run):
    out = run(*FAST, "strategy.fraction_train=0.5", "round.overcommit=1.3")

    for row in metrics_rows(out)[1:]:
        # K = int(6 x 0.5) = 3 by the strategy; ceil(3 x 1.3) = 4 sampled; the first 3 count.
        assert (_int(row, "clients_sampled"), _int(row, "clients_replied")) == (4, 3)
        assert _int(row, "clients_stragglers") == 1


def test_phones_offline_cannot_be_sampled_and_the_clock_is_reproducible(run):
    a = run("num_clients=12", "num_rounds=3", "device=phones")
    b = run("num_clients=12", "num_rounds=3", "device=phones", "hydra.job.name=again")

    rows = metrics_rows(a)
    elapsed = [float(r["sim_elapsed_seconds"]) for r in rows]  # plain numbers in the CSV
    assert elapsed == sorted(elapsed) and elapsed[-1] > 0
    for row in rows[1:]:
        online = 12 - _int(row, "clients_unavailable")
        assert 0 < online < 12  # 8-hour windows: about a third online at a time
        assert _int(row, "clients_sampled") == online  # fraction_train = 1 of those online
    assert stable_rows(a) == stable_rows(b)  # the simulated columns included


def test_a_given_calibration_gives_the_same_clock_in_another_cache(run, tmp_path):
    first = run(*FAST)
    cal = tmp_path / "calibration.json"
    shutil.copy(first / "calibration.json", cal)
    again = run(*FAST, f"device.calibration={cal}", f"cache_dir={tmp_path / 'other-cache'}")

    assert stable_rows(again) == stable_rows(first)
    assert not (tmp_path / "other-cache" / "calibration").exists()  # nothing was measured


def test_a_calibration_of_another_model_is_refused(run, tmp_path):
    cal = json.loads((run(*FAST) / "calibration.json").read_text())
    cal["model_key"] = "cnn sgd 28x28 -> 10"
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(cal))
    from fl_ondevice.simulate import simulate

    cfg = compose_config(tmp_path / "out", *FAST, f"device.calibration={path}")
    with pytest.raises(ConfigError, match="cnn sgd 28x28"):
        simulate(cfg, keep_engine=True)


def test_resume_keeps_the_runs_own_calibration(run, tmp_path):
    from fl_ondevice.server.resume import resumed_config
    from fl_ondevice.simulate import simulate

    stopped = tmp_path / "stopped"
    shutil.copytree(run(*FAST), stopped)
    # As if the run had been measured on a machine 10x slower at training: resuming it on this
    # one must keep its clock, not measure this machine's.
    cal = json.loads((stopped / "calibration.json").read_text())
    cal["step_seconds"] = {k: 10 * v for k, v in cal["step_seconds"].items()}
    (stopped / "calibration.json").write_text(json.dumps(cal))
    cfg = resumed_config(str(stopped))
    cfg.num_rounds = 4

    simulate(cfg, keep_engine=True)

    rows = metrics_rows(stopped)
    assert [r["round"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert float(rows[4]["sim_round_seconds"]) > float(rows[3]["sim_round_seconds"])
    assert float(rows[4]["sim_elapsed_seconds"]) == pytest.approx(
        float(rows[3]["sim_elapsed_seconds"]) + float(rows[4]["sim_round_seconds"])
    )
