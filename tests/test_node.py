"""A node's own settings and model cache: no client acts on a path or switch it was sent."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config
from flwr.app import ConfigRecord, Context, Message, RecordDict
from scripted_engine import meta
from test_data import write_idx_dataset

from fl_ondevice.client.client_app import app
from fl_ondevice.config import to_run_config
from fl_ondevice.data import datasets, idx
from fl_ondevice.errors import ConfigError, ModelError
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.wire.message import MODEL_MISSING, pack, to_arrays, unpack_replies
from fl_ondevice.wire.node import (
    ENV,
    ModelMissing,
    NodeSettings,
    forget_checked,
    local_node_config,
    model_sha256,
    node_settings,
    received_model,
)


def test_node_settings_come_from_the_environment_then_the_node_config(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert node_settings({}) == NodeSettings(None, True, "~/.cache/fl_ondevice")

    monkeypatch.setenv(ENV, "data-dir='/env/data' download=false cache-dir='/env/cache'")
    assert node_settings({"partition-id": 0}) == NodeSettings("/env/data", False, "/env/cache")
    assert node_settings({"data-dir": "/own"}) == NodeSettings("/own", False, "/env/cache")

    with pytest.raises(ConfigError, match="download='no': use true or false"):
        node_settings({"download": "no"})


def test_the_simulation_gives_its_workers_the_runs_data_and_cache_settings(tmp_path, monkeypatch):
    cfg = compose_config(
        tmp_path, "dataset=fashion_mnist", 'dataset.data_dir="/d/it\'s"', "dataset.download=false"
    )
    monkeypatch.setenv(ENV, local_node_config(cfg))

    assert node_settings({}) == NodeSettings("/d/it's", False, cfg.cache_dir)


def test_a_received_model_is_kept_by_its_hash_and_checked(tmp_path):
    tflite = b"\x1c\x00\x00\x00TFL3 not really a model"
    sha = model_sha256(tflite)
    cache = str(tmp_path / "cache")

    with pytest.raises(ModelMissing):  # never sent: the server must send the bytes
        received_model(sha, None, cache)
    with pytest.raises(ModelError, match="do not hash to"):
        received_model(sha, tflite + b"!", cache)
    path = received_model(sha, tflite, cache)

    assert Path(path) == tmp_path / "cache" / "received" / f"{sha}.tflite"
    assert Path(path).read_bytes() == tflite
    assert received_model(sha, None, cache) == path  # later messages carry the name only

    other = str(tmp_path / "other")  # a damaged copy on disk counts as missing
    received_model(sha, tflite, other)
    (Path(other) / "received" / f"{sha}.tflite").write_bytes(b"truncated")
    forget_checked()  # a new process: nothing checked yet
    with pytest.raises(ModelMissing):
        received_model(sha, None, other)
    with pytest.raises(ModelError, match="not a SHA-256"):
        received_model("../../etc/passwd", None, cache)


@pytest.fixture
def fashion_node(tmp_path, monkeypatch, converted):
    """A train message for client 1 of a tiny Fashion-MNIST run whose run config names the
    server's paths, and a node whose own config points at its own data and cache."""
    monkeypatch.setattr(idx, "SYSTEM_DIRS", {"fashion_mnist": tmp_path / "none"})
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.delenv(ENV, raising=False)
    datasets.clear_cache()
    write_idx_dataset(tmp_path / "node-data", n_train=40, n_test=10)
    cfg = compose_config(
        tmp_path / "server-out",
        "dataset=fashion_mnist",
        "dataset.data_dir=/server/only/data",
        "dataset.download=true",
        "cache_dir=/server/only/cache",
        "num_clients=2",
        "partition=iid",
    )
    _, tflite = converted("mlp", (4, 4))
    path = tmp_path / "m.tflite"
    path.write_bytes(tflite)
    weights = OnDeviceModel(path).get_weights()
    content = RecordDict(
        {"arrays": to_arrays(weights), "config": ConfigRecord({"server-round": 1})}
    )
    packed = pack(content, [1], (model_sha256(tflite), tflite), ConfigRecord(to_run_config(cfg)))
    yield Message(packed, metadata=meta(1, "train")), tmp_path
    datasets.clear_cache()


def _serve(msg: Message, node_config: dict) -> Message:
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return app(msg, ctx)


def test_a_client_reads_its_nodes_data_and_never_the_servers_paths(fashion_node):
    msg, tmp = fashion_node
    node_config = {
        "data-dir": str(tmp / "node-data"),
        "download": False,
        "cache-dir": str(tmp / "node-cache"),
    }

    reply = unpack_replies(_serve(msg, node_config).content, [1])[1]

    assert isinstance(reply, RecordDict), reply
    assert reply["metrics"]["num-examples"] > 0
    assert list((tmp / "node-cache" / "received").iterdir())  # the model, kept by the node
    assert not Path("/server/only").exists()


def test_a_node_that_may_not_download_does_not_although_the_server_says_so(fashion_node):
    msg, tmp = fashion_node
    node_config = {"download": False, "cache-dir": str(tmp / "node-cache")}

    reason = unpack_replies(_serve(msg, node_config).content, [1])[1]

    assert isinstance(reason, str)
    assert "not found and dataset.download=false" in reason


def test_a_node_without_the_model_asks_for_its_bytes(fashion_node):
    msg, tmp = fashion_node
    msg.content.config_records.pop("fl-ondevice.model")  # the name only, never sent before

    reply = _serve(msg, {"cache-dir": str(tmp / "empty-cache")})

    assert reply.has_error() and reply.error.code == MODEL_MISSING
