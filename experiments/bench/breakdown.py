"""Per-client-update cost breakdown in one process (no Flower, no Ray): ours vs the Keras peer."""

from __future__ import annotations

import csv
import logging
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

from experiments.bench.runs import CHILD_ENV, Job

log = logging.getLogger("bench")
BREAKDOWN_CSV = "breakdown.csv"
COLUMNS = ("model", "contender", "piece", "median_ms", "p25_ms", "p75_ms", "updates")


def run_breakdown(out: Path, conf_dir: Path, n_updates: int, clients: int = 100) -> None:
    """Time the pieces of ``n_updates`` client updates of mlp and cnn, ours and peer interleaved.

    Ours follows ``fl_ondevice.client.client.train_client`` step by step (plus the ClientApp's
    ArrayRecord conversions); the peer follows experiments.bench.peer's ``train``.
    """
    for key, value in CHILD_ENV.items():  # one TF thread, as in the simulations
        os.environ.setdefault(key, value)
    from hydra import compose, initialize_config_dir

    from fl_ondevice.config import parse_config

    rows = []
    for model, n in (("mlp", n_updates), ("cnn", max(n_updates // 4, 3))):
        job = Job("ours", model, clients, 0.1, 1)
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
            cfg = parse_config(compose("config", overrides=job.overrides(out / "breakdown")))
        times = _time_updates(cfg, n)
        for (contender, piece), ms in times.items():
            q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
            rows.append([model, contender, piece, statistics.median(ms), q[0], q[2], len(ms)])
            log.info("breakdown %s %s %-22s %8.3f ms", model, contender, piece, rows[-1][3])
    with (out / BREAKDOWN_CSV).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)


def _time_updates(cfg, n: int) -> dict[tuple[str, str], list[float]]:  # noqa: ANN001
    """Seconds of each step of ``n`` client updates, ours and the Keras peer's, by (side, step).

    Longer than a screen on purpose: the timed steps stay in the order a client runs them, side
    by side with the peer's, so the table reads as the code does.
    """
    import keras
    from flwr.app import ArrayRecord

    from experiments.bench.peer import keras_twin
    from fl_ondevice.client.client import StagedWeights, client_data, local_seed, train_client
    from fl_ondevice.ondevice.convert import build_tflite
    from fl_ondevice.ondevice.device import OnDeviceModel
    from fl_ondevice.ondevice.model import build_model
    from fl_ondevice.wire.message import from_arrays, to_arrays

    dataset, partitions = client_data(cfg)
    shape, classes = dataset.input_shape, dataset.num_classes
    path = build_tflite(cfg.model, shape, classes, cfg.seed, os.path.expanduser(cfg.cache_dir))
    device = OnDeviceModel(path, num_threads=cfg.client.num_threads)
    initial = [w.numpy() for w in build_model(cfg.model, shape, classes, cfg.seed).weights_]
    record = to_arrays(device.get_weights())  # what the server sends us
    keras_record = ArrayRecord(initial)  # what the peer's server sends
    t: dict[tuple[str, str], list[float]] = defaultdict(list)

    def lap(contender: str, piece: str, t0: float) -> float:
        now = time.perf_counter()
        t[(contender, piece)].append((now - t0) * 1e3)
        return now

    for i in range(n + 1):  # update 0 warms both up (arena allocation, tracing) and is dropped
        cid = i % cfg.num_clients
        # -- ours: the steps of fl_ondevice.client.client.train_client, timed one by one
        t0 = start = time.perf_counter()
        weights = from_arrays(record)
        t0 = lap("ours", "message->arrays", t0)
        idx = partitions[cid].train_indices
        x, y = dataset.train_x(idx), dataset.y_train[idx]
        t0 = lap("ours", "data slicing", t0)
        device.reset_optimizer()
        t0 = lap("ours", "reset optimizer", t0)
        device.set_weights(weights)
        t0 = lap("ours", "set_weights (restore)", t0)
        seed = local_seed(cfg.seed, 1, cid)
        fit = device.fit(x, y, cfg.client.local_epochs, cfg.client.batch_size, seed)
        t[("ours", "inside train signature")].append(fit["train_seconds"] * 1e3)
        t0 = lap("ours", "fit (whole)", t0)
        new = device.get_weights()
        t0 = lap("ours", "get_weights (save)", t0)
        to_arrays(new)
        t0 = lap("ours", "arrays->message", t0)
        lap("ours", "update total", start)
        _checkpoint_pieces(device, new, lap)
        t0 = time.perf_counter()
        staged = StagedWeights().get(device, record, lambda: from_arrays(record))
        train_client(cfg, device, staged, cid, 1)
        lap("ours", "train_client() call", t0)
        # -- the peer: experiments.bench.peer.train without Flower
        t0 = start = time.perf_counter()
        arrays = keras_record.to_numpy_ndarrays()
        t0 = lap("peer", "message->arrays", t0)
        x, y = dataset.train_x(idx), dataset.y_train[idx]
        t0 = lap("peer", "data slicing", t0)
        keras.backend.clear_session()
        t0 = lap("peer", "clear_session", t0)
        model = keras_twin(cfg.model.name, shape, classes, cfg.model.learning_rate)
        t0 = lap("peer", "build + compile", t0)
        model.set_weights(arrays)
        t0 = lap("peer", "set_weights", t0)
        model.fit(x, y, epochs=cfg.client.local_epochs, batch_size=cfg.client.batch_size, verbose=0)
        t0 = lap("peer", "fit (whole)", t0)
        got = model.get_weights()
        t0 = lap("peer", "get_weights", t0)
        ArrayRecord(got)
        t0 = lap("peer", "arrays->message", t0)
        lap("peer", "update total", start)
        if i == 0:
            t.clear()
    total, inside = t[("ours", "update total")], t[("ours", "inside train signature")]
    t[("ours", "everything but train")] = [a - b for a, b in zip(total, inside, strict=True)]
    return t


def _checkpoint_pieces(device, weights, lap) -> None:  # noqa: ANN001
    """What set_weights and get_weights spend: validation, checkpoint file I/O, Flex ops."""
    from fl_ondevice.ondevice.checkpoint import read_checkpoint, write_checkpoint
    from fl_ondevice.ondevice.scratch import scratch_dir

    ckpt = os.path.join(scratch_dir(), f"breakdown-{os.getpid()}.ckpt")
    t0 = time.perf_counter()
    device.weight_spec.validate(weights, "weights")
    t0 = lap("ours", "  set: validate", t0)
    write_checkpoint(ckpt, weights)
    t0 = lap("ours", "  set: write_checkpoint", t0)
    device.restore_checkpoint(ckpt)
    t0 = lap("ours", "  set: restore signature", t0)
    device.save_checkpoint(ckpt)
    t0 = lap("ours", "  get: save signature", t0)
    read_checkpoint(ckpt)
    lap("ours", "  get: read_checkpoint", t0)
