"""Rebuild each experiment's results table, CSV and accuracy plot from its run directories."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The README of each experiment holds the generated table between these markers.
BEGIN = "<!-- tables.py:begin -->"
END = "<!-- tables.py:end -->"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
ACCURACY_PNG = "accuracy.png"

# Targets (central test accuracy) for "rounds to target". Fashion-MNIST is harder than MNIST, so
# McMahan's 97% (2NN) and 99% (CNN) become targets the scaled-down runs reach (README says why).
ONDEVICE_TARGETS = (0.80, 0.85)
MCMAHAN_TARGETS = {"2nn": (0.80, 0.75), "cnn": (0.70, 0.60)}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "digits": "digits"}
MCMAHAN_CLIENT_EXAMPLES = 600  # 2 shards of 300: the u = E * n / B column of arXiv:1602.05629


@dataclass(frozen=True)
class Run:
    """One finished (or interrupted) job: its resolved config and per-round metrics."""

    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    partition: dict[str, Any]  # partition.json: sizes and label skew (empty if missing)

    @property
    def trained(self) -> list[dict[str, Any]]:
        return [r for r in self.rounds if r["round"] > 0]

    @property
    def final_accuracy(self) -> float:
        return float(self.rounds[-1]["accuracy"])

    @property
    def best_accuracy(self) -> float:
        return max(float(r["accuracy"]) for r in self.rounds)

    def rounds_to(self, target: float) -> int | None:
        """First round whose central accuracy is >= target (None if never)."""
        return next((r["round"] for r in self.trained if r["accuracy"] >= target), None)

    @property
    def label_skew(self) -> str:
        """Mean total-variation distance of client label distributions from the global one."""
        tv = self.partition.get("tv_mean")
        return "—" if tv is None else f"{tv:.2f}"

    @property
    def bytes_per_client_round(self) -> float:
        """Weights down plus update up, per sampled client per round (bytes)."""
        last = self.trained[-1]
        return (last["bytes_down"] + last["bytes_up"]) / max(last["clients_sampled"], 1)

    @property
    def seconds_per_round(self) -> float:
        # Median: round 1 also pays for the engine's start-up.
        return float(statistics.median(r["seconds"] for r in self.trained))

    @property
    def wall_seconds(self) -> float:
        """Rounds plus central evaluation, without Ray's start-up (~10 s per job)."""
        return float(self.rounds[-1]["elapsed_seconds"])


def load_runs(folder: Path) -> list[Run]:
    """Every ``metrics.json`` under ``folder/runs``, in path order."""
    runs = []
    for path in sorted((folder / "runs").rglob("metrics.json")):
        doc = json.loads(path.read_text())
        part = path.parent / "partition.json"
        partition = json.loads(part.read_text()) if part.is_file() else {}
        if len(doc["rounds"]) > 1:
            runs.append(Run(path.parent, doc["config"], doc["rounds"], partition))
    return runs


# -- formatting -----------------------------------------------------------------------------------
def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numeric-looking columns are right-aligned."""

    def numeric(col: int) -> bool:
        cells = [str(r[col]) for r in rows]
        return all(re.fullmatch(r"[>≥~\d.,x×%±() -]+|—", c) for c in cells)

    align = ["--:" if rows and numeric(i) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rounds_cell(run: Run, target: float) -> str:
    reached = run.rounds_to(target)
    return str(reached) if reached is not None else f">{len(run.trained)}"


def _batch(run: Run) -> str:
    b = run.config["client"]["batch_size"]
    return "∞" if b is None else str(b)


def _partition(cfg: dict[str, Any]) -> str:
    p = cfg["partition"]
    if p["name"] == "dirichlet":
        return f"Dir({p['alpha']:g})"
    if p["name"] == "label_quantity":
        return f"#C={p['labels_per_client']}"
    if p["name"] == "shards":
        return f"shards {p['shards_per_client']}x{p['shard_size']}"
    return "IID"


def _mean_spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


# -- experiments ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """What one experiment contributes: the markdown, CSV rows and the curves to plot."""

    markdown: str
    csv_rows: list[dict[str, Any]]
    panels: dict[str, list[tuple[str, Run]]]  # panel title -> (curve label, run)
    x_axis: str = "round"  # or "sim_seconds": the phones' simulated time
    # More figures of the experiment: file name -> a function that draws it to a path.
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)


def ondevice_fmnist(runs: list[Run]) -> Table:
    """Guide's MLP on Fashion-MNIST: centralised vs FedAvg over clients and label skew."""
    order = {"IID": 0, "Dir(0.5)": 1, "Dir(0.1)": 2}
    runs = sorted(runs, key=lambda r: (r.config["num_clients"], order[_partition(r.config)]))
    header = [
        "setting",
        "clients (per round)",
        "partition",
        "label skew (TV)",
        "examples (last round)",
        "rounds",
        "final acc.",
        "best acc.",
        *(f"rounds to {t:.0%}" for t in ONDEVICE_TARGETS),
        "KiB per client per round (down + up)",
        "s / round",
    ]
    rows, csv_rows = [], []
    for run in runs:
        cfg = run.config
        n = cfg["num_clients"]
        setting = "centralised (1 client)" if n == 1 else "FedAvg"
        per_round = run.trained[-1]["clients_sampled"]
        rows.append(
            [
                setting,
                f"{n} ({per_round})",
                _partition(cfg),
                run.label_skew,
                f"{run.trained[-1]['examples']:,}",
                len(run.trained),
                f"{run.final_accuracy:.4f}",
                f"{run.best_accuracy:.4f}",
                *(_rounds_cell(run, t) for t in ONDEVICE_TARGETS),
                f"{run.bytes_per_client_round / 1024:,.0f}",
                f"{run.seconds_per_round:.2f}",
            ]
        )
        csv_rows.append(_csv_row(run, ONDEVICE_TARGETS))
    panels: dict[str, list[tuple[str, Run]]] = {}
    for run in runs:
        n = run.config["num_clients"]
        title = "centralised and 10 clients" if n <= 10 else f"{n} clients, 10 per round"
        label = "centralised" if n == 1 else _partition(run.config)
        panels.setdefault(title, []).append((label, run))
    return Table(markdown(header, rows), csv_rows, panels)


def mcmahan2017(runs: list[Run]) -> Table:
    """arXiv:1602.05629 Table 2 style: rounds to target per (E, B), speed-up over FedSGD."""
    parts, csv_rows = [], []
    panels: dict[str, list[tuple[str, Run]]] = {}
    for model in ("2nn", "cnn"):
        mine = [r for r in runs if r.config["model"]["name"] == model]
        if not mine:
            continue
        by_setting: dict[tuple[int, int | None], dict[str, Run]] = {}
        for run in mine:
            by_setting.setdefault(_eb(run), {})[_iid_or_not(run)] = run
        fedsgd = by_setting.get((1, None), {})

        def order(key: tuple[int, int | None]) -> tuple[float, int]:
            e, b = key
            return (-1.0 if key == (1, None) else _updates(e, b), e)

        name = "2NN (784-200-200-10)" if model == "2nn" else "CNN (McMahan et al.)"
        data = DATASET_NAMES.get(mine[0].config.get("dataset", {}).get("name"), "?")
        for target in MCMAHAN_TARGETS[model]:
            rows = []
            for e, b in sorted(by_setting, key=order):
                row: list[Any] = ["FedSGD" if (e, b) == (1, None) else "FedAvg", e, b or "∞"]
                row.append(f"{_updates(e, b):g}")
                for kind in ("IID", "non-IID"):
                    run = by_setting[(e, b)].get(kind)
                    if run is None:
                        row += ["not run", "—"]
                        continue
                    row.append(_rounds_with_speedup(run, fedsgd.get(kind), target))
                    row.append(f"{run.final_accuracy:.4f} ({len(run.trained)})")
                rows.append(row)
            header = [
                "",
                "E",
                "B",
                "u",
                f"IID: rounds to {target:.0%} (speed-up)",
                "IID: final acc. (rounds)",
                f"non-IID: rounds to {target:.0%} (speed-up)",
                "non-IID: final acc. (rounds)",
            ]
            title = f"**{name}**, {data}, target {target:.0%}"
            parts.append(f"{title}\n\n{markdown(header, rows)}")
        csv_rows += [_csv_row(run, MCMAHAN_TARGETS[model]) for run in mine]
        for run in sorted(mine, key=lambda r: order(_eb(r))):
            e, b = _eb(run)
            label = "FedSGD" if (e, b) == (1, None) else f"E={e}, B={b or '∞'}"
            panels.setdefault(f"{model.upper()}, {_iid_or_not(run)}", []).append((label, run))
    return Table("\n\n".join(parts), csv_rows, panels)


def _eb(run: Run) -> tuple[int, int | None]:
    return run.config["client"]["local_epochs"], run.config["client"]["batch_size"]


def _iid_or_not(run: Run) -> str:
    return "IID" if run.config["partition"]["name"] == "iid" else "non-IID"


def _updates(epochs: int, batch: int | None) -> float:
    # u = expected local updates per round per client (arXiv:1602.05629, Table 2's u column).
    return epochs if batch is None else epochs * MCMAHAN_CLIENT_EXAMPLES / batch


def _rounds_with_speedup(run: Run, fedsgd: Run | None, target: float) -> str:
    reached = run.rounds_to(target)
    if reached is None:
        return f">{len(run.trained)}"
    if fedsgd is None or fedsgd is run:
        return str(reached)
    base = fedsgd.rounds_to(target)
    if base is None:  # FedSGD never got there: the speed-up is a lower bound
        return f"{reached} (>{len(fedsgd.trained) / reached:.1f}x)"
    return f"{reached} ({base / reached:.1f}x)"


def strategy_label(cfg: dict[str, Any]) -> str:
    """A strategy and its deciding argument: ``FedProx μ=0.01``, ``FedAdam η=0.01``, ...

    Runs from before the strategy layer was opened name it ``strategy.name`` (always FedAvg).
    """
    s = cfg.get("strategy", {})
    name = str(s.get("_target_", "FedAvg")).rsplit(".", 1)[-1]
    if "proximal_mu" in s:
        return f"FedProx μ={s['proximal_mu']:g}"
    if "server_momentum" in s:
        return f"FedAvgM β={s['server_momentum']:g}"
    if name in ("FedAdam", "FedYogi", "FedAdagrad"):
        return f"{name} η={s['eta']:g}"
    if name == "Krum":
        return f"Krum f={s['num_malicious_nodes']}"
    if name == "FedTrimmedAvg":
        return f"FedTrimmedAvg β={s['beta']:g}"
    return name


def attack_label(cfg: dict[str, Any]) -> str:
    """``none``, or e.g. ``sign_flip x5, 20% of clients``."""
    a = cfg["client"].get("attack", {"kind": "none"})
    if a["kind"] == "none" or not a["fraction"]:
        return "none"
    return f"{a['kind']} x{a['scale']:g}, {100 * a['fraction']:.0f}% of clients"


NIID_ORDER = {"IID": 0, "Dir(0.5)": 1, "#C=3": 2, "#C=2": 3, "#C=1": 4}


def niid_bench(runs: list[Run]) -> Table:
    """NIID-Bench label skew: final accuracy per partition and strategy, and robust aggregation
    under attack (mean ± std over seeds where there are several)."""
    clean = [r for r in runs if attack_label(r.config) == "none" and "robust" not in r.path.parts]
    robust = [r for r in runs if r not in clean]
    strategies = list(dict.fromkeys(strategy_label(r.config) for r in clean))
    strategies.sort(key=lambda s: (s != "FedAvg", s))
    cells: dict[tuple[str, str], list[Run]] = {}
    for run in clean:
        cells.setdefault((_partition(run.config), strategy_label(run.config)), []).append(run)
    partitions = sorted({p for p, _ in cells}, key=lambda p: NIID_ORDER.get(p, 9))
    skew = {p: group[0].label_skew for (p, _), group in cells.items()}
    rows = [[p, skew[p], *(_final(cells.get((p, s), [])) for s in strategies)] for p in partitions]
    text = [
        "**Final central test accuracy** (best round in parentheses), simple CNN, 10 parties:",
        markdown(["partition", "label skew (TV)", *strategies], rows),
    ]
    panels: dict[str, list[tuple[str, Run]]] = {}
    for (p, s), group in sorted(cells.items(), key=lambda kv: NIID_ORDER.get(kv[0][0], 9)):
        panels.setdefault(f"{p}, simple CNN, 10 parties", []).append((s, group[0]))
    if robust:
        reference = [r for r in clean if _partition(r.config) == "IID"]
        reference = [r for r in reference if strategy_label(r.config) == "FedAvg"]
        rows = []
        for run in sorted(
            reference + robust,
            key=lambda r: (attack_label(r.config) != "none", strategy_label(r.config)),
        ):
            rows.append([strategy_label(run.config), attack_label(run.config), _final([run])])
            panels.setdefault("robust aggregation, IID", []).append(
                (f"{strategy_label(run.config)}, {attack_label(run.config)}", run)
            )
        text += [
            "**Robust aggregation** (IID partition), final accuracy (best):",
            markdown(["aggregation", "attack", "final acc. (best)"], rows),
        ]
    csv_rows = [
        {**_csv_row(r, ()), "strategy": strategy_label(r.config), "attack": attack_label(r.config)}
        for r in runs
    ]
    return Table("\n\n".join(text), csv_rows, panels)


def _final(group: list[Run]) -> str:
    if not group:
        return "—"
    final = _mean_spread([r.final_accuracy for r in group])
    best = _mean_spread([r.best_accuracy for r in group])
    return f"{final} ({best})"


def _csv_row(run: Run, targets: Sequence[float]) -> dict[str, Any]:
    cfg = run.config
    return {
        "run": str(run.path),
        "model": cfg["model"]["name"],
        "num_clients": cfg["num_clients"],
        "clients_per_round": run.trained[-1]["clients_sampled"],
        "partition": _partition(cfg),
        "local_epochs": cfg["client"]["local_epochs"],
        "batch_size": _batch(run),
        "learning_rate": cfg["model"]["learning_rate"],
        "seed": cfg["seed"],
        "label_skew_tv": run.partition.get("tv_mean"),
        "rounds": len(run.trained),
        "final_accuracy": run.final_accuracy,
        "best_accuracy": run.best_accuracy,
        **{f"rounds_to_{t:g}": run.rounds_to(t) for t in targets},
        "bytes_per_client_round": run.bytes_per_client_round,
        "seconds_per_round": round(run.seconds_per_round, 3),
        "wall_seconds": round(run.wall_seconds, 1),
    }


DEVICE_TIME_TARGET = 0.75  # conf/experiment/device_time.yaml
DEVICE_TIME_SETTINGS = {
    "a_fast_phones": "(a) identical fast phones, always online",
    "b_wait_for_all": "(b) phone mix, wait for all",
    "c_overcommit_1.3": "(c) phone mix, over-commit 1.3",
    "d_deadline": "(d) phone mix, deadline",
    "e_float16": "(e) phone mix, float16 updates",
    "e_int8": "(e) phone mix, int8 updates",
}


def device_time(runs: list[Run]) -> Table:
    """FedAvg on phones: rounds, simulated time and bytes to the target per fleet and policy,
    one value per seed."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.config["model"]["name"] != "mlp", str(r.path))):
        groups.setdefault((run.config["model"]["name"], run.path.parent.name), []).append(run)
    header = [
        "model",
        "setting",
        "seeds",
        "rounds to 75%",
        "simulated s to 75%",
        "MiB to 75% (down + up)",
        "simulated s / round (median)",
        "stragglers per round",
        "KiB up per client",
        "final acc. (mean)",
    ]
    rows, csv_rows = [], []
    panels: dict[str, list[tuple[str, Run]]] = {}
    for (model, name), group in groups.items():
        setting = DEVICE_TIME_SETTINGS.get(name, name)
        deadline = group[0].config["round"]["deadline_s"]
        if deadline is not None:
            setting += f" {deadline:g} s"
        to_target = [_to_device_target(run) for run in group]
        trained = [r for run in group for r in run.trained]
        up = statistics.median(r["bytes_up"] / max(r["clients_replied"], 1) for r in trained)
        rows.append(
            [
                model,
                setting,
                ", ".join(str(run.config["seed"]) for run in group),
                " / ".join(_rounds_cell(run, DEVICE_TIME_TARGET) for run in group),
                " / ".join(t["seconds"] for t in to_target),
                " / ".join(t["mib"] for t in to_target),
                f"{statistics.median(r['sim_round_seconds'] for r in trained):.1f}",
                f"{statistics.mean(r['clients_stragglers'] for r in trained):.1f}",
                f"{up / 1024:,.0f}",
                f"{statistics.mean(run.final_accuracy for run in group):.4f}",
            ]
        )
        for run, target in zip(group, to_target, strict=True):
            csv_rows.append(
                {
                    **_csv_row(run, (DEVICE_TIME_TARGET,)),
                    "setting": setting,
                    "sim_seconds_to_target": target["seconds_value"],
                    "mib_to_target": target["mib_value"],
                    "stragglers": sum(r["clients_stragglers"] for r in run.trained),
                    "update_encoding": run.config["client"]["update_encoding"],
                }
            )
        panels.setdefault(f"{model}: accuracy over simulated time (seed 0)", []).append(
            (name.replace("_", " "), group[0])
        )
    return Table(markdown(header, rows), csv_rows, panels, x_axis="sim_seconds")


def _to_device_target(run: Run) -> dict[str, Any]:
    # Simulated seconds and MiB until the round that reached the target ("> total" if none).
    reached = run.rounds_to(DEVICE_TIME_TARGET)
    until = [r for r in run.trained if reached is None or r["round"] <= reached]
    seconds = until[-1]["sim_elapsed_seconds"]
    mib = sum(r["bytes_down"] + r["bytes_up"] for r in until) / 2**20
    prefix = "" if reached is not None else ">"
    return {
        "seconds": f"{prefix}{seconds:,.0f}",
        "mib": f"{prefix}{mib:,.0f}",
        "seconds_value": seconds if reached is not None else None,
        "mib_value": mib if reached is not None else None,
    }


PERSONALIZATION_ORDER = {"Dir(0.1)": 0, "#C=2": 1}
PERSONALIZATION_PNG = "personalization.png"
LOCAL_ONLY = "local_only"  # runs/<partition>/local_only: experiments.personalization.local_only
SPREAD = ("mean", "p10", "median", "p90")


def personalization(runs: list[Run]) -> Table:
    """Local accuracy on the clients' own test splits at the last round: the global model,
    it fine-tuned for k epochs, and local-only training, over the same evaluated clients."""
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.config["personalize"]["epochs"]):
        groups.setdefault(_partition(run.config), []).append(run)
    header = ["partition", "model", "clients", "mean", "p10", "median", "p90", "central acc."]
    rows, csv_rows = [], []
    curves: dict[str, list[tuple[str, list[float]]]] = {}
    for part, group in sorted(groups.items(), key=lambda g: PERSONALIZATION_ORDER.get(g[0], 9)):
        last = group[0].rounds[-1]["round"]
        evaluated = [c for c in _clients_csv(group[0].path) if c["last_eval_round"] == str(last)]
        ids = {c["client"] for c in evaluated}
        methods = [("global model (FedAvg)", group[0], "local_acc_global")]
        methods += [
            (f"personalized, k={r.config['personalize']['epochs']}", r, "local_acc_personal")
            for r in group
        ]
        for label, run, column in methods:
            values = [
                float(c[column])
                for c in _clients_csv(run.path)
                if c["last_eval_round"] == str(last)
            ]
            curves.setdefault(part, []).append((label, values))
            central = f"{run.final_accuracy:.4f}" if column == "local_acc_global" else "—"
            rows.append([part, label, len(values), *_spread_cells(values), central])
            csv_rows.append(_personal_row(run.path, part, label, values, last))
        alone = group[0].path.parent / LOCAL_ONLY
        if (alone / "local_only.json").is_file():
            epochs = json.loads((alone / "local_only.json").read_text())["epochs"]
            values = [
                float(c["local_acc_local_only"])
                for c in _clients_csv(alone, "clients.csv")
                if c["client"] in ids
            ]
            label = f"local-only, {epochs} epochs"
            curves[part].append((label, values))
            rows.append([part, label, len(values), *_spread_cells(values), "—"])
            csv_rows.append(_personal_row(alone, part, label, values, last))
    return Table(
        markdown(header, rows),
        csv_rows,
        {f"{p}: central accuracy": [("FedAvg", g[0])] for p, g in groups.items()},
        figures={PERSONALIZATION_PNG: lambda path: _plot_local_accuracies(curves, path)},
    )


def _clients_csv(folder: Path, name: str = "clients.csv") -> list[dict[str, str]]:
    with (folder / name).open() as f:
        return list(csv.DictReader(f))


def _spread_cells(values: Sequence[float]) -> list[str]:
    if not values:
        return ["—"] * len(SPREAD)
    # "inclusive": NumPy's default percentiles, as the run's metrics.csv columns use.
    cuts = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else []
    p10, median, p90 = cuts[::4] if cuts else (values[0],) * 3
    return [f"{v:.3f}" for v in (statistics.mean(values), p10, median, p90)]


def _personal_row(
    path: Path, part: str, label: str, values: Sequence[float], last: int
) -> dict[str, Any]:
    cells = _spread_cells(values)
    return {
        "run": str(path),
        "partition": part,
        "model": label,
        "round": last,
        "clients": len(values),
        **{f"local_acc_{s}": c for s, c in zip(SPREAD, cells, strict=True)},
    }


def _plot_local_accuracies(curves: dict[str, list[tuple[str, list[float]]]], path: Path) -> None:
    # One ECDF per model and partition of the clients' local accuracies at the last round.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(curves), figsize=(6 * len(curves), 4), squeeze=False, layout="constrained"
    )
    for ax, (part, lines) in zip(axes.flat, curves.items(), strict=True):
        for label, values in lines:
            xs = sorted(values)
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
        ax.set_title(f"{part}: clients evaluated in the last round", fontsize=10)
        ax.set_xlabel("accuracy on the client's local test split")
        ax.set_ylabel("share of clients")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


TRANSFER_TARGETS = (0.75, 0.85)  # 0.85: conf/experiment/transfer.yaml
TRANSFER_VARIANTS = {
    ("head", True): "head only, pretrained base (personalization layout)",
    ("all", False): "full model from scratch",
    ("all", True): "full model from the pretrained weights",
}


def transfer(runs: list[Run]) -> Table:
    """Head-only FL on a pretrained base vs full-model FL from scratch or from the pretrained
    weights, per client count and partition."""

    def variant(run: Run) -> tuple[str, bool]:
        return run.config["model"]["trainable"], bool(run.config["model"]["pretrained"])

    order = list(TRANSFER_VARIANTS)
    runs = sorted(
        runs,
        key=lambda r: (r.config["num_clients"], _partition(r.config), order.index(variant(r))),
    )
    header = [
        "clients",
        "partition",
        "what is federated",
        *(f"rounds to {t:.0%}" for t in TRANSFER_TARGETS),
        "final acc.",
        "KiB up per client per round",
        "client train s per round (median)",
        ".tflite KiB",
    ]
    rows, csv_rows = [], []
    panels: dict[str, list[tuple[str, Run]]] = {}
    for run in runs:
        info = json.loads((run.path / "metrics.json").read_text())
        up = statistics.median(r["bytes_up"] / max(r["clients_replied"], 1) for r in run.trained)
        train_s = statistics.median(r["train_seconds"] for r in run.trained)
        size = info.get("model_bytes")
        name = TRANSFER_VARIANTS[variant(run)]
        rows.append(
            [
                run.config["num_clients"],
                _partition(run.config),
                name,
                *(_rounds_cell(run, t) for t in TRANSFER_TARGETS),
                f"{run.final_accuracy:.4f}",
                f"{up / 1024:,.1f}",
                f"{train_s:.3f}",
                "—" if size is None else f"{size / 1024:,.0f}",
            ]
        )
        csv_rows.append(
            {
                **_csv_row(run, TRANSFER_TARGETS),
                "variant": name,
                "kib_up_per_client_round": up / 1024,
                "client_train_seconds": train_s,
                "tflite_bytes": size,
            }
        )
        title = f"{run.config['num_clients']} clients, {_partition(run.config)}"
        panels.setdefault(title, []).append((name, run))
    return Table(markdown(header, rows), csv_rows, panels)


DP_PNG = "accuracy_vs_epsilon.png"
DP_CEILING = "FedAvg, no DP"


@dataclass(frozen=True)
class DpRun:
    """A DP run (its mechanism and the epsilon its metrics.json reports) or the ceiling."""

    run: Run
    z: float | None = None  # noise multiplier; None: no DP wrapper
    clip: float | None = None
    sampled: int = 0  # num_sampled_clients: the noise on the average is z C / sampled
    epsilon: float | None = None
    delta: float | None = None
    sampling: str | None = None


def _dp_run(run: Run) -> DpRun:
    s = run.config.get("strategy", {})
    if "noise_multiplier" not in s:
        return DpRun(run)
    privacy = json.loads((run.path / "metrics.json").read_text()).get("privacy") or {}
    return DpRun(
        run,
        float(s["noise_multiplier"]),
        float(s["clipping_norm"]),
        int(s["num_sampled_clients"]),
        privacy.get("epsilon"),
        privacy.get("delta"),
        privacy.get("sampling"),
    )


def dp(runs: list[Run]) -> Table:
    """DP-FedAvg (server-side fixed clipping): final and best accuracy against the epsilon
    spent, per noise multiplier and clipping norm, and the non-private FedAvg ceiling."""
    every = [_dp_run(r) for r in runs]
    ceiling = [d for d in every if d.z is None]
    private = sorted((d for d in every if d.z is not None), key=lambda d: (-d.clip, d.z))
    header = [
        "setting",
        "clipping norm C",
        "noise multiplier z",
        "noise std on the average (z C / m)",
        "ε",
        "δ",
        "rounds",
        "final acc.",
        "best acc.",
    ]
    rows, csv_rows = [], []
    for d in ceiling + private:
        run = d.run
        if d.z is None:
            cells = [DP_CEILING, "—", "—", "—", "∞", "—"]
        else:
            cells = [
                "DP-FedAvg",
                f"{d.clip:g}",
                f"{d.z:g}",
                f"{d.z * d.clip / d.sampled:.4f}",
                "—" if d.epsilon is None else f"{d.epsilon:.2f}",
                "—" if d.delta is None else f"{d.delta:.1e}",
            ]
        rows.append(
            [*cells, len(run.trained), f"{run.final_accuracy:.4f}", f"{run.best_accuracy:.4f}"]
        )
        csv_rows.append(
            {
                **_csv_row(run, ()),
                "strategy": strategy_label(run.config),
                "noise_multiplier": d.z,
                "clipping_norm": d.clip,
                "epsilon": d.epsilon,
                "delta": d.delta,
                "sampling": d.sampling,
            }
        )
    panels: dict[str, list[tuple[str, Run]]] = {}
    for clip in dict.fromkeys(d.clip for d in private):
        curves = [(DP_CEILING, d.run) for d in ceiling]
        curves += [(f"z = {d.z:g}", d.run) for d in private if d.clip == clip]
        panels[f"clipping norm C = {clip:g}"] = curves
    return Table(
        markdown(header, rows),
        csv_rows,
        panels,
        figures={DP_PNG: lambda path: _plot_accuracy_vs_epsilon(ceiling, private, path)},
    )


def _plot_accuracy_vs_epsilon(ceiling: list[DpRun], private: list[DpRun], path: Path) -> None:
    # Final (filled) and best (hollow) accuracy against epsilon, one line per clipping norm, each
    # point labelled with its noise multiplier; the non-private run as a horizontal line.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for i, clip in enumerate(dict.fromkeys(d.clip for d in private)):
        mine = sorted((d for d in private if d.clip == clip), key=lambda d: d.epsilon or 0.0)
        eps = [d.epsilon for d in mine]
        colour = cycle[i % len(cycle)]
        final = [d.run.final_accuracy for d in mine]
        ax.plot(eps, final, "o-", color=colour, label=f"C = {clip:g}, final")
        best = [d.run.best_accuracy for d in mine]
        ax.plot(eps, best, "o--", mfc="none", color=colour, alpha=0.6, label=f"C = {clip:g}, best")
        for d, e, acc in zip(mine, eps, final, strict=True):
            offset = (4, -11) if i else (4, 5)
            ax.annotate(
                f"z={d.z:g}", (e, acc), textcoords="offset points", xytext=offset, fontsize=7
            )
    for d in ceiling:
        acc = d.run.final_accuracy
        ax.axhline(acc, color="black", ls=":", label=f"{DP_CEILING} (ε = ∞), final: {acc:.3f}")
    first = (private or ceiling)[0]
    cfg = first.run.config
    delta = first.delta
    ax.set_xscale("log")
    ax.set_xlabel("ε after the last round" + (f" (δ = {delta:.1e})" if delta else ""))
    ax.set_ylabel("central test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    per_round = first.run.trained[-1]["clients_sampled"]
    ax.set_title(
        f"DP-FedAvg, {cfg['model']['name']}, {cfg['num_clients']:,} clients, {per_round} a "
        f"round, {len(first.run.trained)} rounds",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENTS: dict[str, Callable[[list[Run]], Table]] = {
    "ondevice_fmnist": ondevice_fmnist,
    "mcmahan2017": mcmahan2017,
    "niid_bench": niid_bench,
    "device_time": device_time,
    "personalization": personalization,
    "transfer": transfer,
    "dp": dp,
}


# -- outputs --------------------------------------------------------------------------------------
def plot(
    panels: dict[str, list[tuple[str, Run]]], path: Path, title: str, x_axis: str = "round"
) -> None:
    """Central test accuracy against round (or simulated seconds), one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per curve label across panels, so "IID" is the same colour everywhere.
    labels = list(dict.fromkeys(label for curves in panels.values() for label, _ in curves))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}
    cols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False, layout="constrained"
    )
    for ax, (name, curves) in zip(axes.flat, panels.items(), strict=False):
        for label, run in curves:
            ax.plot(
                [_x(r, x_axis) for r in run.rounds],
                [r["accuracy"] for r in run.rounds],
                marker="o" if len(run.rounds) <= 30 else None,
                ms=2.5,
                color=colour[label],
                label=label,
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("simulated seconds on the phones" if x_axis == "sim_seconds" else "round")
        ax.set_ylabel("central test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _x(row: dict[str, Any], x_axis: str) -> float:
    return row["sim_elapsed_seconds"] if x_axis == "sim_seconds" else row["round"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def embed(readme: Path, text: str) -> bool:
    """Replace the README's text between BEGIN and END with ``text``; False if no markers."""
    if not readme.is_file():
        return False
    doc = readme.read_text()
    if BEGIN not in doc or END not in doc:
        return False
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return True


def build(name: str, root: Path) -> str:
    """Write results.md/csv and accuracy.png for one experiment; return the markdown."""
    folder = root / name
    runs = load_runs(folder)
    if not runs:
        raise SystemExit(f"no metrics.json under {folder / 'runs'}: run the experiment first")
    table = EXPERIMENTS[name](runs)
    # Paths relative to the repository root, so the CSV does not depend on where it was made.
    for row in table.csv_rows:
        row["run"] = str(Path(row["run"]).relative_to(root.parent))
    (folder / RESULTS_MD).write_text(table.markdown + "\n")
    write_csv(table.csv_rows, folder / RESULTS_CSV)
    plot(table.panels, folder / ACCURACY_PNG, name, table.x_axis)
    for file_name, draw in table.figures.items():
        draw(folder / file_name)
    embed(folder / "README.md", table.markdown)
    return table.markdown


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m experiments.tables NAME...``: print and write each experiment's table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"any of {sorted(EXPERIMENTS)} (default: all)")
    parser.add_argument("--root", type=Path, default=Path("experiments"), help="experiments dir")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiment(s) {sorted(unknown)}: choose from {sorted(EXPERIMENTS)}")
    for name in args.names or EXPERIMENTS:
        print(f"## {name}\n\n{build(name, args.root.resolve())}\n")


if __name__ == "__main__":
    main()
