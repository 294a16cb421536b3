"""The Ray the simulation engine runs on: started on this machine, or an existing cluster
(``backend.address``) joined."""

from __future__ import annotations

import copy
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from fl_ondevice.config import Config
from fl_ondevice.errors import ConfigError
from fl_ondevice.wire.node import BACKEND_KEY, ENV

CONNECT_SECONDS = 5.0  # a head that does not accept a TCP connection by then is not there
# Run by every Ray worker before it imports anything of Flower's: Flower's actor module imports
# TensorFlow when it is installed, ~500 MiB per worker that a Flex-free model never uses.
SETUP_HOOK = "fl_ondevice.ondevice.interpreters.block_tensorflow"

_STARTED: list[dict[str, Any]] = []  # the ray.init arguments of the Ray start_ray last started


def start_ray(
    backend_config: dict[str, Any], stop_engine: Callable[[], None] | None = None
) -> None:
    """Start Ray on this machine, or join the cluster at ``init_args["address"]``, for the
    engine of ``backend_config``, unless this process runs Ray with these settings already;
    a Ray with other ones (a sweep's earlier job) is stopped first, after ``stop_engine`` has
    stopped the engine that ran on it (the caller's: whoever started that engine).

    Flower's engine starts Ray itself only when none runs, and takes no ``runtime_env``. Started
    here, every worker runs :data:`SETUP_HOOK` before its first task, and has
    ``FL_ONDEVICE_NODE_CONFIG`` (the node config) and, on this machine, the ``PYTHONPATH``
    Flower would give it (this process's ``sys.path``, where the apps are) in its environment.
    """
    import ray

    init = dict(backend_config["init_args"])
    env_vars = {ENV: backend_config.get(BACKEND_KEY, "")}
    if init.get("address") == "local":  # not on a cluster: its nodes have paths of their own
        inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
        env_vars["PYTHONPATH"] = os.pathsep.join([*sys.path, *inherited])
    init["runtime_env"] = {"env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK}
    if ray.is_initialized():
        if _STARTED == [init]:
            return
        if stop_engine is not None:
            stop_engine()
        ray.shutdown()
    # ray.init on the main thread installs Ray's own SIGTERM handler, which aborts the process;
    # keep ours (simulate's: stop after the round, exit 143, say how to resume).
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(**copy.deepcopy(init))  # Ray adds its own keys to the runtime_env it is given
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)
    _STARTED[:] = [init]


def connect(
    cfg: Config, backend_config: dict[str, Any], stop_engine: Callable[[], None] | None = None
) -> None:
    """Join the Ray cluster at ``cfg.backend.address`` (before the engine starts, which needs
    its CPUs), or say why not; ``backend_config`` is the engine's. Without an address the
    engine starts Ray on this machine itself.

    Ray already running in this process with other settings (a sweep's earlier job, local or
    on another cluster) is stopped first, after ``stop_engine`` stopped its engine: Flower's
    engine would reuse it.
    """
    address = cfg.backend.address
    if address is None:
        return
    if address != "auto":  # Ray itself would retry a dead address for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
        except OSError as err:
            raise ConfigError(
                f"backend.address={address!r}: no Ray head answers there ({err}); start one "
                "with `ray start --head --port PORT` (it prints the address), or leave "
                "backend.address null to run Ray on this machine"
            ) from None
    try:
        start_ray(backend_config, stop_engine)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"backend.address={address!r}: cannot join that Ray cluster "
            f"({str(err).strip().splitlines()[0]}); is it a Ray head of the same Ray version?"
        ) from None


def engine_workers(cfg: Config) -> int:
    """The engine's workers, the clients it trains at once: the Ray cluster's CPUs (this
    machine's without ``backend.address``) divided by ``client.num_cpus``. The server groups
    each round's clients into messages for them (``fl_ondevice.wire.grouping``)."""
    return max(1, int(_cpus(cfg) // cfg.client.num_cpus))


def check_cpus(cfg: Config) -> None:
    """``ConfigError`` if no client fits on the engine (Flower's engine would crash on it)."""
    cpus = _cpus(cfg)
    if cfg.client.num_cpus > cpus:
        where = "this machine" if cfg.backend.address is None else "the Ray cluster"
        raise ConfigError(
            f"client.num_cpus={cfg.client.num_cpus:g} is more than the {cpus:g} CPUs of {where}, "
            "so no client could run; use at most that many"
        )


def _cpus(cfg: Config) -> float:
    if cfg.backend.address is not None:
        import ray

        if ray.is_initialized():
            return float(ray.cluster_resources().get("CPU", 0.0))
    return float(os.cpu_count() or 1)
