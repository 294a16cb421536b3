"""`flwr run`: Flower's CLI runs the same ServerApp and ClientApp as fl_ondevice.simulate."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import stable_rows

ROOT = Path(__file__).resolve().parents[1]


def _stop_superlinks(flwr_home: Path) -> None:
    # `flwr` starts a local SuperLink in the background; stop the one this test's FLWR_HOME made.
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        if f"FLWR_HOME={flwr_home}".encode() in environ.split(b"\0"):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass


@pytest.mark.slow  # starts a SuperLink and a simulation: ~40 s
def test_flwr_run_gives_the_metrics_of_the_hydra_run(tmp_path, run):
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        # Use this environment's packages instead of a fresh per-run uv environment.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    try:
        subprocess.run(
            ["flwr", "federation", "simulation-config", "@none/default", "local",
             "--num-supernodes", "10"],
            cwd=ROOT, env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        proc = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config",
             f"num-rounds=3 output-dir='{out}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        _stop_superlinks(home)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert stable_rows(out) == stable_rows(run("num_rounds=3"))
