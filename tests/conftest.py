"""Shared fixtures: converted models are built once per test session (conversion takes seconds)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir

from fl_ondevice.config import Config, ModelConfig, parse_config
from fl_ondevice.ondevice.convert import convert
from fl_ondevice.ondevice.model import TrainableModel, build_model
from fl_ondevice.outputs.results import TIME_COLUMNS

# Files with Flex (select TF) ops run only on an interpreter that links the Flex delegate:
# TensorFlow's up to 2.18 (the `flex` extra). Elsewhere the tests marked `flex` are skipped.
FLEX = tuple(int(v) for v in tf.__version__.split(".")[:2]) < (2, 19)
FLEX_REASON = (
    f"TensorFlow {tf.__version__}'s interpreter has no Flex delegate; "
    "these run in the flex environment: pip install -e '.[flex]' (Python <= 3.12)"
)


def pytest_collection_modifyitems(config, items):
    if FLEX:
        return
    skip = pytest.mark.skip(reason=FLEX_REASON)
    for item in items:
        if "flex" in item.keywords:
            item.add_marker(skip)


def flex_param(*values):
    """A ``pytest.param`` marked ``flex`` (for parametrizations with a Flex file)."""
    return pytest.param(*values, marks=pytest.mark.flex)


Converted = tuple[TrainableModel, bytes]
_CONVERTED: dict[tuple, bytes] = {}


@pytest.fixture(scope="session")
def converted() -> Callable[..., Converted]:
    """``converted(name, shape, **optimizer)`` -> (fresh TF module, .tflite of the same weights).

    The TF module is built anew on every call (tests train it), the conversion is cached: both
    come from the same seed, so they start from identical weights.
    """

    def make(name: str = "mlp", shape: tuple[int, int] = (8, 8), seed: int = 0, **opt) -> Converted:
        cfg = ModelConfig(name=name, **opt)
        key = (name, shape, seed, tuple(sorted(opt.items())))
        module = build_model(cfg, shape, 10, seed)
        if key not in _CONVERTED:
            _CONVERTED[key] = convert(module)
        return module, _CONVERTED[key]

    return make


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test), images (N, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(out: Path, *overrides: str) -> Config:
    """The real Hydra composition of conf/config.yaml, validated, writing into ``out``."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        dcfg = compose("config", overrides=[*overrides, f"output_dir={out}"])
    return parse_config(dcfg)


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> str:
    """A conversion cache shared by the session's simulations."""
    return str(tmp_path_factory.mktemp("tflite-cache"))


@pytest.fixture(scope="session", autouse=True)
def _one_engine_per_session():
    """In-process simulations share one engine (Ray and its workers start once): see
    ``simulate(keep_engine=True)``; it stops when the session ends."""
    yield
    from fl_ondevice.runtime.engine import close_engine

    close_engine()


@pytest.fixture(scope="session")
def run(tmp_path_factory, cache):
    """``run(*overrides)`` -> run directory of an in-process simulation (memoised per session)."""
    from fl_ondevice.simulate import simulate

    done: dict[tuple, Path] = {}

    def _run(*overrides: str) -> Path:
        if overrides not in done:
            out = tmp_path_factory.mktemp("run")
            simulate(compose_config(out, f"cache_dir={cache}", *overrides), keep_engine=True)
            done[overrides] = out
        return done[overrides]

    return _run


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv of a run directory as a list of rows."""
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def stable_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the timing and memory columns: equal for runs of one seed."""
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in metrics_rows(run_dir)]


def reply(content, client: int = 0):
    """A train reply from ``client`` (node 1,000,000 + client) carrying ``content``: what a
    strategy's aggregate_train receives."""
    from flwr.app import Message
    from flwr.app.metadata import Metadata

    meta = Metadata(
        run_id=1,
        message_id="",
        src_node_id=1_000_000 + client,
        dst_node_id=1,
        reply_to_message_id=f"m{client}",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(content, metadata=meta)


@pytest.fixture
def no_engine(monkeypatch):
    """Fails the test if a simulation engine (Ray) is asked for: bad input must stop first."""
    import fl_ondevice.runtime.engine

    def refuse(*args, **kwargs):
        raise AssertionError("the simulation engine was started")

    monkeypatch.setattr(fl_ondevice.runtime.engine, "engine_for", refuse)
