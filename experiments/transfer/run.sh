#!/usr/bin/env bash
# Every run of experiments/transfer/README.md, then its table.
# Usage: bash experiments/transfer/run.sh [VARIANTS]   (default: all three)
set -euo pipefail
variants=${1:-head_pretrained all_scratch all_pretrained}
runs=experiments/transfer/runs
declare -A what=(
  [head_pretrained]="model.trainable=head model.pretrained=true"
  [all_scratch]="model.trainable=all model.pretrained=false"
  [all_pretrained]="model.trainable=all model.pretrained=true"
)
python -m fl_ondevice.export experiment=transfer  # pretrain the base once (cached)
for v in $variants; do
  # shellcheck disable=SC2086
  python -m fl_ondevice.simulate -m experiment=transfer ${what[$v]} \
    num_clients=10,100 partition=iid,dirichlet hydra.sweep.dir=$runs/$v
done
python -m experiments.tables transfer
