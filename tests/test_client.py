"""A client's local update without Flower: no state leaks through a pooled interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from fl_ondevice.client.client import StagedWeights, attacked, attackers, local_seed, train_client
from fl_ondevice.config import AttackConfig, ClientConfig, Config, ModelConfig
from fl_ondevice.ondevice.convert import build_tflite
from fl_ondevice.ondevice.pool import clear_pool, pooled_model


def _update(cfg: Config, path: str, client: int, start: dict, mu: float = 0.0):
    model = pooled_model(path)
    staged = StagedWeights().get(model, start, lambda: start)
    return train_client(cfg, model, staged, client, server_round=3, proximal_mu=mu)


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(name="mlp", learning_rate=0.05, momentum=0.9),
        ModelConfig(name="mlp", optimizer="adam", learning_rate=0.01),
    ],
    ids=["momentum", "adam"],
)
def test_update_in_reused_interpreter_equals_update_in_fresh_one(tmp_path, model):
    cfg = Config(model=model, num_clients=4)
    path = str(build_tflite(model, (8, 8), 10, cfg.seed, tmp_path))
    clear_pool()
    start = pooled_model(path).get_weights()
    fresh = _update(cfg, path, 1, start)

    clear_pool()
    _update(cfg, path, 0, start, mu=0.5)  # leaves optimizer slots and a proximal step behind
    reused = _update(cfg, path, 1, start)

    assert reused.num_examples == fresh.num_examples
    assert reused.train_loss == fresh.train_loss
    assert all(reused.weights[n].tobytes() == fresh.weights[n].tobytes() for n in start)
    assert any(reused.weights[n].tobytes() != start[n].tobytes() for n in start)


def test_weights_are_staged_once_per_received_object():
    class Model:  # counts the weights it checked
        def __init__(self) -> None:
            self.staged = 0

        def stage(self, weights: dict) -> str:
            self.staged += 1
            return f"staged-{self.staged}"

    model, staged = Model(), StagedWeights()
    received, other = object(), object()
    got = [staged.get(model, received, dict) for _ in range(3)]  # 3 clients, 1 message
    got.append(staged.get(model, other, dict))  # the next message

    assert got == ["staged-1", "staged-1", "staged-1", "staged-2"]


def test_attackers_are_a_seeded_share_of_the_clients():
    chosen = attackers(seed=0, num_clients=10, fraction=0.3)

    assert len(chosen) == 3 and chosen <= set(range(10))
    assert chosen == attackers(0, 10, 0.3)
    assert attackers(0, 10, 0.0) == frozenset()
    assert {frozenset(attackers(s, 10, 0.3)) for s in range(5)} != {chosen}  # depends on seed


def test_attacks_send_scaled_or_reversed_updates():
    g = {"w": np.array([1.0, 2.0], np.float32)}
    w = {"w": np.array([1.5, 1.0], np.float32)}  # the honest update: delta = (0.5, -1.0)

    flipped = attacked(w, g, "sign_flip", 2.0)["w"]
    scaled = attacked(w, g, "scale", 10.0)["w"]

    np.testing.assert_array_equal(flipped, [0.0, 4.0])  # g - 2 * delta
    np.testing.assert_array_equal(scaled, [6.0, -8.0])  # g + 10 * delta
    assert flipped.dtype == np.float32


def test_an_attacking_client_sends_the_reversed_update(tmp_path):
    model = ModelConfig(name="mlp", learning_rate=0.1)
    path = str(build_tflite(model, (8, 8), 10, 0, tmp_path))
    honest = Config(model=model, num_clients=4)
    attack = AttackConfig(kind="sign_flip", fraction=1.0, scale=1.0)
    evil = Config(model=model, num_clients=4, client=ClientConfig(attack=attack))
    clear_pool()
    start = pooled_model(path).get_weights()

    good = _update(honest, path, 2, start).weights
    bad = _update(evil, path, 2, start).weights

    for n in start:
        np.testing.assert_allclose(bad[n] - start[n], -(good[n] - start[n]), atol=1e-6)


def test_local_seed_differs_per_round_and_client_and_is_stable():
    seeds = {local_seed(0, r, c) for r in range(1, 4) for c in range(5)}
    assert len(seeds) == 15
    assert local_seed(0, 2, 3) == local_seed(0, 2, 3)
    assert local_seed(0, 2, 3) != local_seed(1, 2, 3)
