"""Checkpoint files: round trips, and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import numpy as np
import pytest

from fl_ondevice.errors import CheckpointError
from fl_ondevice.ondevice.checkpoint import read_checkpoint, write_checkpoint
from fl_ondevice.ondevice.weights import WeightSpec


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "b/bias": rng.normal(size=(3,)).astype(np.float32),
        "a/kernel": rng.normal(size=(4, 3)).astype(np.float32),
    }


def test_write_then_read_is_bitwise_identical_and_sorted(tmp_path):
    weights = _weights()
    write_checkpoint(tmp_path / "w.ckpt", weights)

    back = read_checkpoint(tmp_path / "w.ckpt")

    assert list(back) == ["a/kernel", "b/bias"]
    for name, value in weights.items():
        assert back[name].dtype == value.dtype
        assert back[name].tobytes() == value.tobytes()


def test_read_rejects_truncated_file_naming_it(tmp_path):
    path = tmp_path / "w.ckpt"
    write_checkpoint(path, _weights())
    path.write_bytes(path.read_bytes()[:40])

    with pytest.raises(CheckpointError, match=r"w\.ckpt.*cannot be read as a TF checkpoint"):
        read_checkpoint(path)


def test_read_rejects_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.*corrupt, truncated or of another format"):
        read_checkpoint(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("b/bias"), r"missing tensors \['b/bias'\]"),
        (lambda w: w.update(extra=np.zeros(1, np.float32)), r"unexpected tensors \['extra'\]"),
        (
            lambda w: w.update({"a/kernel": np.zeros((3, 4), np.float32)}),
            r"'a/kernel' has shape \(3, 4\), the model expects \(4, 3\)",
        ),
        (
            lambda w: w.update({"b/bias": np.zeros(3, np.float64)}),
            "'b/bias' has dtype float64, the model expects float32",
        ),
    ],
)
def test_spec_names_the_mismatching_tensor(change, message):
    spec = WeightSpec.of(_weights())
    bad = _weights()
    change(bad)

    with pytest.raises(CheckpointError, match=message):
        spec.validate(bad, "update")


def test_spec_counts_bytes():
    assert WeightSpec.of(_weights()).num_bytes == (4 * 3 + 3) * 4
