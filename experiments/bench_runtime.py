"""The clients' runtime, before and after the LiteRT move: one train step and one infer call of
each model, the Flex files of the commit before on TF 2.18's interpreter vs today's Flex-free
files on LiteRT, interleaved in one process.

Needs both interpreters in one environment: the ``flex`` extra (TF 2.18.1) next to
ai-edge-litert. The "before" files come from the commit before the move (see
``experiments/bench_device.md`` for the commands); today's are converted here.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Before TF is imported: its C++ INFO lines are noise in a timing table, and TF's own threads
# (which the Flex ops of the "before" files use) are pinned like the interpreters' (1).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from ai_edge_litert.interpreter import Interpreter as LiteRtInterpreter  # noqa: E402

from fl_ondevice.config import ModelConfig  # noqa: E402
from fl_ondevice.ondevice.convert import convert  # noqa: E402
from fl_ondevice.ondevice.interpreters import flex_ops  # noqa: E402
from fl_ondevice.ondevice.layouts import INFER, TRAIN  # noqa: E402
from fl_ondevice.ondevice.model import build_model  # noqa: E402

MODELS = ("mlp", "2nn", "cnn", "simple_cnn")
INPUT_SHAPE, NUM_CLASSES, LEARNING_RATE, SEED = (28, 28), 10, 0.01, 0
Call = Callable[[], object]


def runners(before: bytes, after: bytes, batch: int, seed: int) -> dict[str, dict[str, Call]]:
    """``{"train"|"infer": {"before": call, "after": call}}`` on one random batch."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *INPUT_SHAPE), dtype=np.float32)  # (batch, 28, 28) in [0, 1)
    y = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    old = tf.lite.Interpreter(model_content=before, num_threads=1)  # links the Flex delegate
    new = LiteRtInterpreter(model_content=after, num_threads=1)
    out: dict[str, dict[str, Call]] = {"train": {}, "infer": {}}
    for label, interpreter in (("before", old), ("after", new)):
        train = interpreter.get_signature_runner(TRAIN)
        infer = interpreter.get_signature_runner(INFER)
        out["train"][label] = lambda t=train: t(x=x, y=y)
        out["infer"][label] = lambda i=infer: i(x=x)
    return out


def median_ms(calls: dict[str, Call], rounds: int, block: int) -> dict[str, float]:
    """Median ms per call, the contenders taking turns in blocks of ``block`` calls."""
    for call in calls.values():  # allocates each interpreter's arena
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            for _ in range(block):
                t0 = time.perf_counter()
                call()
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--before", type=Path, required=True, help="directory of <model>.tflite")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[10, 32, 64])
    p.add_argument("--rounds", type=int, default=8, help="turns per contender and cell")
    p.add_argument("--block", type=int, default=3, help="calls per contender per turn")
    p.add_argument("--out", type=Path, default=Path("experiments/results/bench_runtime"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"before: TF {tf.__version__}'s interpreter; after: ai-edge-litert (LiteRT)")
    rows: list[dict[str, object]] = []
    for name in args.models:
        before = (args.before / f"{name}.tflite").read_bytes()
        cfg = ModelConfig(name=name, learning_rate=LEARNING_RATE)
        after = convert(build_model(cfg, INPUT_SHAPE, NUM_CLASSES, SEED))
        if flex_ops(after):
            raise RuntimeError(f"{name}: today's file has Flex ops {flex_ops(after)}")
        for batch in args.batches:
            calls = runners(before, after, batch, SEED + batch)
            for signature, pair in calls.items():
                ms = median_ms(pair, args.rounds, args.block)
                row = {
                    "model": name,
                    "signature": signature,
                    "batch": batch,
                    "before_ms": round(ms["before"], 3),
                    "after_ms": round(ms["after"], 3),
                    "after_over_before": round(ms["after"] / ms["before"], 3),
                }
                rows.append(row)
                print(
                    f"{name:10s} {signature:5s} B={batch:3d}  before {ms['before']:8.2f} ms  "
                    f"after {ms['after']:8.2f} ms  after/before {row['after_over_before']:.2f}",
                    flush=True,
                )
    with (args.out / "bench_runtime.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
