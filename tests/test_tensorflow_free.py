"""Clients import no TensorFlow: not in the simulation's Ray workers, not in a fresh process
that trains and evaluates a client the way the ClientApp does (TF stays on the server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import compose_config, metrics_rows

from fl_ondevice.client.client import client_data, evaluate_client, train_client
from fl_ondevice.config import to_run_config
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.interpreters import tensorflow_imported
from fl_ondevice.wire.node import local_node_config

PROBE = "+client.mods.probe._target_=probe_client.TensorflowProbe"
TF_PACKAGES = ("tensorflow", "keras", "tf_keras")


def test_simulation_workers_train_without_importing_tensorflow(run, cache, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()

    out = run("num_clients=4", "num_rounds=2", PROBE, f"+client.mods.probe.report_dir={reports}")

    found = [json.loads(p.read_text()) for p in reports.glob("*.json")]
    assert found, "no worker reported: the probe mod did not run"
    assert {r["pid"] for r in found}.isdisjoint({os.getpid()})  # they ran in Ray's workers
    # Blocked by the setup hook before Flower's actor module could import it.
    assert [r for r in found if r["imported"] or not r["blocked"]] == []
    # The node config came with the hook, in the runtime_env (not this process's environment).
    expected = local_node_config(compose_config(tmp_path / "cfg", f"cache_dir={cache}"))
    assert {r["node_config"] for r in found} == {expected}
    rows = metrics_rows(out)[1:]
    assert [(r["clients_replied"], r["clients_failed"]) for r in rows] == [("4", "0")] * 2
    assert tensorflow_imported()  # while the server side (this process) built the model with TF


# A fresh interpreter: what a worker or a deployed SuperNode's ClientApp process imports, then a
# client's train and evaluate calls; it prints which TF modules it ended up with.
CHILD = f"""
import json, sys
import numpy as np
import fl_ondevice.client.client_app
from fl_ondevice.client.client import evaluate_client, train_client
from fl_ondevice.config import from_run_config
from fl_ondevice.ondevice.pool import pooled_model

run_config, model_file, weights_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = from_run_config(run_config)
model = pooled_model(model_file)
update = train_client(cfg, model, model.stage(model.initial_weights()), 1, 1)
result = evaluate_client(cfg, model, model.stage(update.weights), 1, 1)
np.savez(weights_file, **update.weights)
tf = sorted(m for m in sys.modules if m.split(".")[0] in {TF_PACKAGES!r})
print(json.dumps(dict(
    tf=tf, examples=update.num_examples, loss=update.train_loss,
    eval_examples=result.num_examples, eval_loss=result.loss, accuracy=result.accuracy,
)))
"""


def test_a_client_trains_and_evaluates_in_a_process_without_tensorflow(converted, tmp_path):
    cfg = compose_config(tmp_path, "num_clients=3")
    model_file = tmp_path / "mlp.tflite"
    model_file.write_bytes(converted("mlp")[1])
    weights_file = tmp_path / "update.npz"

    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(to_run_config(cfg)), model_file, weights_file],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )

    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["tf"] == []
    # The same client here, where TensorFlow is loaded: the same numbers, bit for bit.
    model = OnDeviceModel(model_file)
    update = train_client(cfg, model, model.stage(model.initial_weights()), 1, 1)
    result = evaluate_client(cfg, model, model.stage(update.weights), 1, 1)
    part = client_data(cfg)[1][1]
    assert got["examples"] == update.num_examples == len(part.train_indices) > 0
    assert got["eval_examples"] == len(part.test_indices) > 0
    assert (got["loss"], got["eval_loss"], got["accuracy"]) == (
        update.train_loss,
        result.loss,
        result.accuracy,
    )
    with np.load(weights_file) as sent:
        assert sorted(sent.files) == sorted(update.weights)
        for name, value in update.weights.items():
            np.testing.assert_array_equal(sent[name], value)


# A fresh driver process: what a run whose converted model is cached does before its end
# (prepare, importing Flower's simulation engine, central evaluation, saving a round, resuming
# from it); it prints which TF modules it ended up with, then imports TensorFlow (the end's
# checkpoint) to show that still works.
SERVER_CHILD = f"""
import json, sys
from pathlib import Path
import numpy as np
import fl_ondevice.runtime.engine, fl_ondevice.server.server_app, fl_ondevice.simulate
from fl_ondevice.config import from_run_config
from fl_ondevice.ondevice.device import evaluate_split
from fl_ondevice.outputs.results import MetricsLog
from fl_ondevice.server.resume import load_resume_point, save_round
from fl_ondevice.server.prepare import prepare
from fl_ondevice.simulate import import_flower_simulation

cfg = from_run_config(json.loads(sys.argv[1]))
prep = prepare(cfg)
import_flower_simulation()
from flwr.simulation import run_simulation
weights = prep.server_model.initial_weights()
central = evaluate_split([prep.server_model], weights, prep.dataset.test_x(), prep.dataset.y_test)
out = Path(cfg.output_dir)
row = dict(round=0, accuracy=central["accuracy"], loss=central["loss"])
save_round(out, 0, weights, prep.strategy, MetricsLog(out, {{}}), row)
back = load_resume_point(out, prep.server_model.weight_spec)
same = all(back.weights[n].tobytes() == w.tobytes() for n, w in weights.items())
tf = sorted(m for m in sys.modules if m.split(".")[0] in {TF_PACKAGES!r})
from fl_ondevice.ondevice.checkpoint import write_checkpoint
write_checkpoint(out / "global_model.ckpt", weights)
print(json.dumps(dict(tf=tf, accuracy=central["accuracy"], resumed=back.round, same=same)))
"""


def test_a_server_with_a_cached_model_runs_its_rounds_without_tensorflow(cache, tmp_path):
    from fl_ondevice.server.prepare import prepare

    cfg = compose_config(tmp_path / "run", f"cache_dir={cache}", "num_clients=3")
    prep = prepare(cfg)  # here, with TensorFlow: converts the model into the cache if need be
    expected = prep.server_model.evaluate(prep.dataset.x_test, prep.dataset.y_test)["accuracy"]

    child = subprocess.run(
        [sys.executable, "-c", SERVER_CHILD, json.dumps(to_run_config(cfg))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )

    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got == {"tf": [], "accuracy": expected, "resumed": 0, "same": True}
