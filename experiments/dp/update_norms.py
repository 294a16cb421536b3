"""The L2 norm of a client's model update in a run's setting, to choose DP clipping norms.

DP-FedAvg clips each client's update (trained weights minus the global weights it started from)
to a norm C. A C far above the typical norm pays for noise (z C / m) that no update needs; a C far
below it throws away most of each update's length. This trains CLIENTS clients of a run
(``config.yaml``: same data, partition, model, local epochs, batch size and learning rate) for
one round through the real TFLite interpreter, from the initial global model and from each
``--weights`` file (a checkpoint ``round-N.weights.npz`` of a run), and reports the norms'
spread. Writes ``update_norms.json``.

Run: python -m experiments.dp.update_norms RUN_DIR OUT_JSON --weights CKPT...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fl_ondevice.client.client import client_data, train_client
from fl_ondevice.config import Config, parse_config
from fl_ondevice.ondevice.convert import build_tflite
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.server.resume import RESOLVED_CONFIG

log = logging.getLogger(__name__)

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def update_norms(
    cfg: Config, start: Mapping[str, np.ndarray], clients: Sequence[int], server_round: int
) -> list[float]:
    """The L2 norm (over every weight) of each client's update after one round from ``start``."""
    dataset, _ = client_data(cfg)
    model_file = build_tflite(
        cfg.model,
        dataset.input_shape,
        dataset.num_classes,
        cfg.seed,
        os.path.expanduser(cfg.cache_dir),
    )
    model = OnDeviceModel(model_file, cfg.client.num_threads)
    staged = model.stage(dict(start) if start else model.initial_weights())
    norms = []
    for client_id in clients:
        update = train_client(cfg, model, staged, client_id, server_round)
        squares = sum(
            float(np.sum((update.weights[k].astype(np.float64) - staged.weights[k]) ** 2))
            for k in staged.weights
        )
        norms.append(squares**0.5)
    return norms


def spread(norms: Sequence[float]) -> dict[str, Any]:
    """Mean and quantiles of the norms (NumPy's default, linear)."""
    values = np.asarray(norms)
    return {
        "clients": len(values),
        "mean": float(values.mean()),
        **{f"q{round(100 * q)}": float(np.quantile(values, q)) for q in QUANTILES},
        "max": float(values.max()),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the norms from the initial model and each ``--weights`` file; write OUT_JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run's directory (config.yaml)")
    parser.add_argument("out_json", type=Path, help="where the norms' spread goes")
    parser.add_argument("--weights", type=Path, nargs="*", default=[], help="round-N.weights.npz")
    parser.add_argument("--clients", type=int, default=100, help="clients to train (seeded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(OmegaConf.load(args.run_dir / RESOLVED_CONFIG))
    rng = np.random.default_rng(cfg.seed)
    clients = sorted(int(c) for c in rng.choice(cfg.num_clients, args.clients, replace=False))
    starts: list[tuple[str, int, dict[str, np.ndarray]]] = [("initial model", 1, {})]
    for path in args.weights:
        with np.load(path) as npz:
            weights = {k: npz[k] for k in sorted(npz.files)}
        server_round = int(path.name.split("-")[1].split(".")[0]) + 1
        starts.append((f"global model after round {server_round - 1}", server_round, weights))
    result = {"run_dir": str(args.run_dir), "clients": clients, "starts": []}
    for name, server_round, weights in starts:
        norms = update_norms(cfg, weights, clients, server_round)
        summary = {"start": name, "round": server_round, **spread(norms)}
        result["starts"].append(summary)
        log.info(
            "%s: update norm median %.3f (p10 %.3f, p90 %.3f) over %d clients",
            name,
            summary["q50"],
            summary["q10"],
            summary["q90"],
            len(norms),
        )
    args.out_json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
