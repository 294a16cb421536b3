"""What a node has of its own: its settings (where its data and caches are) and the models it
received.

A client never acts on a path or a switch that arrives over the network. The server sends the
model's bytes (once per node, then only their SHA-256) and the run config; everything that
touches the node's disk is a *node setting*, read here from the node's own configuration:

- a SuperNode's ``--node-config``: Flower's ``partition-id`` and ``num-partitions``, plus
  ``data-dir`` (the dataset's IDX files), ``download`` (may the node download the dataset) and
  ``cache-dir`` (where it keeps the models it received);
- the environment variable ``FL_ONDEVICE_NODE_CONFIG`` in the same syntax: how the simulation
  gives its workers (simulated nodes, whose node config Flower fills with partitions only) the
  run's ``dataset.data_dir``, ``dataset.download`` and ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from fl_ondevice.config import Config
from fl_ondevice.errors import ConfigError, ModelError

ENV = "FL_ONDEVICE_NODE_CONFIG"
BACKEND_KEY = "node_config"  # the simulation's backend config (not Flower's key): ENV's value
DATA_DIR, DOWNLOAD, CACHE_DIR = "data-dir", "download", "cache-dir"
DEFAULT_CACHE_DIR: str = Config.cache_dir  # the run config's default (a dataclass default)
RECEIVED = "received"  # cache subdirectory of the models a node was sent, by SHA-256


@dataclass(frozen=True)
class NodeSettings:
    """A node's own settings (see the module docstring)."""

    data_dir: str | None = None
    download: bool = True
    cache_dir: str = DEFAULT_CACHE_DIR

    def as_node_config(self) -> dict[str, str | bool]:
        """These settings in node-config keys (what a simulated client's context shows)."""
        items: dict[str, str | bool] = {DOWNLOAD: self.download, CACHE_DIR: self.cache_dir}
        return items if self.data_dir is None else {**items, DATA_DIR: self.data_dir}


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """The settings of the node whose ``node_config`` this is: its environment's
    ``FL_ONDEVICE_NODE_CONFIG`` first, then its node config on top; unset keys keep defaults."""
    merged: dict[str, Any] = {}
    env = os.environ.get(ENV, "")
    if env:
        try:
            merged.update(parse_config_args([env]))
        except Exception as err:  # noqa: BLE001 - click's exception; say which setting
            raise ConfigError(f"{ENV}={env!r} is not a node config ({err})") from None
    merged.update(node_config)
    download = merged.get(DOWNLOAD, True)
    if not isinstance(download, bool):
        raise ConfigError(f"node config {DOWNLOAD}={download!r}: use true or false")
    return NodeSettings(
        data_dir=str(merged[DATA_DIR]) if merged.get(DATA_DIR) else None,
        download=download,
        cache_dir=str(merged.get(CACHE_DIR) or DEFAULT_CACHE_DIR),
    )


def local_node_config(cfg: Config) -> str:
    """The node config of the nodes a run starts on this machine (the simulation's workers,
    ``deploy``'s SuperNodes): the run's data and cache settings."""
    items = {DOWNLOAD: "true" if cfg.dataset.download else "false", CACHE_DIR: cfg.cache_dir}
    if cfg.dataset.data_dir:
        items[DATA_DIR] = cfg.dataset.data_dir
    return " ".join(
        f"{k}={v}" if k == DOWNLOAD else f"{k}={_quoted(str(v))}" for k, v in items.items()
    )


def _quoted(value: str) -> str:
    if "'" in value and '"' in value:
        raise ConfigError(f"{value!r}: a node setting cannot hold both ' and \"")
    return f'"{value}"' if "'" in value else f"'{value}'"


def model_sha256(data: bytes) -> str:
    """The name a model travels under."""
    return hashlib.sha256(data).hexdigest()


class ModelMissing(Exception):
    """The node has no copy of the model and was not sent its bytes."""


_CHECKED: dict[tuple[str, str], str] = {}  # (cache dir, sha256) -> a file checked this process


def forget_checked() -> None:
    """Forget which received model files this process has checked (tests: a new process)."""
    _CHECKED.clear()


def received_model(sha256: str, data: bytes | None, cache_dir: str) -> str:
    """The node's file of the model ``sha256``: ``data`` written to the node's cache (after
    checking that it hashes to ``sha256``), or the copy received earlier.

    Raises ``ModelMissing`` when neither exists (the server then sends the bytes), and
    ``ModelError`` when ``data`` is not what its name says.
    """
    key = (cache_dir, sha256)
    if data is None and key in _CHECKED:
        return _CHECKED[key]
    if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
        raise ModelError(f"model name {sha256!r} is not a SHA-256 digest")
    path = Path(cache_dir).expanduser() / RECEIVED / f"{sha256}.tflite"
    if data is not None:
        if model_sha256(data) != sha256:
            raise ModelError(f"the model bytes received do not hash to {sha256}: corrupted")
        if not (path.is_file() and model_sha256(path.read_bytes()) == sha256):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # workers of one machine may write it at once
    elif not (path.is_file() and model_sha256(path.read_bytes()) == sha256):
        raise ModelMissing(sha256)  # never received, or the cached copy is damaged
    _CHECKED[key] = str(path)
    return str(path)


def run_key(cfg: Config, run_id: int) -> str:
    """One run's name, the same on the server and its clients: the engine's run id and the run
    directory. The run id alone is not enough: the jobs of a sweep share one engine, whose
    simulated runs may share an id."""
    return f"{run_id}-{hashlib.sha256(cfg.output_dir.encode()).hexdigest()[:12]}"


def bottleneck_dir(cfg: Config, run_id: int) -> Path:
    """Where the clients of one run keep their bottlenecks on this host:
    ``cache_dir/bottlenecks/<run key>/``."""
    return Path(os.path.expanduser(cfg.cache_dir)) / "bottlenecks" / run_key(cfg, run_id)
