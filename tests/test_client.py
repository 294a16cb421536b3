"""A client's local update without Flower: no state leaks through a pooled interpreter."""

from __future__ import annotations

import pytest

from fl_ondevice.client import local_seed, train_client
from fl_ondevice.config import Config, ModelConfig
from fl_ondevice.device import clear_pool, pooled_model
from fl_ondevice.export import build_tflite


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
    fresh = train_client(cfg, path, client_id=1, server_round=3, weights=start)

    clear_pool()
    train_client(cfg, path, client_id=0, server_round=3, weights=start)  # leaves slots behind
    reused = train_client(cfg, path, client_id=1, server_round=3, weights=start)

    assert reused.num_examples == fresh.num_examples
    assert reused.train_loss == fresh.train_loss
    assert all(reused.weights[n].tobytes() == fresh.weights[n].tobytes() for n in start)
    assert any(reused.weights[n].tobytes() != start[n].tobytes() for n in start)


def test_local_seed_differs_per_round_and_client_and_is_stable():
    seeds = {local_seed(0, r, c) for r in range(1, 4) for c in range(5)}
    assert len(seeds) == 15
    assert local_seed(0, 2, 3) == local_seed(0, 2, 3)
    assert local_seed(0, 2, 3) != local_seed(1, 2, 3)
