"""Shared fixtures: converted models are built once per test session (conversion takes seconds)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fl_ondevice.config import ModelConfig
from fl_ondevice.export import convert
from fl_ondevice.model import TrainableModel, build_model

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
