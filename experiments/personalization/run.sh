#!/usr/bin/env bash
# Every run of experiments/personalization/README.md, then its table: ~6 min on 2 busy cores.
# Usage: bash experiments/personalization/run.sh [PARTITIONS]   (default: "dirichlet label_quantity")
# Per partition: one sweep of two federated runs (personalize.epochs=1 and 3; the global model
# is the same in both, only the fine-tuning differs), then the local-only baseline on the same
# clients and initial model.
set -euo pipefail
partitions=${1:-dirichlet label_quantity}
runs=experiments/personalization/runs
for partition in $partitions; do
  rm -rf "${runs:?}/$partition"  # a rerun replaces, never mixes with, the old runs
  python -m fl_ondevice.simulate -m experiment=personalization partition=$partition
  python -m experiments.personalization.local_only $runs/$partition/0 $runs/$partition/local_only
done
python -m experiments.tables personalization
