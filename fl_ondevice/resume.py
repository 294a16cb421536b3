"""What a run keeps on disk after every round, and how an interrupted run continues from it.

After round r: ``checkpoints/round-r.ckpt`` (the global weights), ``checkpoints/round-r.npz``
(the strategy's own state, e.g. FedAdam's moments), the metrics, then ``state.json`` naming the
round, in that order and each written atomically: ``state.json`` always names a round whose
files are complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from fl_ondevice.checkpoint import Weights, WeightSpec, read_checkpoint, write_checkpoint
from fl_ondevice.config import Config, parse_config
from fl_ondevice.errors import ResumeError
from fl_ondevice.results import METRICS_JSON, MetricsLog
from fl_ondevice.strategy import layers

log = logging.getLogger(__name__)

STATE_JSON = "state.json"  # the last completed round and its checkpoint: what resume reads
CHECKPOINT_DIR = "checkpoints"  # the global weights after the last two completed rounds
RESOLVED_CONFIG = "config.yaml"  # every value this run used, defaults included
_SKIP = {"current_arrays"}  # set from the global model at the start of every round


@dataclass(frozen=True)
class ResumePoint:
    """The last completed round of an interrupted run."""

    round: int
    weights: Weights
    rows: list[dict[str, Any]]
    strategy_state: dict[str, np.ndarray]


def save_round(
    out: Path, r: int, weights: Weights, strategy: Strategy, metrics: MetricsLog, row: dict
) -> None:
    """Persist round ``r``: checkpoint and strategy state, then metrics, then ``state.json``."""
    (out / CHECKPOINT_DIR).mkdir(exist_ok=True)
    ckpt = Path(CHECKPOINT_DIR) / f"round-{r}.ckpt"
    write_checkpoint(out / ckpt, weights)
    state = out / CHECKPOINT_DIR / f"round-{r}.npz"
    tmp = state.with_suffix(".tmp.npz")
    np.savez(tmp, **strategy_state(strategy))
    os.replace(tmp, state)
    metrics.append(row)
    tmp_json = out / f"{STATE_JSON}.tmp"
    tmp_json.write_text(json.dumps({"round": r, "checkpoint": str(ckpt)}))
    os.replace(tmp_json, out / STATE_JSON)
    for old in (out / CHECKPOINT_DIR).glob("round-*.*"):  # keep this round's and the last
        if int(old.name.split("-")[1].split(".")[0]) < r - 1:
            old.unlink()


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The numbers a strategy carries from round to round, as arrays keyed by attribute path.

    Every layer's scalar attributes and its dicts and lists of arrays (FedAdam's ``m_t`` and
    ``v_t``, FedAvgM's ``momentum_vector``, an adaptive DP wrapper's ``clipping_norm``, ...).
    """
    state: dict[str, np.ndarray] = {}
    for key, layer in layers(strategy):
        for name, value in vars(layer).items():
            if name in _SKIP or name.startswith("_"):
                continue
            if isinstance(value, bool | int | float) and not isinstance(value, np.ndarray):
                state[f"{key}/{name}"] = np.asarray(value)
            elif _arrays(value):
                items = value.items() if isinstance(value, dict) else enumerate(value)
                for sub, array in items:
                    state[f"{key}/{name}/{sub}"] = np.asarray(array)
    return state


def _arrays(value: Any) -> bool:
    values = value.values() if isinstance(value, dict) else value
    return (
        isinstance(value, dict | list)
        and bool(value)
        and all(isinstance(v, np.ndarray) for v in values)
    )


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Set the attributes :func:`strategy_state` saved back on the strategy's layers."""
    by_layer = dict(layers(strategy))
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for path, array in state.items():
        key, name, *sub = path.split("/", 2)
        if key not in by_layer:
            continue
        if not sub:
            current = getattr(by_layer[key], name, None)
            kind = type(current) if isinstance(current, bool | int | float) else float
            setattr(by_layer[key], name, kind(array.item()))
        else:
            grouped.setdefault((key, name), {})[sub[0]] = array
    for (key, name), parts in grouped.items():
        if all(k.isdigit() for k in parts) and not isinstance(
            getattr(by_layer[key], name, None), dict
        ):
            setattr(by_layer[key], name, [parts[k] for k in sorted(parts, key=int)])
        else:
            setattr(by_layer[key], name, dict(parts))


def load_resume_point(out: Path, spec: WeightSpec) -> ResumePoint:
    """Read where an interrupted run stopped; ``ResumeError`` if it cannot be continued."""
    state = json.loads(state_file(out).read_text())
    weights = read_checkpoint(out / state["checkpoint"])
    spec.validate(weights, f"resume checkpoint {state['checkpoint']!r}")
    rows = [
        row
        for row in json.loads((out / METRICS_JSON).read_text())["rounds"]
        if row["round"] <= state["round"]
    ]
    if not rows or rows[-1]["round"] != state["round"]:
        raise ResumeError(f"resume={str(out)!r}: {METRICS_JSON} lacks round {state['round']}")
    npz = out / CHECKPOINT_DIR / f"round-{state['round']}.npz"
    strategy: dict[str, np.ndarray] = {}
    if npz.is_file():  # runs from before strategies had state on disk have none
        with np.load(npz, allow_pickle=False) as saved:
            strategy = {k: saved[k] for k in saved.files}
    log.info("resuming %s after round %d", out, state["round"])
    return ResumePoint(int(state["round"]), weights, rows, strategy)


def state_file(out: Path) -> Path:
    """``RUN_DIR/state.json``, or ``ResumeError`` saying that no round was completed there."""
    path = out / STATE_JSON
    if not path.is_file():
        raise ResumeError(
            f"resume={str(out)!r}: no {STATE_JSON} there, so no round was completed (or it is not "
            "an fl_ondevice run directory); start the run anew"
        )
    return path


def resumed_config(run_dir: str) -> Config:
    """The configuration an interrupted run was started with, set to continue in place."""
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise ResumeError(f"resume={run_dir!r}: no {RESOLVED_CONFIG} there; is it a run directory?")
    saved = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path)))
    saved.update(output_dir=str(Path(run_dir)), resume=str(Path(run_dir)))
    return parse_config(saved)
