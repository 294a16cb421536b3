"""Median train-step time: TFLite interpreter vs TF tf.function vs Keras train_on_batch."""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Before TF is imported: its C++ INFO lines (oneDNN, CPU features) are noise in a timing table.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from fl_ondevice.config import ModelConfig  # noqa: E402
from fl_ondevice.ondevice.convert import convert  # noqa: E402
from fl_ondevice.ondevice.device import OnDeviceModel  # noqa: E402
from fl_ondevice.ondevice.layouts import TRAIN  # noqa: E402
from fl_ondevice.ondevice.model import TrainableModel, build_model  # noqa: E402

INPUT_SHAPE = (28, 28)  # Fashion-MNIST images
NUM_CLASSES = 10
LEARNING_RATE = 0.01
SEED = 0
MODELS = ("mlp", "2nn", "cnn", "simple_cnn")
DENSE_MODELS = ("mlp", "2nn")
CONTENDERS = ("tflite", "tf", "keras")
CHECK_STEPS = 3  # optimizer steps compared across contenders from identical weights
TFLITE_TF_TOL = 1e-5  # |loss difference|, same graph in two runtimes
KERAS_TOL = 1e-4  # |loss difference|, same math written as Keras layers (other kernels)
N_BATCHES = 8  # distinct random batches cycled through, so no step sees a cached input

Step = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Result:
    """Per-step times (ms) of one (model, batch) cell: median and quartiles per contender."""

    model: str
    batch: int
    steps: int
    median_ms: dict[str, float]
    p25_ms: dict[str, float]
    p75_ms: dict[str, float]

    def ratio(self, a: str, b: str) -> float:
        return self.median_ms[a] / self.median_ms[b]


# -- the Keras twin of each architecture of fl_ondevice.ondevice.model ---------------------------
def keras_model(name: str) -> keras.Sequential:
    """The architecture ``fl_ondevice.ondevice.model`` builds, as Keras layers (same weight order).

    CNN blocks are conv 5x5 (+bias) -> ReLU -> 2x2 max-pool with SAME padding, as in model.py;
    Flatten of NHWC matches model.py's ``tf.reshape`` row-major order.
    """
    layers: list[keras.Layer] = [keras.Input(INPUT_SHAPE)]
    if name in DENSE_MODELS:
        hidden = {"mlp": [128], "2nn": [200, 200]}[name]
        layers.append(keras.layers.Flatten())
    else:
        convs, hidden, padding = {
            "cnn": ([32, 64], [512], "same"),
            "simple_cnn": ([6, 16], [120, 84], "valid"),
        }[name]
        layers.append(keras.layers.Reshape((*INPUT_SHAPE, 1)))
        for c in convs:
            layers.append(keras.layers.Conv2D(c, 5, padding=padding, activation="relu"))
            layers.append(keras.layers.MaxPooling2D(2, padding="same"))
        layers.append(keras.layers.Flatten())
    layers += [keras.layers.Dense(h, activation="relu") for h in hidden]
    layers.append(keras.layers.Dense(NUM_CLASSES))
    model = keras.Sequential(layers, name=f"keras_{name}")
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # Keras' "auto" already disables XLA on a CPU-only machine; say so explicitly.
        jit_compile=False,
    )
    return model


# -- contenders -----------------------------------------------------------------------------------
class Contenders:
    """The three implementations of one model, all starting from the same initial weights."""

    def __init__(self, name: str, threads: int) -> None:
        cfg = ModelConfig(name=name, optimizer="sgd", learning_rate=LEARNING_RATE)
        # Two modules with one seed: the TF contender trains one, the other is converted, so the
        # .tflite holds the untrained weights whatever the TF module has done since.
        self.tf_module: TrainableModel = build_model(cfg, INPUT_SHAPE, NUM_CLASSES, SEED)
        to_convert = build_model(cfg, INPUT_SHAPE, NUM_CLASSES, SEED)
        self.names = list(to_convert.weight_names)
        self.initial = [w.numpy() for w in to_convert.weights_]
        self.device = OnDeviceModel(convert(to_convert), num_threads=threads)
        # Time the `train` signature runner itself, not OnDeviceModel.train_step, whose input
        # checks (dtype, shape, label range, finite loss) would add ~10-20 us per step.
        self.runner = self.device.interpreter.get_signature_runner(TRAIN)
        self.keras = keras_model(name)
        shapes = [tuple(w.shape) for w in self.keras.weights]
        if shapes != [w.shape for w in self.initial]:
            raise RuntimeError(f"{name}: Keras weight shapes {shapes} != fl_ondevice's")
        self.steps: dict[str, Step] = {
            "tflite": self._tflite,
            "tf": self._tf,
            "keras": self._keras,
        }

    def _tflite(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.runner(x=x, y=y)["loss"])

    def _tf(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.tf_module.train(x, y)["loss"])

    def _keras(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.keras.train_on_batch(x, y))

    def reset(self) -> None:
        """Put all three back on the initial weights."""
        self.device.set_weights(dict(zip(self.names, self.initial, strict=True)))
        for v, w in zip(self.tf_module.weights_, self.initial, strict=True):
            v.assign(w)
        self.keras.set_weights(self.initial)


def check_agreement(c: Contenders, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> str:
    """Run the first CHECK_STEPS steps in each contender from identical weights; compare losses.

    Raises ``RuntimeError`` when TFLite and TF differ by more than TFLITE_TF_TOL or Keras and TF
    by more than KERAS_TOL, i.e. when the timed programs would not compute the same thing.
    """
    c.reset()
    losses = {k: np.array([c.steps[k](x, y) for x, y in batches[:CHECK_STEPS]]) for k in c.steps}
    d_lite = float(np.max(np.abs(losses["tflite"] - losses["tf"])))
    d_keras = float(np.max(np.abs(losses["keras"] - losses["tf"])))
    msg = (
        f"losses of steps 1-{CHECK_STEPS} (tf) {np.array2string(losses['tf'], precision=6)}; "
        f"max |tflite-tf| {d_lite:.1e}, max |keras-tf| {d_keras:.1e}"
    )
    if not (d_lite <= TFLITE_TF_TOL and d_keras <= KERAS_TOL):
        raise RuntimeError(
            f"contenders disagree ({msg}); tolerances {TFLITE_TF_TOL:g} and {KERAS_TOL:g}"
        )
    return msg


def time_cell(
    c: Contenders,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    steps: int,
    warmup: int,
    block: int,
) -> dict[str, np.ndarray]:
    """Per-step seconds of each contender, interleaved round-robin in blocks of ``block`` steps.

    Interleaving spreads the shared machine's slow and fast periods over all three contenders
    instead of letting one of them run entirely inside a slow period.
    """
    for step in c.steps.values():  # traces tf.functions / allocates the interpreter arena
        for i in range(warmup):
            step(*batches[i % len(batches)])
    times: dict[str, list[float]] = {k: [] for k in c.steps}
    i = 0
    while len(times["tflite"]) < steps:
        n = min(block, steps - len(times["tflite"]))
        for k, step in c.steps.items():
            for j in range(n):
                x, y = batches[(i + j) % len(batches)]
                t0 = time.perf_counter()
                step(x, y)
                times[k].append(time.perf_counter() - t0)
        i += n
    return {k: np.asarray(v) for k, v in times.items()}


def random_batches(batch: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.random((batch, *INPUT_SHAPE), dtype=np.float32),  # (batch, 28, 28) in [0, 1)
            rng.integers(0, NUM_CLASSES, batch).astype(np.int32),  # (batch,)
        )
        for _ in range(N_BATCHES)
    ]


# -- output ---------------------------------------------------------------------------------------
def table(results: Sequence[Result]) -> str:
    """A Markdown table: medians per contender and the TFLite ratios."""
    rows = [
        "| model | batch | tflite ms | tf ms | keras ms | tflite/tf | tflite/keras |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        m = r.median_ms
        rows.append(
            f"| {r.model} | {r.batch} | {m['tflite']:.3f} | {m['tf']:.3f} | {m['keras']:.3f} | "
            f"{r.ratio('tflite', 'tf'):.2f} | {r.ratio('tflite', 'keras'):.2f} |"
        )
    return "\n".join(rows)


def write_csv(results: Sequence[Result], path: Path, threads: int) -> None:
    fields = ["model", "batch", "threads", "steps"]
    for k in CONTENDERS:
        fields += [f"{k}_ms", f"{k}_p25_ms", f"{k}_p75_ms"]
    fields += ["tflite_over_tf", "tflite_over_keras"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            row: dict[str, object] = {
                "model": r.model,
                "batch": r.batch,
                "threads": threads,
                "steps": r.steps,
                "tflite_over_tf": round(r.ratio("tflite", "tf"), 4),
                "tflite_over_keras": round(r.ratio("tflite", "keras"), 4),
            }
            for k in CONTENDERS:
                row[f"{k}_ms"] = round(r.median_ms[k], 4)
                row[f"{k}_p25_ms"] = round(r.p25_ms[k], 4)
                row[f"{k}_p75_ms"] = round(r.p75_ms[k], 4)
            w.writerow(row)


def plot(results: Sequence[Result], path: Path, threads: int) -> None:
    """One panel per model: grouped bars of median ms per batch size, whiskers at p25-p75."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    width = 0.27
    for ax, model in zip(axes[0], models, strict=True):
        rs = [r for r in results if r.model == model]
        x = np.arange(len(rs))
        for i, k in enumerate(CONTENDERS):
            med = np.array([r.median_ms[k] for r in rs])
            err = np.array(
                [[m - r.p25_ms[k], r.p75_ms[k] - m] for r, m in zip(rs, med, strict=True)]
            ).T
            ax.bar(x + (i - 1) * width, med, width, yerr=err, capsize=2, label=k)
        ax.set_xticks(x, [str(r.batch) for r in rs])
        ax.set_xlabel("batch size")
        ax.set_title(model)
    axes[0][0].set_ylabel("median train step (ms)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(CONTENDERS))
    fig.suptitle(f"Train-step time, {threads} thread(s), SGD lr {LEARNING_RATE}", x=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model name as ``lscpu`` shows it (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[10, 32, 64])
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per contender and cell (default: 200 for mlp/2nn, 60 for CNNs)",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per contender and cell")
    p.add_argument("--block", type=int, default=5, help="steps per contender per round-robin turn")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="interpreter num_threads = TF intra-op threads (inter-op is 1)",
    )
    p.add_argument("--out", type=Path, default=Path("experiments/results/bench_device"))
    args = p.parse_args(argv)
    if args.threads < 1 or args.warmup < 0 or args.block < 1 or min(args.batches) < 1:
        p.error("--threads, --block and --batches must be >= 1 and --warmup >= 0")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    # Must happen before TF executes anything; Flex ops inside the interpreter follow these too.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    keras.utils.set_random_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)

    print(
        f"TF {tf.__version__}, Keras {keras.__version__}, {cpu_name()}, "
        f"{os.cpu_count()} CPUs; threads={args.threads} (TFLite num_threads and TF intra-op), "
        "TFLite timed via the 'train' signature runner"
    )
    t_start = time.perf_counter()
    results: list[Result] = []
    for name in args.models:
        t0 = time.perf_counter()
        c = Contenders(name, args.threads)
        print(f"\n{name}: built and converted in {time.perf_counter() - t0:.1f} s")
        steps = args.steps or (200 if name in DENSE_MODELS else 60)
        for batch in args.batches:
            batches = random_batches(batch, SEED + batch)
            print(f"  batch {batch:3d} check: {check_agreement(c, batches)}")
            times = time_cell(c, batches, steps, args.warmup, args.block)
            ms = {k: 1e3 * v for k, v in times.items()}
            r = Result(
                model=name,
                batch=batch,
                steps=steps,
                median_ms={k: float(np.median(v)) for k, v in ms.items()},
                p25_ms={k: float(np.percentile(v, 25)) for k, v in ms.items()},
                p75_ms={k: float(np.percentile(v, 75)) for k, v in ms.items()},
            )
            results.append(r)
            med = ", ".join(f"{k} {v:.3f}" for k, v in r.median_ms.items())
            print(f"  batch {batch:3d} median ms: {med}")
        del c
        keras.backend.clear_session()

    print(f"\nMedian train-step time, {args.threads} thread(s):\n")
    print(table(results))
    write_csv(results, args.out / "bench_device.csv", args.threads)
    plot(results, args.out / "bench_device.png", args.threads)
    print(f"\nwrote {args.out / 'bench_device.csv'} and {args.out / 'bench_device.png'}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return results


if __name__ == "__main__":
    main()
