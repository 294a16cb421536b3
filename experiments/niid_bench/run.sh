#!/usr/bin/env bash
# Every run of experiments/niid_bench/README.md, then its table: ~2.7 hours on 2 cores
# (40 runs of ~4 min). Each family sweeps into its own folder, so a part can be rerun alone.
set -euo pipefail
run() { python -m fl_ondevice.simulate -m "$@"; }
runs=experiments/niid_bench/runs
for p in iid dirichlet quantity; do
  run experiment=niid_bench_$p strategy=fedprox strategy.proximal_mu=0.01 \
    hydra.sweep.dir=$runs/$p/fedprox_mu0.01
done
for p in iid dirichlet quantity; do
  run experiment=niid_bench_$p strategy=fedadam,fedyogi,fedavgm hydra.sweep.dir=$runs/$p/server_opt
done
run experiment=niid_bench_robust strategy=fedavg,fedmedian,fedtrimmedavg \
  hydra.sweep.dir=$runs/robust/averaging
run experiment=niid_bench_robust strategy=krum strategy.num_malicious_nodes=2 \
  client.attack.kind=sign_flip,none hydra.sweep.dir=$runs/robust/krum
for mu in 0.001 0.1; do
  for p in iid dirichlet quantity; do
    run experiment=niid_bench_$p strategy=fedprox strategy.proximal_mu=$mu \
      hydra.sweep.dir=$runs/$p/fedprox_mu$mu
  done
done
for p in iid dirichlet quantity; do
  run experiment=niid_bench_$p hydra.sweep.dir=$runs/$p/fedavg
done
python -m experiments.tables niid_bench
