"""A Flower deployment on this machine: one SuperLink and SuperNodes on 127.0.0.1, started,
watched and stopped by this process, with TLS and SuperNode authentication unless asked not to.

Flower 1.42 facts this relies on (verified with real processes):

- The SuperLink serves its Fleet, Control and Runtime APIs on one port (``--port``); each
  SuperNode needs a port of its own for its ClientApp runtime.
- TLS: the SuperLink takes a CA, a certificate and its key; the certificate must name
  127.0.0.1, because the SuperLink's own ServerApp process connects back to it with the CA.
- Authentication: EC P-384 keys in OpenSSH format. ``flwr supernode register`` binds a public
  key to a node id (a node restarted with its key keeps its id); a SuperNode whose key is not
  registered exits with code 1 ("Failed to activate SuperNode").
- ``flwr run`` exits 0 even when the ServerApp failed: the run's status comes from
  ``flwr list --run-id``.
- The SuperLink's SuperExec runs in a session of its own, so stopping goes by the process tree
  (snapshotted while it runs), not by process group alone; every process is reaped.
- Without ``--disable-runtime-dependency-installation`` the SuperLink would ``uv sync`` each
  app's dependencies from PyPI into a fresh environment (protobuf 6 included, which TF 2.18
  cannot import).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_ondevice.errors import FlOnDeviceError
from fl_ondevice.processes import descendants, process_table
from fl_ondevice.runtime.tls import write_node_key, write_tls

log = logging.getLogger(__name__)

CONNECTION = "fl-ondevice"  # the flwr CLI's name for our SuperLink
START_SECONDS = 90.0  # for the SuperLink to answer and the SuperNodes to come online
STOP_SECONDS = 5.0  # a process that ignores SIGTERM this long is killed
DATABASE = "superlink.db"
NODES_JSON = "nodes.json"  # each SuperNode's command and FLWR_HOME: to restart one by hand
_PR_SET_CHILD_SUBREAPER = 36


class FederationError(FlOnDeviceError):
    """A SuperLink or SuperNode did not start, or stopped; the message names its log."""


@dataclass
class Node:
    """A SuperNode this process started (or can start again)."""

    index: int
    command: list[str]
    home: Path
    log_file: Path
    process: subprocess.Popen | None = None


@dataclass
class Federation:
    """One SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 under ``workdir``.

    Parameters
    ----------
    workdir
        Holds the certificates, keys, each process's FLWR_HOME and log.
    num_nodes
        SuperNodes; node i gets ``partition-id=i num-partitions=num_nodes`` plus
        ``node_config`` (its data and cache settings) as its node config.
    insecure
        Plain HTTP, no SuperNode authentication (Flower's ``--insecure``).
    """

    workdir: Path
    num_nodes: int
    insecure: bool = False
    node_config: str = ""
    nodes: list[Node] = field(default_factory=list)
    _superlink: subprocess.Popen | None = None
    _port: int = 0
    # Every process of the trees we started, ever: pid -> its start time (a reused pid is not
    # ours).
    _seen: dict[int, int] = field(default_factory=dict)

    # -- starting -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the SuperLink, register the SuperNodes' keys, start them, and wait until all
        are online. Raises ``FederationError`` naming the log of what failed."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in self.workdir.glob(f"{DATABASE}*"):  # a resumed run's earlier federation
            stale.unlink()
        self._port = free_port()
        if not self.insecure:
            write_tls(self.workdir / "certs")
        self._start_superlink()
        self._write_cli_config()
        for i in range(self.num_nodes):
            node_id = None if self.insecure else self.register(self.key(i))
            self.nodes.append(self._node(i))
            self.start_node(i)
            log.debug("SuperNode %d: node id %s", i, node_id)
        (self.workdir / NODES_JSON).write_text(
            json.dumps(
                [
                    {"index": n.index, "command": n.command, "flwr_home": str(n.home)}
                    for n in self.nodes
                ],
                indent=1,
            )
        )
        self._wait_online()

    @property
    def ca_file(self) -> Path:
        """The CA certificate SuperNodes and the CLI verify the SuperLink with."""
        return self.workdir / "certs" / "ca.crt"

    def key(self, i: int | str) -> Path:
        """The private key of SuperNode ``i`` (created on first use); ``.pub`` beside it."""
        path = self.workdir / "keys" / f"node-{i}"
        if not path.exists():
            write_node_key(path)
        return path

    def register(self, private_key: Path) -> int:
        """Register the public key of ``private_key`` with the SuperLink; its node id."""
        out = self.flwr_json("supernode", "register", f"{private_key}.pub", CONNECTION)
        return int(out["node-id"])

    def node_command(self, i: int, private_key: Path | None = None) -> list[str]:
        """The command of SuperNode ``i``, as a user would run it on another machine (with
        that machine's address for the SuperLink)."""
        security = (
            ["--insecure"]
            if self.insecure
            else [
                "--root-certificates",
                str(self.ca_file),
                "--auth-supernode-private-key",
                str(private_key or self.key(i)),
            ]
        )
        return [
            "flower-supernode",
            "--superlink",
            f"127.0.0.1:{self._port}",
            *security,
            "--node-config",
            f"partition-id={i} num-partitions={self.num_nodes} {self.node_config}".strip(),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--max-wait-time",
            "60",  # give up, rather than retry forever, once the SuperLink is gone
        ]

    def _node(self, i: int) -> Node:
        home = self.workdir / f"node-{i}"
        return Node(i, self.node_command(i), home, self.workdir / f"node-{i}.log")

    def start_node(self, i: int) -> subprocess.Popen:
        """Start (again) SuperNode ``i``."""
        node = self.nodes[i]
        node.process = self._spawn(node.command, node.home, node.log_file)
        return node.process

    def _start_superlink(self) -> None:
        security = (
            ["--insecure"]
            if self.insecure
            else [
                "--ssl-ca-certfile",
                str(self.ca_file),
                "--ssl-certfile",
                str(self.workdir / "certs" / "server.pem"),
                "--ssl-keyfile",
                str(self.workdir / "certs" / "server.key"),
                "--enable-supernode-auth",
            ]
        )
        command = [
            "flower-superlink",
            *security,
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self._port),
            "--database",
            str(self.workdir / DATABASE),  # registrations survive a SuperLink restart
        ]
        logf = self.workdir / "superlink.log"
        self._superlink = self._spawn(command, self.workdir / "superlink", logf)
        deadline = time.monotonic() + START_SECONDS
        while not self._healthy():
            if self._superlink.poll() is not None:
                raise FederationError(
                    f"the SuperLink exited with code {self._superlink.returncode}: {_tail(logf)}"
                    f" (log: {logf})"
                )
            if time.monotonic() > deadline:
                raise FederationError(f"the SuperLink did not answer in time; log: {logf}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        scheme = "http" if self.insecure else "https"
        context = None if self.insecure else ssl.create_default_context(cafile=str(self.ca_file))
        try:
            url = f"{scheme}://127.0.0.1:{self._port}/health"
            with urllib.request.urlopen(url, context=context, timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def _write_cli_config(self) -> None:
        home = self.workdir / "cli"
        home.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if self.insecure else f'root-certificates = "{self.ca_file}"'
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self._port}"\n{security}\n'
        )

    def _wait_online(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            for node in self.nodes:
                assert node.process is not None
                if node.process.poll() is not None:
                    raise FederationError(
                        f"SuperNode {node.index} exited with code {node.process.returncode}: "
                        f"{_tail(node.log_file)} (log: {node.log_file})"
                    )
            online = [n for n in self.flwr_json("supernode", "list")["nodes"] if _online(n)]
            if len(online) >= self.num_nodes:
                return
            if time.monotonic() > deadline:
                raise FederationError(
                    f"{len(online)} of {self.num_nodes} SuperNodes online after "
                    f"{START_SECONDS:.0f} s; their logs: {self.workdir}/node-*.log"
                )
            time.sleep(0.5)

    # -- the flwr CLI ----------------------------------------------------------------------------
    def flwr_command(self, *args: str) -> list[str]:
        """A ``flwr`` CLI command; run it with :meth:`cli_env` to reach this SuperLink."""
        return [_script("flwr"), *args]

    def cli_env(self) -> dict[str, str]:
        """The environment of the ``flwr`` CLI: a private FLWR_HOME naming our SuperLink."""
        return _env(self.workdir / "cli")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation's SuperLink."""
        self._snapshot()
        return subprocess.run(
            self.flwr_command(*args),
            env=self.cli_env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def flwr_json(self, *args: str) -> dict[str, Any]:
        """``flwr ARGS --format json``, parsed; ``FederationError`` with its output if it
        failed."""
        done = self.flwr(*args, "--format", "json")
        try:
            out = json.loads(done.stdout)
        except json.JSONDecodeError:
            out = {}
        if not out.get("success", False):
            self.check()  # a dead SuperLink is the cause to report, not the command it broke
            detail = out.get("error-message") or (done.stdout + done.stderr).strip()[-500:]
            raise FederationError(f"`flwr {' '.join(args)}` failed: {detail}")
        return dict(out)

    def check(self) -> None:
        """Raise ``FederationError`` if the SuperLink has stopped; note the processes it runs."""
        self._snapshot()
        if self._superlink is not None and self._superlink.poll() is not None:
            logf = self.workdir / "superlink.log"
            raise FederationError(
                f"the SuperLink stopped during the run (exit code {self._superlink.returncode}"
                f"; its log: {logf})"
            )

    # -- stopping -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process this federation started, and their children: SIGTERM, then
        SIGKILL after ``STOP_SECONDS``; reap them all. A second Ctrl-C meanwhile is ignored:
        stopping halfway would leave processes behind."""
        with _signals_ignored():
            self._stop()

    def _stop(self) -> None:
        self._snapshot()
        started = self._started()
        for proc in started:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for proc in started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_SECONDS)
        for pid, started_at in self._seen.items():
            if _running(pid, started_at):
                _signal_group(pid, signal.SIGKILL)
        _reap(set(self._seen))

    def _snapshot(self) -> None:
        # The processes we started and their descendants, remembered so that stop() reaches
        # them after their parents are gone. Only these: this process may run others (Ray).
        roots = {proc.pid for proc in self._started()}
        table = process_table()
        for pid in roots | descendants(roots, table):
            if pid in table:
                self._seen.setdefault(pid, table[pid][1])

    def _started(self) -> list[subprocess.Popen]:
        nodes = [n.process for n in self.nodes if n.process is not None]
        return nodes + ([self._superlink] if self._superlink is not None else [])

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, command: list[str], home: Path, log_file: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                [_script(command[0]), *command[1:]],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(home),
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches us alone; we stop them in order
            )
        return proc


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers; only it gets signals
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _online(node: dict[str, Any]) -> bool:
    return str(node.get("status")) == "online"


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _script(name: str) -> str:
    # Flower's console scripts of this Python, even when its bin directory is not on PATH.
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    return " | ".join(line for line in text if line)[-600:] if text else "(empty log)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- processes ------------------------------------------------------------------------------------
def become_subreaper() -> None:
    """Make the orphans of the processes this one starts (a SuperExec whose SuperLink died)
    its children instead of init's, so that ``Federation.stop`` reaps them. Linux only;
    elsewhere the tree snapshots still find them while their parents live. For a command-line
    process: it also inherits the orphans of every other library it runs."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _running(pid: int, started_at: int) -> bool:
    """Whether ``pid`` is the process that started at ``started_at`` and is not a zombie."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and int(fields[19]) == started_at


def _signal_group(pid: int, sig: int) -> None:
    for send in (os.killpg, os.kill):  # its group if it leads one, else itself
        try:
            send(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            continue


def _reap(pids: set[int]) -> None:
    deadline = time.monotonic() + STOP_SECONDS
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # not our child, or reaped already
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
