#!/usr/bin/env bash
# Every run of experiments/device_time/README.md, then its table: ~75 min on 2 cores.
# Usage: bash experiments/device_time/run.sh [fleet|encoding|all] [MODELS] [SETTINGS]
# (e.g. `all cnn "c_overcommit_1.3 d_deadline"` reruns two settings of the cnn only)
# The clock uses the step times recorded in calibration/<model>.json (measured on the machine
# the README names), so a rerun anywhere gives the same simulated time; drop
# device.calibration=... to measure your own machine instead.
set -euo pipefail
part=${1:-all}
models=${2:-mlp cnn}
only=${3:-}
runs=experiments/device_time/runs
# Deadlines between the mid and the low class's time for a median client (README).
declare -A deadline=([mlp]=1.0 [cnn]=15.0)
declare -A seeds=([mlp]=0,1,2 [cnn]=0,1)  # the cnn costs ~4.5 min a run
for model in $models; do
  run() {
    local setting=$1
    shift
    [[ -z $only || " $only " == *" $setting "* ]] || return 0
    python -m fl_ondevice.simulate -m experiment=device_time model=$model seed=${seeds[$model]} \
      device.calibration=experiments/device_time/calibration/$model.json \
      hydra.sweep.dir=$runs/$model/$setting "$@"
  }
  if [[ $part == fleet || $part == all ]]; then
    run a_fast_phones device=fast_phones
    run b_wait_for_all
    run c_overcommit_1.3 round.overcommit=1.3
    run d_deadline round.deadline_s=${deadline[$model]}
  fi
  if [[ $part == encoding || $part == all ]]; then
    run e_float16 client.update_encoding=float16
    run e_int8 client.update_encoding=int8
  fi
done
python -m experiments.tables device_time
