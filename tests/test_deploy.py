"""`python -m fl_ondevice.deploy`: real SuperLink and SuperNode processes on 127.0.0.1, with TLS
and SuperNode authentication; its results, faults, Ctrl-C, and that nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from conftest import compose_config, metrics_rows, stable_rows
from flwr.common.config import flatten_dict, validate_fields_in_config

from fl_ondevice.config import from_run_config, to_run_config
from fl_ondevice.deploy import write_app
from fl_ondevice.runtime.federation import Federation

ROUNDS = 4
slow = pytest.mark.slow  # starts a SuperLink and SuperNodes: 0.5-4 min


def _deploy(out: Path, cache: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fl_ondevice.deploy", f"cache_dir={cache}", f"hydra.run.dir={out}",
         *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"deploy still running after {timeout:.0f} s:\n{output[-3000:]}")
    return output


def _running_under(work: Path) -> dict[int, str]:
    """pid -> command of the processes (zombies aside) whose FLWR_HOME or command line is under
    ``work``."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(work).encode() in environ + cmdline:
            found[int(proc.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def _assert_nothing_left(work: Path) -> None:
    deadline = time.monotonic() + 10  # processes that were told to stop may take a moment
    while (left := _running_under(work)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [f"{pid}: {command}" for pid, command in left.items()]


@pytest.fixture(autouse=True)
def _kill_leftovers(tmp_path):
    """After each test, kill what is still running under its tmp_path. The tests assert that
    nothing is left; this only keeps a failed one (deploy killed on a timeout, its SuperLink and
    SuperNodes orphaned) from leaving processes on the machine."""
    yield
    for pid in _running_under(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(proc: subprocess.Popen, out: Path, done, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "metrics.csv").exists() or not done(metrics_rows(out)):
        if proc.poll() is not None or time.monotonic() > deadline:
            output = proc.communicate()[0] if proc.poll() is not None else ""
            pytest.fail(f"{what} never happened:\n{output[-3000:]}")
        time.sleep(0.5)


def test_the_app_deploy_submits_carries_the_whole_config(tmp_path):
    # Flower's --run-config cannot add keys that pyproject lacks (FedProx's proximal_mu, mods).
    cfg = compose_config(tmp_path / "out", "strategy=fedprox", "num_clients=3")

    app = write_app(tmp_path / "app", cfg)

    project = tomllib.loads((app / "pyproject.toml").read_text())
    valid, errors, _ = validate_fields_in_config(project)
    assert valid, errors
    run_config = flatten_dict(project["tool"]["flwr"]["app"]["config"])
    assert run_config == to_run_config(cfg) and from_run_config(run_config) == cfg
    assert run_config["strategy.proximal-mu"] == 0.01
    # The whole package, subpackages included: the components below live in them.
    assert (app / "fl_ondevice" / "server" / "server_app.py").is_file()
    assert (app / "fl_ondevice" / "client" / "client_app.py").is_file()
    assert not list(app.rglob("__pycache__"))


def test_a_bad_deploy_setting_stops_before_any_process_starts(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "fl_ondevice.deploy", "num_nodes=0", f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 2
    assert "num_nodes=0 is invalid: must be >= 1" in done.stdout + done.stderr
    assert not (out / "deploy").exists()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, cache) -> tuple[Path, str]:
    """A deploy run with 4 SuperNodes: (run directory, console output)."""
    out = tmp_path_factory.mktemp("deploy") / "run"
    proc = _deploy(out, cache, "num_nodes=4", f"num_rounds={ROUNDS}")
    output = _finish(proc)
    assert proc.returncode == 0, output[-3000:]
    return out, output


@slow
def test_deploy_with_4_supernodes_gives_the_simulations_metrics(deployed, run):
    out, output = deployed

    assert stable_rows(out) == stable_rows(run("num_clients=4", f"num_rounds={ROUNDS}"))
    assert f"round {ROUNDS}/{ROUNDS}  accuracy" in output  # the ServerApp's progress lines
    assert "4 SuperNodes online (TLS, authenticated)" in output
    assert "final accuracy" in output and "Traceback" not in output
    for name in ("global_model.tflite", "global_model.ckpt", "accuracy.png", "partition.png"):
        assert (out / name).is_file(), name
    _assert_nothing_left(out)


@slow
def test_each_supernode_owns_one_partition_and_got_the_model_by_content(deployed):
    out, _ = deployed
    nodes = json.loads((out / "deploy" / "nodes.json").read_text())
    configs = [n["command"][n["command"].index("--node-config") + 1] for n in nodes]
    for i, node_config in enumerate(configs):
        assert node_config.startswith(f"partition-id={i} num-partitions=4 ")
    log = (out / "deploy" / "serverapp.log").read_text()
    assert sorted(int(p) for p in _owned(log)) == [0, 1, 2, 3]
    app_config = (out / "deploy" / "app" / "pyproject.toml").read_text()
    assert "model-file" not in app_config


def _owned(log: str) -> list[str]:
    return [line.rsplit(" ", 1)[1] for line in log.splitlines() if " owns partition " in line]


@slow
def test_a_supernode_whose_key_is_not_registered_is_refused(tmp_path):
    with Federation(tmp_path / "fed", num_nodes=1) as fed:
        fed.start()
        stranger = fed.node_command(0, private_key=fed.key("stranger"))  # never registered
        with open(tmp_path / "stranger.log", "w") as log:  # its SuperExec inherits it
            proc = subprocess.Popen(
                stranger, stdout=log, stderr=subprocess.STDOUT,
                env=fed.cli_env() | {"FLWR_HOME": str(tmp_path / "stranger")},
            )  # fmt: skip
        returncode = proc.wait(timeout=60)

        assert returncode == 1
        assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text()
        nodes = fed.flwr_json("supernode", "list")["nodes"]
        assert [n["status"] for n in nodes] == ["online"]  # the registered one only
    _assert_nothing_left(tmp_path / "fed")


@slow
def test_a_killed_supernode_is_left_out_until_it_comes_back(tmp_path, cache):
    out = tmp_path / "run"
    proc = _deploy(out, cache, "num_nodes=4", "num_rounds=8")
    _wait_for(proc, out, lambda rows: len(rows) > 2, "round 2")
    node = json.loads((out / "deploy" / "nodes.json").read_text())[1]
    victim = _pid_of(node["command"])
    os.kill(victim, signal.SIGKILL)  # the phone is gone, without a word

    # Flower notices after 2 missed heartbeats (up to 60 s); the round completes without it.
    _wait_for(proc, out, lambda rows: _fewer(rows[-1]), "a round without the killed node")
    back = subprocess.Popen(
        node["command"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "FLWR_HOME": node["flwr_home"]}, start_new_session=True,
    )  # fmt: skip
    try:
        output = _finish(proc)
    finally:
        back.terminate()
        back.wait(timeout=30)

    assert proc.returncode == 0, output[-3000:]
    rows = metrics_rows(out)
    gone = [i for i, row in enumerate(rows) if i and _fewer(row)]
    assert gone and all(int(row["clients_replied"]) >= 3 for row in rows[1:])
    later = rows[gone[-1] + 1 :]
    assert any(row["clients_replied"] == row["clients_sampled"] == "4" for row in later), rows
    _assert_nothing_left(out)


def _fewer(row: dict[str, str]) -> bool:
    return int(row["clients_replied"]) - int(row["clients_failed"]) < 4


def _pid_of(command: list[str]) -> int:
    key = command[command.index("--auth-supernode-private-key") + 1]
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--auth-supernode-private-key" in cmdline and key.encode() in cmdline:
            if any(part.endswith(b"flower-supernode") for part in cmdline[:2]):
                return int(proc.name)
    raise AssertionError(f"no SuperNode with key {key}")


@slow
def test_a_dead_superlink_stops_deploy_with_a_message_and_the_run_resumes(
    tmp_path, cache, deployed
):
    out = tmp_path / "run"
    proc = _deploy(out, cache, "num_nodes=4", f"num_rounds={ROUNDS}")
    _wait_for(proc, out, lambda rows: len(rows) > 2, "round 2")
    os.kill(_superlink_pid(out), signal.SIGKILL)

    output = _finish(proc, timeout=120)

    assert proc.returncode == 2, output[-3000:]
    assert "the SuperLink stopped during the run" in output and "Traceback" not in output
    assert f"python -m fl_ondevice.deploy resume={out}" in output
    _assert_nothing_left(out)

    again = _deploy(out, cache, f"resume={out}")
    output = _finish(again)
    assert again.returncode == 0, output[-3000:]
    assert stable_rows(out) == stable_rows(deployed[0])  # as if never interrupted
    _assert_nothing_left(out)


def _superlink_pid(out: Path) -> int:
    marker = str(out / "deploy" / "superlink.db").encode()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"flower-superlink" in cmdline and marker in cmdline:
            return int(proc.name)
    raise AssertionError("no SuperLink running")


@slow
def test_ctrl_c_stops_deploy_and_every_process_within_10_s(tmp_path, cache):
    out = tmp_path / "run"
    proc = _deploy(out, cache, "num_nodes=2", "num_rounds=50")
    _wait_for(proc, out, lambda rows: len(rows) > 1, "round 1")

    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output = _finish(proc, timeout=20)
    seconds = time.monotonic() - t0

    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    assert seconds < 10, f"{seconds:.1f} s"
    done = json.loads((out / "state.json").read_text())["round"]
    assert f"SIGINT: stopped after round {done}; continue with" in output
    assert "Traceback" not in output
    _assert_nothing_left(out)
