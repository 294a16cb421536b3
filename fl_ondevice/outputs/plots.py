"""A run's plots: central accuracy and loss per round, the clients' local accuracies."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fl_ondevice.outputs.clients import ClientRecord

ACCURACY_PNG = "accuracy.png"
PERSONALIZATION_PNG = "personalization.png"  # personalize.epochs > 0: per-client accuracies


def plot_accuracy(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str
) -> None:
    """Central accuracy and loss against round, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, ax_acc = plt.subplots(figsize=(7, 4), layout="constrained")
    ax_acc.plot(
        rounds, [r["accuracy"] for r in rows], "o-", color="tab:blue", ms=3, label="accuracy"
    )
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("central test accuracy", color="tab:blue")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_loss = ax_acc.twinx()
    ax_loss.plot(rounds, [r["loss"] for r in rows], "s--", color="tab:red", ms=3, label="loss")
    ax_loss.set_ylabel("central test loss", color="tab:red")
    ax_acc.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_personalization(
    records: Sequence[ClientRecord], path: str | os.PathLike[str], title: str
) -> None:
    """ECDFs of the clients' local accuracy, global vs personalized model, at the last
    evaluation round (the clients evaluated in it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max((r.last_eval_round for r in records if r.last_eval_round is not None), default=0)
    evaluated = [r for r in records if r.last_eval_round == last]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, label, colour in (
        ("local_acc_global", "global model", "tab:blue"),
        ("local_acc_personal", "personalized", "tab:orange"),
    ):
        values = np.sort([v for r in evaluated if (v := getattr(r, name)) is not None])
        if len(values):
            shares = np.arange(1, len(values) + 1) / len(values)
            ax.step(
                values,
                shares,
                where="post",
                color=colour,
                label=f"{label}, mean {values.mean():.3f}",
            )
    ax.set_xlabel("accuracy on the client's local test split")
    ax.set_ylabel("share of clients")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{title}\nround {last}, {len(evaluated)} clients evaluated", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
