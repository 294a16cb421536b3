"""The simulation grid: which (model, clients, fraction) cells run, which are skipped, and why."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.bench.runs import Job

TRAIN_PER_CLIENT = {10: 4800, 100: 480, 1000: 48}  # Fashion-MNIST iid, 80% of 60,000 / n
# Rough per-step and per-call costs (s) on this 2 vCPU machine, only to skip cells that cannot
# finish in --max-sim-seconds; the measured numbers replace them in every table.
STEP_SECONDS = {("ours", "mlp"): 0.00025, ("ours", "cnn"): 0.046}
STEP_SECONDS |= {("peer", "mlp"): 0.001, ("peer", "cnn"): 0.024}
STEP_SECONDS |= {("base", m): s for (k, m), s in list(STEP_SECONDS.items()) if k == "ours"}
CALL_SECONDS = {"ours": 0.1, "base": 0.1, "peer": 1.0}  # per update besides the steps
START_SECONDS = 25.0  # TF import, Ray start-up, first-round warm-up


@dataclass(frozen=True)
class Cell:
    """One planned job, or the reason it is skipped."""

    job: Job
    estimate_seconds: float
    skipped: str | None


def updates_per_round(clients: int, fraction: float, min_train_nodes: int = 2) -> int:
    """Clients sampled per round, as Flower's FedAvg: max(int(n * C), min_train_nodes)."""
    return min(clients, max(int(clients * fraction), min_train_nodes))


def estimate(job: Job, workers: int) -> float:
    """Rough wall seconds of a whole job (start-up plus rounds)."""
    n_train = TRAIN_PER_CLIENT.get(job.clients, 48000 // job.clients)
    steps = job.local_epochs * -(-n_train // job.batch_size)
    per_update = CALL_SECONDS[job.kind] + steps * STEP_SECONDS[(job.kind, job.model)]
    per_round = updates_per_round(job.clients, job.fraction) * per_update / workers + 1.0
    return START_SECONDS + job.rounds * per_round


def plan(
    models: list[str],
    clients: list[int],
    fractions: list[float],
    kinds: list[str],
    rounds: int,
    workers: int,
    max_seconds: float,
) -> list[Cell]:
    """Every (model, clients, fraction, kind) in grid order, the kinds side by side."""
    cells = []
    for model in models:
        for n in clients:
            for f in fractions:
                for kind in kinds:
                    job = Job(kind, model, n, f, rounds)
                    est = estimate(job, workers)
                    why = (
                        f"estimated {est:.0f} s > --max-sim-seconds {max_seconds:.0f}"
                        if est > max_seconds
                        else None
                    )
                    cells.append(Cell(job, est, why))
    return cells
