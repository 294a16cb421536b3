"""The configuration: Hydra defaults, Flower's run config, and their translation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict
from hydra import compose, initialize_config_dir

from fl_ondevice.config import Config, from_run_config, parse_config, to_run_config
from fl_ondevice.errors import ConfigError
from fl_ondevice.ondevice.device import EVAL_BATCH_SIZE
from fl_ondevice.wire.grouping import messages_per_round

ROOT = Path(__file__).resolve().parents[1]


def _default(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return parse_config(compose("config", overrides=["output_dir=out", *overrides]))


def test_run_config_round_trip_keeps_every_value_including_nulls():
    cfg = _default(
        "client.batch_size=null",
        "target_accuracy=0.9",
        "dataset.data_dir=/d",
        "strategy=dp_client_fixed",  # nested strategy and mods
        "device=phones",  # a mapping of device classes
        "round.deadline_s=30",
    )
    assert from_run_config(to_run_config(cfg)) == cfg
    assert to_run_config(cfg)["client.batch-size"] == ""
    assert to_run_config(cfg)["strategy.strategy.-target-"] == "fl_ondevice.server.fedavg.FedAvg"


def test_model_transfer_composes_with_its_classes_and_lists_survive_the_run_config():
    cfg = _default("model=transfer")
    override = _default("model=transfer", "dataset.classes=[9,8,7]", "model.base_classes=[0,1]")

    assert (cfg.model.name, cfg.dataset.classes, cfg.model.base_classes) == (
        "transfer",
        [5, 6, 7, 8, 9],
        [0, 1, 2, 3, 4],
    )
    assert override.dataset.classes == [9, 8, 7] and override.model.base_classes == [0, 1]
    assert to_run_config(cfg)["dataset.classes"] == "5,6,7,8,9"
    assert from_run_config(to_run_config(cfg)) == cfg
    assert from_run_config(to_run_config(_default())).dataset.classes is None


def test_flwr_run_config_in_pyproject_equals_the_defaults():
    # `flwr run` reads [tool.flwr.app.config]; it must describe the same run as the defaults.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    hydra = to_run_config(_default())

    differing = {
        k: (flwr.get(k), hydra.get(k))
        for k in set(flwr) | set(hydra)
        if flwr.get(k) != hydra.get(k) and k != "output-dir"
    }
    assert differing == {}
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fl_ondevice.server.server_app:app",
        "clientapp": "fl_ondevice.client.client_app:app",
    }


def test_defaults_live_in_the_config_dataclasses_only():
    # The composed defaults are the dataclasses' (conf/ holds only what differs from them),
    # apart from the strategy, which only conf/strategy/*.yaml describes.
    composed = _default()
    bare = parse_config({"output_dir": "out", "strategy": composed.strategy})
    assert composed.dataset == bare.dataset and composed.model == bare.model
    assert composed.partition == bare.partition and composed.client == bare.client
    assert (composed.num_rounds, composed.seed, composed.num_clients) == (50, 0, 10)
    assert composed.cache_dir == bare.cache_dir == "~/.cache/fl_ondevice"
    # OnDeviceModel's default batch is the run's: the config cannot import the interpreter.
    assert composed.eval_batch_size == EVAL_BATCH_SIZE


# Options that need a path to validate.
EXTRA = {"tflite": ["model.path=x.tflite"], "files": ["dataset.path=x.npz"]}


def test_every_group_option_composes_and_validates():
    from fl_ondevice.server.strategy import make_strategy

    for group in ("dataset", "model", "partition", "strategy"):
        for option in sorted((ROOT / "conf" / group).glob("*.yaml")):
            extra = EXTRA.get(option.stem, [])
            cfg = _default(f"{group}={option.stem}", *extra)
            make_strategy(cfg)  # every strategy YAML builds its Flower class


def test_an_unknown_key_is_refused_with_its_name():
    with pytest.raises(ConfigError, match="Key 'typo_key' not in 'Config'"):
        _default("+typo_key=3")


def test_an_unknown_update_encoding_names_the_choices():
    with pytest.raises(
        ConfigError,
        match=r"client.update_encoding='bf16' is invalid: choose one of "
        r"\('float32', 'float16', 'int8'\)",
    ):
        _default("client.update_encoding=bf16")


def test_a_bad_strategy_argument_names_what_the_class_takes():
    from fl_ondevice.server.strategy import make_strategy

    with pytest.raises(
        ConfigError, match=r"unexpected keyword argument 'proximal_mu'.*FedAvg takes"
    ):
        make_strategy(_default("+strategy.proximal_mu=0.1"))
    with pytest.raises(ConfigError, match="strategy._target_='nowhere.Strategy' cannot be loaded"):
        make_strategy(_default("strategy._target_=nowhere.Strategy"))
    with pytest.raises(
        ConfigError, match=r"num_sampled_clients=10 is invalid: the inner strategy samples 3"
    ):
        make_strategy(_default("strategy=dp_server_fixed", "strategy.strategy.fraction_train=0.3"))


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


def test_a_mod_that_cannot_be_built_is_named_before_anything_runs(tmp_path, no_engine):
    from conftest import compose_config

    from fl_ondevice.simulate import simulate

    # LocalDpMod without its arguments
    cfg = compose_config(tmp_path, "+client.mods.bad._target_=flwr.clientapp.mod.LocalDpMod")

    with pytest.raises(ConfigError, match=r"client.mods.bad cannot be built.*clipping_norm"):
        simulate(cfg)
