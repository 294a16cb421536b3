"""Local-only baseline: every client trains the initial model on its own data, no federation.

Each client of a federated run (its ``config.yaml``: same data, partition, initial model,
batch size and learning rate) trains the initial weights alone on its local train split for the
local epochs an average client trains in that run (num_rounds x clients per round /
num_clients x local_epochs), through the real TFLite interpreter, and is evaluated on its local
test split. Writes ``clients.csv`` (per client) and ``local_only.json`` (the spread).

Run: python -m experiments.personalization.local_only RUN_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fl_ondevice.client.client import client_data, evaluate_client
from fl_ondevice.config import Config, PersonalizeConfig, parse_config
from fl_ondevice.ondevice.convert import build_tflite
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.outputs.results import spread
from fl_ondevice.server.resume import RESOLVED_CONFIG
from fl_ondevice.server.strategy import make_strategy, sample_size

log = logging.getLogger(__name__)

LOCAL_ONLY_CSV = "clients.csv"
LOCAL_ONLY_JSON = "local_only.json"


def average_epochs(cfg: Config) -> int:
    """Local epochs an average client trains in the federated run ``cfg`` (at least 1)."""
    strategy = make_strategy(cfg)
    per_round = sample_size(
        cfg.num_clients,
        strategy.fraction_train,
        strategy.min_train_nodes,  # type: ignore[attr-defined]
    )
    return max(1, round(cfg.num_rounds * per_round / cfg.num_clients * cfg.client.local_epochs))


def local_only(cfg: Config, epochs: int) -> list[dict[str, Any]]:
    """Each client's accuracy on its local test split of the initial model and of the initial
    model trained ``epochs`` local epochs on its local train split alone.

    The training is ``fl_ondevice.client.client``'s fine-tuning (``personalize_client``) started
    from the initial global weights: same batches, learning rate and fresh optimizer as a client's.
    Clients without a local test split are left out.
    """
    dataset, partitions = client_data(cfg)
    model_file = build_tflite(
        cfg.model,
        dataset.input_shape,
        dataset.num_classes,
        cfg.seed,
        os.path.expanduser(cfg.cache_dir),
    )
    model = OnDeviceModel(model_file, cfg.client.num_threads)
    initial = model.initial_weights()  # the federated run's round-0 global model
    staged = (initial, model.stage(initial))
    alone = replace(cfg, personalize=PersonalizeConfig(epochs=epochs))
    rows = []
    for part in partitions:
        if not len(part.test_indices):
            continue
        ev = evaluate_client(alone, model, staged, part.client_id, server_round=0)
        rows.append(
            {
                "client": part.client_id,
                "examples": len(part.train_indices),
                "test_examples": ev.num_examples,
                "epochs": epochs,
                "local_acc_initial": ev.accuracy,
                "local_acc_local_only": ev.personal_accuracy,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run the baseline for a federated run directory; write its files into OUT_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a federated run's directory (config.yaml)")
    parser.add_argument("out_dir", type=Path, help="where clients.csv and local_only.json go")
    parser.add_argument("--epochs", type=int, default=None, help="default: an average client's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(OmegaConf.load(args.run_dir / RESOLVED_CONFIG))
    epochs = args.epochs if args.epochs is not None else average_epochs(cfg)
    rows = local_only(cfg, epochs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / LOCAL_ONLY_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "run_dir": str(args.run_dir),
        "epochs": epochs,
        "clients": len(rows),
        "local_acc_initial": spread([r["local_acc_initial"] for r in rows]),
        "local_acc_local_only": spread([r["local_acc_local_only"] for r in rows]),
    }
    (args.out_dir / LOCAL_ONLY_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    log.info(
        "local-only, %d epochs, %d clients: mean local accuracy %.4f (initial model %.4f)",
        epochs,
        len(rows),
        summary["local_acc_local_only"]["mean"],
        summary["local_acc_initial"]["mean"],
    )


if __name__ == "__main__":
    main()
