"""The partition report of a run: partition.csv, partition.json and partition.png."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fl_ondevice.data.local import Partition

log = logging.getLogger(__name__)

PARTITION_CSV = "partition.csv"
PARTITION_PNG = "partition.png"
PARTITION_JSON = "partition.json"


def label_counts(
    partitions: Sequence[Partition], labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """Per-client label counts over train and local test indices: (clients, num_classes) int64."""
    return np.stack(
        [
            np.bincount(
                labels[np.concatenate([p.train_indices, p.test_indices])], minlength=num_classes
            )
            for p in partitions
        ]
    ).astype(np.int64)


def partition_summary(
    partitions: Sequence[Partition], labels: np.ndarray, num_classes: int
) -> dict[str, float | int]:
    """Numbers that describe a partition: client sizes and label skew.

    Label skew compares each client's label distribution ``q`` with the label distribution ``p``
    of the whole training set: total-variation distance ``0.5 * sum |q - p|`` and Jensen-Shannon
    divergence (base 2); both are 0 for identical distributions and 1 for disjoint supports.

    Parameters
    ----------
    partitions : sequence of Partition
        The clients' shares.
    labels : np.ndarray
        (N,) labels of the training set the indices point into.
    num_classes : int
        Number of classes.

    Returns
    -------
    dict
        ``num_clients``, ``num_assigned``, ``num_train``, ``num_test``, ``examples_min``,
        ``examples_median``, ``examples_max``, ``labels_per_client_mean``, ``tv_mean``,
        ``js_mean``.
    """
    counts = label_counts(partitions, labels, num_classes)  # (K, C)
    sizes = counts.sum(axis=1)
    q = counts / np.maximum(sizes, 1)[:, None]  # (K, C) client label distributions
    p = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)  # (C,)
    tv = 0.5 * np.abs(q - p).sum(axis=1)
    m = 0.5 * (q + p)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log2(a / b), 0.0)
        return terms.sum(axis=1)

    js = 0.5 * kl(q, m) + 0.5 * kl(np.broadcast_to(p, q.shape), m)
    return {
        "num_clients": len(partitions),
        "num_assigned": int(sizes.sum()),
        "num_train": int(sum(len(x.train_indices) for x in partitions)),
        "num_test": int(sum(len(x.test_indices) for x in partitions)),
        "examples_min": int(sizes.min()),
        "examples_median": float(np.median(sizes)),
        "examples_max": int(sizes.max()),
        "labels_per_client_mean": float((counts > 0).sum(axis=1).mean()),
        "tv_mean": float(tv.mean()),
        "js_mean": float(js.mean()),
    }


def format_summary(summary: dict[str, float | int], num_examples: int) -> str:
    """One line for logs and plot titles from ``partition_summary``'s numbers."""
    return (
        f"{summary['num_clients']} clients, {summary['num_assigned']}/{num_examples} examples "
        f"assigned ({summary['num_train']} train / {summary['num_test']} local test); "
        f"examples per client min {summary['examples_min']} / median "
        f"{summary['examples_median']:g} / max {summary['examples_max']}; "
        f"labels per client {summary['labels_per_client_mean']:.1f}; label skew vs global: "
        f"mean TV {summary['tv_mean']:.3f}, mean JS {summary['js_mean']:.3f} (0 = IID)"
    )


def write_partition_report(
    partitions: Sequence[Partition],
    labels: np.ndarray,
    num_classes: int,
    out_dir: str | os.PathLike[str],
    description: str | None = None,
) -> str:
    """Write ``partition.csv``, ``partition.json`` and ``partition.png`` and return the summary.

    Parameters
    ----------
    partitions : sequence of Partition
        The clients' shares.
    labels : np.ndarray
        (N,) labels of the training set.
    num_classes : int
        Number of classes C.
    out_dir : str or PathLike
        Directory to write into (created if missing).
    description : str, optional
        What was partitioned (e.g. ``"fashion_mnist, dirichlet(alpha=0.1), seed 0"``): first
        line of the plot title and a key of ``partition.json``.

    Returns
    -------
    str
        One-line summary: examples per client (min / median / max) and label skew (mean
        total-variation and Jensen-Shannon distance from the global label distribution).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = label_counts(partitions, labels, num_classes)
    summary = partition_summary(partitions, labels, num_classes)
    line = format_summary(summary, len(labels))

    header = ["client", "n_train", "n_test"] + [f"label_{c}" for c in range(num_classes)]
    rows = [",".join(header)]
    for p, row in zip(partitions, counts, strict=True):
        values = [p.client_id, len(p.train_indices), len(p.test_indices), *row.tolist()]
        rows.append(",".join(str(v) for v in values))
    (out / PARTITION_CSV).write_text("\n".join(rows) + "\n")
    report = {"description": description, **summary, "summary": line}
    (out / PARTITION_JSON).write_text(json.dumps(report, indent=2) + "\n")
    _plot_partition(counts, line, description, out / PARTITION_PNG)
    log.info("partition: %s", line)
    return line


def _plot_partition(counts: np.ndarray, summary: str, description: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    num_clients, num_classes = counts.shape
    # Clients along x: the figure widens with the client count up to a cap, then cells get thin.
    width = float(np.clip(4 + 0.12 * num_clients, 8, 18))
    fig, (ax_size, ax_map) = plt.subplots(
        2,
        1,
        figsize=(width, 3 + 0.3 * num_classes),
        sharex=True,
        gridspec_kw={"height_ratios": [1, 3]},
        layout="constrained",
    )
    clients = np.arange(num_clients)
    ax_size.bar(
        clients, counts.sum(axis=1), width=0.9 if num_clients <= 200 else 1.0, color="tab:gray"
    )
    ax_size.set_ylabel("examples")
    ax_size.grid(axis="y", alpha=0.3)
    image = _draw_label_shares(ax_map, counts)
    ax_map.set_yticks(np.arange(num_classes))
    ax_map.set_ylabel("label")
    ax_map.set_xlabel("client")
    ax_map.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
    fig.colorbar(image, ax=ax_map, label="share of client's examples", pad=0.01)
    title = _wrap(summary, width)
    if description:
        title = f"{description}\n{title}"
    ax_size.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_label_shares(ax: Any, counts: np.ndarray) -> Any:
    """The clients x labels heat map on ``ax``; returns the image (for its colour bar)."""
    import matplotlib.pyplot as plt

    num_clients, num_classes = counts.shape
    # Colour = share of the client's examples with that label: comparable across client sizes.
    # Absent labels are white, so "none" stands apart from "a few".
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    masked = np.ma.masked_equal(shares.T, 0.0)
    image = ax.imshow(
        masked,
        aspect="auto",
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        origin="lower",
        extent=(-0.5, num_clients - 0.5, -0.5, num_classes - 0.5),
    )
    if num_clients <= 20:
        for i in range(num_clients):
            for c in range(num_classes):
                if counts[i, c]:
                    ax.text(
                        i,
                        c,
                        str(counts[i, c]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if shares[i, c] < 0.6 else "black",
                    )
    return image


def _wrap(text: str, width_inches: float) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width=int(width_inches * 13)))
