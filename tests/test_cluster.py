"""An existing Ray cluster as the engine (``backend.address``): two real nodes on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import compose_config, stable_rows

from fl_ondevice.errors import ConfigError

OVERRIDES = ("num_rounds=30", "num_clients=10")  # long enough to see both nodes' actors
# Ray's CLI, installed next to this interpreter with flwr[simulation] (PATH may lack that dir).
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_start(log: Path, *args: str) -> subprocess.Popen:
    """``ray start ... --block`` in a process group of its own: killing the group stops every
    process that node started, and only those (not other Ray instances on the machine)."""
    ports = [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]
    return subprocess.Popen(
        [RAY, "start", "--num-cpus=1", "--node-ip-address=127.0.0.1", *ports, *args]
        + ["--block", "--disable-usage-stats"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@dataclass(frozen=True)
class _Process:
    pid: int
    ppid: int
    pgid: int
    state: str
    cmd: str


def _processes() -> list[_Process]:
    """Every process, with its full command line (``-ww``: ps cuts it to $COLUMNS otherwise)."""
    ps = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,pgid=,stat=,cmd="], capture_output=True, text=True
    )
    rows = [line.split(None, 4) for line in ps.stdout.splitlines()]
    return [_Process(int(r[0]), int(r[1]), int(r[2]), r[3], r[4]) for r in rows if len(r) == 5]


def _group_alive(pgid: int) -> list[str]:
    return [p.cmd for p in _processes() if p.pgid == pgid and not p.state.startswith("Z")]


def _actor_parents() -> set[int]:
    """The parent processes (raylets) of the running ClientApp actors."""
    return {p.ppid for p in _processes() if "ClientAppActor" in p.cmd}


def _raylet(pgid: int) -> int:
    for p in _processes():
        if p.pgid == pgid and "/raylet " in f"{p.cmd} ":
            return p.pid
    raise AssertionError(f"no raylet in process group {pgid}")


@pytest.fixture
def ray_cluster(tmp_path):
    """A head and a second node, one CPU each, on 127.0.0.1; both stopped afterwards.

    The head keeps its files (and the "current cluster" address that a later ``ray.init()``
    without an address would connect to) in a temporary directory of its own, short enough
    for Ray's socket paths, and removed afterwards.
    """
    if not Path(RAY).is_file():
        pytest.fail(f"{RAY} (Ray's CLI, installed with flwr[simulation]) is missing")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = _ray_start(
        tmp_path / "head.log",
        "--head",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        f"--ray-client-server-port={_free_port()}",
    )
    nodes = [head]
    try:
        _wait_until_up(head, tmp_path / "head.log")
        nodes.append(_ray_start(tmp_path / "node.log", f"--address=127.0.0.1:{port}"))
        _wait_until_up(nodes[1], tmp_path / "node.log")
        yield f"127.0.0.1:{port}", [_raylet(n.pid) for n in nodes]
    finally:
        for node in nodes:
            os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            node.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_group_alive(n.pid) for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [cmd for n in nodes for cmd in _group_alive(n.pid)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        default = Path("/tmp/ray/ray_current_cluster")
        assert not default.is_file() or str(port) not in default.read_text(), (
            f"{default} still names the stopped cluster: the next ray.init() would hang on it"
        )
        assert left == [], f"Ray processes left behind: {left}"


def _wait_until_up(proc: subprocess.Popen, log: Path) -> None:
    """Until ``ray start --block`` says it has started everything (its port opens earlier)."""
    deadline = time.monotonic() + 120
    while "will now block" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)


@pytest.mark.slow  # a two-node Ray cluster and one command-line run: ~1.5 min
def test_a_run_on_an_existing_ray_cluster_uses_both_nodes_and_equals_a_local_run(
    ray_cluster, run, tmp_path, cache
):
    address, raylets = ray_cluster
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_ondevice.simulate", f"backend.address={address}", *OVERRIDES]
        + [f"cache_dir={cache}", f"hydra.run.dir={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    parents: set[int] = set()
    while proc.poll() is None:
        parents |= _actor_parents()
        time.sleep(0.2)
    output = proc.communicate()[0]

    assert proc.returncode == 0, output[-3000:]
    assert set(raylets) <= parents, f"actors ran under {parents}, the nodes are {raylets}"
    assert stable_rows(out) == stable_rows(run(*OVERRIDES))  # same numbers as a local engine


def test_an_address_where_no_ray_head_answers_is_named_before_anything_runs(tmp_path, no_engine):
    from fl_ondevice.simulate import simulate

    cfg = compose_config(tmp_path, f"backend.address=127.0.0.1:{_free_port()}")

    with pytest.raises(ConfigError, match=r"backend.address='127.0.0.1:\d+': no Ray head answers"):
        simulate(cfg)


def test_a_malformed_address_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"backend.address='headnode' is invalid: must be HOST"):
        compose_config(tmp_path, "backend.address=headnode")


def test_more_cpus_per_client_than_the_machine_has_is_named_before_anything_runs(
    tmp_path, no_engine
):
    from fl_ondevice.simulate import simulate

    cfg = compose_config(tmp_path, f"client.num_cpus={2 * (os.cpu_count() or 1)}")

    with pytest.raises(ConfigError, match=r"client.num_cpus=\d+ is more than the \d+ CPUs of this"):
        simulate(cfg)
