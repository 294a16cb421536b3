#!/usr/bin/env bash
# Every run of experiments/niid_bench/README.md, then its table: ~2.5 hours on 2 cores.
set -euo pipefail
run() { python -m fl_ondevice.simulate -m "$@"; }
for p in iid dirichlet quantity; do
  run experiment=niid_bench_$p hydra.sweep.dir=experiments/niid_bench/runs/$p/fedavg
  run experiment=niid_bench_$p strategy=fedprox strategy.proximal_mu=0.001,0.01,0.1 \
    hydra.sweep.dir=experiments/niid_bench/runs/$p/fedprox
  run experiment=niid_bench_$p strategy=fedadam,fedyogi,fedavgm \
    hydra.sweep.dir=experiments/niid_bench/runs/$p/server_opt
done
run experiment=niid_bench_robust strategy=fedavg,fedmedian,fedtrimmedavg \
  hydra.sweep.dir=experiments/niid_bench/runs/robust/averaging
run experiment=niid_bench_robust strategy=krum strategy.num_malicious_nodes=2 \
  client.attack.kind=sign_flip,none hydra.sweep.dir=experiments/niid_bench/runs/robust/krum
python -m experiments.tables niid_bench
