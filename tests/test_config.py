"""The configuration: Hydra defaults, Flower's run config, and their translation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict
from hydra import compose, initialize_config_dir

from fl_ondevice.config import (
    Config,
    from_run_config,
    messages_per_round,
    parse_config,
    to_run_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _default(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return parse_config(compose("config", overrides=["output_dir=out", *overrides]))


def test_run_config_round_trip_keeps_every_value_including_nulls():
    cfg = _default("client.batch_size=null", "target_accuracy=0.9", "dataset.data_dir=/d")
    assert from_run_config(to_run_config(cfg)) == cfg
    assert to_run_config(cfg)["client.batch-size"] == ""


def test_flwr_run_config_in_pyproject_equals_the_hydra_defaults():
    # `flwr run` reads [tool.flwr.app.config]; it must describe the same run as the defaults.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    hydra = to_run_config(_default())

    differing = {
        k: (flwr.get(k), hydra.get(k))
        for k in set(flwr) | set(hydra)
        if flwr.get(k) != hydra.get(k) and k not in ("output-dir", "cache-dir")
    }
    assert differing == {}
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fl_ondevice.server_app:app",
        "clientapp": "fl_ondevice.client_app:app",
    }


def test_every_group_option_composes_and_validates():
    for group in ("dataset", "model", "partition", "strategy", "client"):
        for option in sorted((ROOT / "conf" / group).glob("*.yaml")):
            extra = ["model.path=x.tflite"] if option.stem == "tflite" else []
            cfg = _default(f"{group}={option.stem}", *extra)
            assert getattr(cfg, group).__class__.__name__.endswith("Config")


@pytest.mark.parametrize(
    ("clients", "workers", "per_message", "expected"),
    [
        (100, 2, None, 8),  # many clients: 4 messages per worker
        (33, 2, None, 8),
        (32, 2, None, 32),  # up to 16 clients per worker: one message each
        (10, 2, None, 10),
        (1, 4, None, 1),
        (100, 2, 1, 100),  # one client per message
        (100, 2, 30, 4),  # ceil(100 / 30)
    ],
)
def test_messages_per_round(clients, workers, per_message, expected):
    assert messages_per_round(clients, workers, per_message) == expected
