#!/usr/bin/env bash
# Every run of experiments/dp/README.md, then its table: ~20 min on 2 shared cores
# (13 runs of 100 rounds, ~1-2 min each). Each part can be rerun alone.
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0
runs=experiments/dp/runs
# The non-private ceiling: FedAvg with equal weights, 100 of 1,000 clients a round.
python -m fl_ondevice.simulate experiment=dp_fedavg            # -> $runs/fedavg
# Client update norms from the initial model and from the ceiling's round-99 model: where the
# clipping norms of conf/experiment/dp.yaml come from.
python -m experiments.dp.update_norms $runs/fedavg experiments/dp/update_norms.json \
  --weights $runs/fedavg/checkpoints/round-99.weights.npz
# DP-FedAvg: noise multiplier z in {0.5, 1, 2, 4, 8, 16} x clipping norm C in {0.5, 0.1}.
python -m fl_ondevice.simulate -m experiment=dp                # -> $runs/dp/C{C}_z{z}
python -m experiments.tables dp
