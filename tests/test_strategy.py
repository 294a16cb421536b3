"""Flower strategies on TFLite clients: hand-computed steps, seeded sampling, every YAML run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, metrics_rows, stable_rows
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian
from flwr.supercore.task_identity import TaskIdentity
from scripted_engine import ScriptedEngine

from fl_ondevice.ondevice.checkpoint import read_checkpoint
from fl_ondevice.ondevice.weights import WeightSpec
from fl_ondevice.seeds import CONFIGURE_TRAIN
from fl_ondevice.server.rounds import train_round
from fl_ondevice.server.strategy import seeded
from fl_ondevice.wire.message import pack_replies, to_arrays
from fl_ondevice.wire.replies import ReplyCheck
from fl_ondevice.wire.transport import FIRST_NODE_ID, ClientGrid

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))


@pytest.fixture
def task_identity():
    """Flower's strategies build messages as a running ServerApp would: give them its identity
    (and put back whatever an engine of this session had set)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _clients_send(updates: dict[int, tuple[np.ndarray, int]]) -> ClientGrid:
    """A ClientGrid whose client c answers with weights ``updates[c][0]`` from
    ``updates[c][1]`` examples."""

    def answer(clients):
        parts = []
        for c in clients:
            w, n = updates[c]
            metrics = MetricRecord({"num-examples": n, "train-loss": 1.0})
            parts.append((c, RecordDict({"arrays": to_arrays({"w": w}), "metrics": metrics})))
        return pack_replies(parts)

    spec = WeightSpec.of({"w": np.zeros(4, np.float32)})
    model = ("0" * 64, b"")
    grid = ClientGrid(ScriptedEngine(answer), len(updates), model, ConfigRecord(), ReplyCheck(spec))
    grid.round = 1
    return grid


W0 = np.array([0.5, -0.2, 0.1, 0.0], np.float32)  # the global model


def test_one_fedadam_server_step_by_hand(task_identity):
    w1 = np.array([0.6, -0.1, 0.1, 0.3], np.float32)
    w2 = np.array([0.2, -0.4, 0.2, 0.3], np.float32)
    grid = _clients_send({0: (w1, 30), 1: (w2, 10)})
    strategy = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, min_available_nodes=1)

    new, _ = train_round(strategy, grid, 1, to_arrays({"w": W0}), ConfigRecord(), seed=0)

    # Adam on the averaged update, from zero moments, bias-corrected as Flower does it
    # (eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) with t the round; Reddi et al. 2021, Alg. 2).
    delta = (30 * w1.astype(np.float64) + 10 * w2) / 40 - W0
    m = (1 - 0.9) * delta
    v = (1 - 0.99) * delta**2
    eta = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    expected = W0 + eta * m / (np.sqrt(v) + 1e-3)
    assert new is not None
    np.testing.assert_allclose(new["w"].numpy(), expected, rtol=1e-5)
    assert new["w"].numpy().dtype == np.float32  # cast back to the model's dtype


def test_one_fedmedian_aggregation_by_hand(task_identity):
    grid = _clients_send(
        {
            0: (np.array([1.0, 9.0, -3.0, 0.0], np.float32), 5),
            1: (np.array([5.0, 2.0, -1.0, 100.0], np.float32), 50),
            2: (np.array([3.0, 4.0, -2.0, 0.5], np.float32), 1),
        }
    )

    new, _ = train_round(
        FedMedian(min_available_nodes=1), grid, 1, to_arrays({"w": W0}), ConfigRecord(), 0
    )

    assert new is not None  # per coordinate: median of (1, 5, 3), (9, 2, 4), ...; weights ignored
    np.testing.assert_array_equal(new["w"].numpy(), [3.0, 4.0, -2.0, 0.5])


def test_flowers_sampling_follows_the_seed_and_round(task_identity):
    grid = _clients_send({c: (W0, 1) for c in range(6)})
    strategy = FedAvg(fraction_train=0.5, min_available_nodes=1)

    def sample(seed: int, r: int) -> list[int]:
        with seeded(seed, r, CONFIGURE_TRAIN):
            msgs = strategy.configure_train(r, to_arrays({"w": W0}), ConfigRecord(), grid)
        return [m.metadata.dst_node_id - FIRST_NODE_ID for m in msgs]

    # Independently: Python's generator seeded from (seed, round, phase), sampling the nodes.
    py_seed = int(np.random.SeedSequence([7, 2, CONFIGURE_TRAIN]).generate_state(2)[0])
    nodes = list(range(FIRST_NODE_ID, FIRST_NODE_ID + 6))
    expected = [n - FIRST_NODE_ID for n in random.Random(py_seed).sample(nodes, 3)]
    state = random.getstate()

    assert sample(7, 2) == expected == sample(7, 2)
    assert len({tuple(sample(7, r)) for r in range(1, 8)}) > 1  # rounds differ
    assert random.getstate() == state  # the global generator is left as it was


# -- every strategy, end to end ----------------------------------------------------------------
COMMON = ("num_clients=6", "num_rounds=2")


def _sampling(name: str) -> tuple[str, ...]:
    # Half the clients per round, so that seeded sampling matters.
    if name.startswith("dp_"):
        return (
            "strategy.strategy.fraction_train=0.5",
            "strategy.strategy.min_train_nodes=3",
            "strategy.num_sampled_clients=3",
        )
    return ("strategy.fraction_train=0.5", "strategy.min_train_nodes=3")


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_runs_and_repeats_exactly_for_a_seed(run, name):
    first = run(*COMMON, f"strategy={name}", *_sampling(name))
    again = run(*COMMON, f"strategy={name}", *_sampling(name), "hydra.job.name=again")

    table = metrics_rows(first)
    assert [r["round"] for r in table] == ["0", "1", "2"]
    assert all(r["clients_sampled"] == "3" for r in table[1:])
    assert stable_rows(first) == stable_rows(again)
    final, initial = read_checkpoint(first / "global_model.ckpt"), _initial_weights(first)
    assert any(not np.array_equal(final[n], initial[n]) for n in final)  # the model moved


def _initial_weights(run_dir: Path) -> dict[str, np.ndarray]:
    from fl_ondevice.ondevice.device import OnDeviceModel

    model_file = json.loads((run_dir / "metrics.json").read_text())["model_file"]
    return OnDeviceModel(model_file).get_weights()


def test_a_users_own_strategy_class_runs_by_target(run, cache, tmp_path):
    out = run("num_clients=2", "num_rounds=1", "strategy._target_=custom_strategy.FirstClientWins")

    # FirstClientWins keeps the update of the first client in client order: client 0's.
    cfg = compose_config(tmp_path, f"cache_dir={cache}", "num_clients=2", "num_rounds=1")
    from fl_ondevice.client.client import local_seed
    from fl_ondevice.ondevice.device import OnDeviceModel
    from fl_ondevice.server.prepare import prepare

    prep = prepare(cfg)
    device = OnDeviceModel(prep.model_file)
    part = prep.partitions[0]
    device.fit(
        prep.dataset.x_train[part.train_indices],
        prep.dataset.y_train[part.train_indices],
        batch_size=cfg.client.batch_size,
        seed=local_seed(cfg.seed, 1, 0),
    )
    got, want = read_checkpoint(out / "global_model.ckpt"), device.get_weights()
    assert all(np.abs(got[n] - want[n]).max() <= 1e-6 for n in want)


def test_fedprox_client_takes_proximal_steps_on_the_device(run, cache, tmp_path):
    # One client, one round of FedProx with a large mu: the global model must equal training
    # the same file centrally through train_proximal, and differ from FedAvg's.
    overrides = ("num_clients=1", "num_rounds=1", "strategy.min_train_nodes=1", "partition=iid")
    prox = run(*overrides, "strategy=fedprox", "strategy.proximal_mu=0.5")
    plain = run(*overrides)
    cfg = compose_config(tmp_path, f"cache_dir={cache}", *overrides)
    from fl_ondevice.client.client import local_seed
    from fl_ondevice.ondevice.device import OnDeviceModel
    from fl_ondevice.server.prepare import prepare

    prep = prepare(cfg)
    (part,) = prep.partitions
    device = OnDeviceModel(prep.model_file)
    device.set_weights(device.get_weights())  # restore: the proximal anchor is the global model
    device.fit(
        prep.dataset.x_train[part.train_indices],
        prep.dataset.y_train[part.train_indices],
        batch_size=cfg.client.batch_size,
        seed=local_seed(cfg.seed, 1, 0),
        proximal_mu=0.5,
    )
    got, want = read_checkpoint(prox / "global_model.ckpt"), device.get_weights()
    fedavg = read_checkpoint(plain / "global_model.ckpt")
    assert max(float(np.abs(got[n] - want[n]).max()) for n in want) <= 1e-6
    assert max(float(np.abs(got[n] - fedavg[n]).max()) for n in want) > 1e-4


def test_fedprox_needs_the_proximal_signature_and_says_so_before_ray(tmp_path, cache, no_engine):
    from guide_model import guide_tflite_bytes

    from fl_ondevice.errors import ModelError
    from fl_ondevice.simulate import simulate

    path = tmp_path / "guide.tflite"
    path.write_bytes(guide_tflite_bytes(flex=False))
    cfg = compose_config(
        tmp_path, f"cache_dir={cache}", "model=tflite", f"model.path={path}", "strategy=fedprox"
    )
    with pytest.raises(ModelError, match=r"no train_proximal\(x, y, mu\) signature.*proximal_mu"):
        simulate(cfg)


ATTACK = ("num_clients=6", "num_rounds=3", "partition=iid", "client.attack.kind=sign_flip")
ATTACK += ("client.attack.fraction=0.17", "client.attack.scale=10")  # 1 of 6 clients


def test_krum_and_the_median_shrug_off_an_attacker_that_breaks_fedavg(run):
    fedavg = metrics_rows(run(*ATTACK))
    honest = metrics_rows(run(*ATTACK, "client.attack.kind=none"))
    krum = metrics_rows(run(*ATTACK, "strategy=krum", "strategy.num_malicious_nodes=1"))
    median = metrics_rows(run(*ATTACK, "strategy=fedmedian"))

    def final(table):
        return float(table[-1]["accuracy"])

    assert final(fedavg) < float(fedavg[0]["accuracy"]) + 0.05  # one reversed x10 update wins
    assert final(honest) > 0.5
    assert final(krum) > 0.5 and final(median) > 0.5


def test_a_resumed_fedadam_run_equals_the_uninterrupted_one(run, tmp_path):
    # FedAdam carries moments from round to round: a resume must restore them, or round 3
    # differs. Interrupt a finished run's record after round 2 and resume it.
    import shutil

    from fl_ondevice.server.resume import resumed_config
    from fl_ondevice.simulate import simulate

    whole = run("num_clients=4", "num_rounds=3", "strategy=fedadam")
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    (cut / "state.json").write_text(
        json.dumps({"round": 2, "checkpoint": "checkpoints/round-2.weights.npz"})
    )
    (cut / "global_model.ckpt").unlink()
    cfg = resumed_config(str(cut))

    simulate(cfg, keep_engine=True)

    assert stable_rows(cut) == stable_rows(whole)
    a, b = read_checkpoint(cut / "global_model.ckpt"), read_checkpoint(whole / "global_model.ckpt")
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_local_dp_noise_follows_the_seed(run):
    local_dp = (
        "+client.mods.localdp._target_=flwr.clientapp.mod.LocalDpMod",
        "+client.mods.localdp.clipping_norm=1.0",
        "+client.mods.localdp.sensitivity=1.0",
        "+client.mods.localdp.epsilon=50.0",
        "+client.mods.localdp.delta=0.01",
    )
    noisy = run(*COMMON, *local_dp)
    again = run(*COMMON, *local_dp, "hydra.job.name=again")
    clean = run(*COMMON)

    assert stable_rows(noisy) == stable_rows(again)
    assert stable_rows(noisy)[1:] != stable_rows(clean)[1:]
