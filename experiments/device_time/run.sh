#!/usr/bin/env bash
# Every run of experiments/device_time/README.md, then its table: ~40 min on 2 cores.
# Usage: bash experiments/device_time/run.sh [fleet|encoding|all]
# The clock uses the step times recorded in calibration/<model>.json (measured on the machine
# the README names), so a rerun anywhere gives the same simulated hours; drop
# device.calibration=... to measure your own machine instead.
set -euo pipefail
part=${1:-all}
runs=experiments/device_time/runs
# Deadlines between the mid and the low class's time for a median client (README).
declare -A deadline=([mlp]=1.0 [cnn]=15.0)
for model in mlp cnn; do
  common=(experiment=device_time model=$model
          device.calibration=experiments/device_time/calibration/$model.json)
  if [[ $part == fleet || $part == all ]]; then
    python -m fl_ondevice.simulate "${common[@]}" device=fast_phones \
      hydra.run.dir=$runs/$model/a_fast_phones
    python -m fl_ondevice.simulate "${common[@]}" hydra.run.dir=$runs/$model/b_wait_for_all
    python -m fl_ondevice.simulate "${common[@]}" round.overcommit=1.3 \
      hydra.run.dir=$runs/$model/c_overcommit_1.3
    python -m fl_ondevice.simulate "${common[@]}" round.deadline_s=${deadline[$model]} \
      hydra.run.dir=$runs/$model/d_deadline
  fi
  if [[ $part == encoding || $part == all ]]; then
    for enc in float16 int8; do
      python -m fl_ondevice.simulate "${common[@]}" client.update_encoding=$enc \
        hydra.run.dir=$runs/$model/e_$enc
    done
  fi
done
python -m experiments.tables device_time
