"""What a run keeps on disk after every round, and how an interrupted run continues from it.

After round r: ``checkpoints/round-r.weights.npz`` (the global weights),
``checkpoints/round-r.npz`` (the strategy's own state, e.g. FedAdam's moments), the metrics,
then ``state.json`` naming the round, in that order and each written atomically: ``state.json``
always names a round whose files are complete. Runs from before the weights were saved as
``.npz`` keep them as TF checkpoints (``round-r.ckpt``); they resume too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from fl_ondevice.config import Config, parse_config
from fl_ondevice.errors import CheckpointError, ResumeError
from fl_ondevice.ondevice.weights import Weights, WeightSpec
from fl_ondevice.outputs.results import METRICS_JSON, MetricsLog
from fl_ondevice.server.strategy import layers

log = logging.getLogger(__name__)

STATE_JSON = "state.json"  # the last completed round and its checkpoint: what resume reads
CHECKPOINT_DIR = "checkpoints"  # the global weights after the last two completed rounds
RESOLVED_CONFIG = "config.yaml"  # every value this run used, defaults included
WEIGHTS_SUFFIX = ".weights.npz"  # round-r.weights.npz: the global weights after round r
OLD_WEIGHTS_SUFFIX = ".ckpt"  # the same as a TF checkpoint, in runs written before
_SKIP = {"current_arrays"}  # set from the global model at the start of every round
# Held while a round is saved; a stopping process takes it and keeps it, so that no round is
# saved after it has read state.json (``simulate._stop``).
SAVING = threading.Lock()


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
    with SAVING:
        _save_round(out, r, weights, strategy, metrics, row)


def _save_round(
    out: Path, r: int, weights: Weights, strategy: Strategy, metrics: MetricsLog, row: dict
) -> None:
    (out / CHECKPOINT_DIR).mkdir(exist_ok=True)
    ckpt = Path(CHECKPOINT_DIR) / f"round-{r}{WEIGHTS_SUFFIX}"
    _write_npz(out / ckpt, weights)
    _write_npz(out / CHECKPOINT_DIR / f"round-{r}.npz", strategy_state(strategy))
    metrics.append(row)
    tmp_json = out / f"{STATE_JSON}.tmp"
    tmp_json.write_text(json.dumps({"round": r, "checkpoint": str(ckpt)}))
    os.replace(tmp_json, out / STATE_JSON)
    for old in (out / CHECKPOINT_DIR).glob("round-*.*"):  # keep this round's and the last
        if int(old.name.split("-")[1].split(".")[0]) < r - 1:
            old.unlink()


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("wb") as file:
        # numpy's stub matches **arrays against savez's allow_pickle (a keyword from numpy 2.1)
        np.savez(file, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def read_weights(path: Path) -> Weights:
    """The global weights a round left in ``path``, in sorted name order: the ``.npz``
    :func:`save_round` writes, or the TF checkpoint (``.ckpt``) of a run written before.

    Raises ``CheckpointError`` naming the file when it is missing, truncated or corrupt.
    """
    if path.suffix == OLD_WEIGHTS_SUFFIX:
        # Only an old run's file needs TensorFlow's checkpoint reader (~660 MiB): import it here.
        from fl_ondevice.ondevice.checkpoint import read_checkpoint

        return read_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            weights = {name: npz[name] for name in sorted(npz.files)}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{str(path)!r} cannot be read as a round's weights ({err}); the file is corrupt or "
            "truncated"
        ) from None
    if not weights:
        raise CheckpointError(f"checkpoint file {str(path)!r} holds no tensors")
    return weights


def last_round_weights(out: Path) -> Weights:
    """The global weights of the last round ``out``'s ``state.json`` names as completed."""
    _, checkpoint = _read_state(out)
    return read_weights(checkpoint)


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
    """Read where an interrupted run stopped; ``ResumeError`` if it cannot be continued.

    Nothing read is trusted: ``state.json`` must be what :func:`save_round` writes and name a
    checkpoint inside ``RUN_DIR/checkpoints``; if the last round's checkpoint or strategy state
    cannot be read or does not fit the model, the run continues from the round before it (kept
    for this), with a warning, and the metrics rows after that round are dropped.
    """
    last, checkpoint = _read_state(out)
    rows = _read_rows(out)
    try:
        return _resume_point(out, last, checkpoint, spec, rows)
    except (CheckpointError, ResumeError) as err:
        problem = err
    before = _kept_weights(out, last - 1)
    if last < 1 or before is None:
        raise ResumeError(
            f"resume={str(out)!r}: {problem}; no earlier round is kept: start the run anew"
        )
    log.warning(
        "%s; continuing after round %d instead (the metrics of round %d are dropped)",
        problem,
        last - 1,
        last,
    )
    try:
        return _resume_point(out, last - 1, before, spec, rows)
    except (CheckpointError, ResumeError) as err:
        raise ResumeError(
            f"resume={str(out)!r}: neither of the kept rounds can be read (round {last}: "
            f"{problem}; round {last - 1}: {err}); start the run anew"
        ) from None


def _kept_weights(out: Path, r: int) -> Path | None:
    """Round ``r``'s weights file in ``out``, in either format, or None."""
    for suffix in (WEIGHTS_SUFFIX, OLD_WEIGHTS_SUFFIX):
        path = out / CHECKPOINT_DIR / f"round-{r}{suffix}"
        if path.is_file():
            return path
    return None


def _read_state(out: Path) -> tuple[int, Path]:
    """``state.json``'s round and its checkpoint, which must lie in ``RUN_DIR/checkpoints``."""
    path = state_file(out)
    fix = "restore it from a copy or start the run anew"
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResumeError(f"{str(path)!r} is not valid JSON ({err}); {fix}") from None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("round"), int)
        or state["round"] < 0
        or not isinstance(state.get("checkpoint"), str)
    ):
        raise ResumeError(
            f'{str(path)!r} should be {{"round": N >= 0, "checkpoint": PATH}}, not '
            f"{json.dumps(state)[:200]}; {fix}"
        )
    folder = (out / CHECKPOINT_DIR).resolve()
    checkpoint = (out / state["checkpoint"]).resolve()
    if not checkpoint.is_relative_to(folder):
        raise ResumeError(
            f"{str(path)!r} names the checkpoint {state['checkpoint']!r}, which is not in "
            f"{str(out / CHECKPOINT_DIR)!r}; a run's checkpoints never are elsewhere: {fix}"
        )
    return state["round"], checkpoint


def _read_rows(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS_JSON
    try:
        rounds = json.loads(path.read_text())["rounds"]
        return [row for row in rounds if isinstance(row["round"], int)]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(
            f"{str(path)!r} cannot be read ({type(err).__name__}: {err}); the run's metrics are "
            "lost, so it cannot be continued: start it anew"
        ) from None


def _resume_point(
    out: Path, r: int, checkpoint: Path, spec: WeightSpec, rows: list[dict[str, Any]]
) -> ResumePoint:
    weights = read_weights(checkpoint)
    spec.validate(weights, f"resume checkpoint {str(checkpoint)!r}")
    kept = [row for row in rows if row["round"] <= r]
    if not kept or kept[-1]["round"] != r:
        raise ResumeError(f"{METRICS_JSON} lacks round {r}")
    npz = out / CHECKPOINT_DIR / f"round-{r}.npz"
    strategy: dict[str, np.ndarray] = {}
    if npz.is_file():  # runs from before strategies had state on disk have none
        try:
            with np.load(npz, allow_pickle=False) as saved:
                strategy = {k: saved[k] for k in saved.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ResumeError(f"the strategy state {str(npz)!r} cannot be read ({err})") from None
    log.info("resuming %s after round %d", out, r)
    return ResumePoint(r, weights, kept, strategy)


def completed_round(run_dir: str | os.PathLike[str]) -> int | None:
    """The last round ``run_dir`` keeps complete, or None (none yet, or unreadable)."""
    try:
        return int(json.loads((Path(run_dir) / STATE_JSON).read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def log_stopped(signum: int, run_dir: str, command: str) -> None:
    """The one line after Ctrl-C or SIGTERM: the round the run directory keeps, and how to go
    on with ``python -m COMMAND``."""
    name, done = signal.Signals(signum).name, completed_round(run_dir)
    if done is None:
        log.warning("%s: stopped before the first round was complete (%s)", name, run_dir)
    else:
        log.warning(
            "%s: stopped after round %d; continue with: python -m %s resume=%s",
            name,
            done,
            command,
            run_dir,
        )


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
