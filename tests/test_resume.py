"""What a resume reads back: the strategy's own state, saved after every round."""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
)

from fl_ondevice.resume import restore_strategy_state, strategy_state


def test_strategy_state_round_trips_every_layer_and_kind():
    # Prepare: state as rounds leave it, in a DP wrapper around FedAvgM, and in FedAdam.
    wrapped = DifferentialPrivacyServerSideAdaptiveClipping(FedAvgM(), 0.1, 10)
    wrapped.clipping_norm = 0.37
    inner = wrapped.strategy
    assert isinstance(inner, FedAvgM)
    inner.momentum_vector = [np.arange(3.0), np.ones((2, 2), np.float32)]
    adam = FedAdam()
    adam.m_t = {"w": np.full(2, 0.5)}
    adam.v_t = {"w": np.full(2, 0.25)}

    saved_dp, saved_adam = strategy_state(wrapped), strategy_state(adam)
    fresh_dp = DifferentialPrivacyServerSideAdaptiveClipping(FedAvgM(), 0.1, 10)
    fresh_adam = FedAdam()
    restore_strategy_state(fresh_dp, saved_dp)
    restore_strategy_state(fresh_adam, saved_adam)

    assert fresh_dp.clipping_norm == 0.37 and isinstance(fresh_dp.clipping_norm, float)
    momentum = fresh_dp.strategy.momentum_vector  # type: ignore[attr-defined]
    assert isinstance(momentum, list) and len(momentum) == 2
    np.testing.assert_array_equal(momentum[0], np.arange(3.0))
    assert momentum[1].dtype == np.float32
    assert fresh_adam.m_t is not None and fresh_adam.v_t is not None
    np.testing.assert_array_equal(fresh_adam.m_t["w"], [0.5, 0.5])
    np.testing.assert_array_equal(fresh_adam.v_t["w"], [0.25, 0.25])
    assert "strategy/current_arrays" not in saved_adam  # rebuilt from the global model


def test_a_stateless_strategy_saves_only_its_settings():
    state = strategy_state(FedAvg(fraction_train=0.5))

    assert all(v.ndim == 0 for v in state.values())
    assert float(state["strategy/fraction_train"]) == 0.5
