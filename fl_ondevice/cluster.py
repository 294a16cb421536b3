"""An existing Ray cluster (``backend.address``) as the simulation engine's workers."""

from __future__ import annotations

import logging
import os
import socket

from fl_ondevice.config import Config
from fl_ondevice.errors import ConfigError
from fl_ondevice.node import ENV, local_node_config

CONNECT_SECONDS = 5.0  # a head that does not accept a TCP connection by then is not there


# The cluster this process joined and the node config its workers got; None: local Ray or none.
_JOINED: list[tuple[str, str] | None] = [None]


def connect(cfg: Config) -> None:
    """Join the Ray cluster at ``cfg.backend.address`` (before the engine starts), or say why
    not. Flower's engine then uses this connection instead of starting Ray itself.

    Ray already running in this process for another backend (a sweep's earlier job, local or on
    another cluster) is stopped first, with its engine: Flower's engine would reuse it.
    """
    address = cfg.backend.address
    node_config = local_node_config(cfg)  # the workers' environment: per job, not per node
    joined = None if address is None else (address, node_config)
    import ray

    if ray.is_initialized():
        if _JOINED[0] == joined:
            return
        from fl_ondevice.engine import close_engine

        close_engine()
        ray.shutdown()
        _JOINED[0] = None
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
        ray.init(
            address=address,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {ENV: node_config}},
        )
        _JOINED[0] = joined
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"backend.address={address!r}: cannot join that Ray cluster "
            f"({str(err).strip().splitlines()[0]}); is it a Ray head of the same Ray version?"
        ) from None


def workers(cfg: Config) -> int:
    """Clients the engine trains at once: the cluster's CPUs (this machine's without
    ``backend.address``) divided by ``client.num_cpus``."""
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
