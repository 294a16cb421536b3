"""The Keras peer: Flower's quickstart-tensorflow pattern (Message API) on fl_ondevice's data."""

from __future__ import annotations

import functools
import logging
import random
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import keras
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl_ondevice.client.client import client_data
from fl_ondevice.config import Config, from_run_config, to_run_config
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.ondevice.model import build_model
from fl_ondevice.processes import process_tree_rss_mib

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
CLIENT_SECONDS = "client-seconds"  # the whole train() call, as fl_ondevice's client-seconds
FIT_SECONDS = "fit-seconds"  # inside model.fit only: the peer's counterpart of train-seconds
SERVER_ROUND = "server-round"  # FedAvg adds it to every train config
ROUND_HOOK: Callable[[int], object] | None = None  # called after each evaluated round


def keras_twin(name: str, input_shape: tuple[int, int], num_classes: int, lr: float) -> Any:
    """A compiled Keras Sequential with fl_ondevice.ondevice.model's architecture and weight order.

    mlp: Flatten -> Dense 128 ReLU -> Dense classes. cnn (arXiv:1602.05629): 5x5 conv 32 ->
    2x2 max-pool -> 5x5 conv 64 -> 2x2 max-pool -> Dense 512 ReLU -> Dense classes, SAME padding.
    Logits out, sparse softmax cross-entropy, plain SGD, as fl_ondevice's ``train`` signature.
    """
    layers: list[Any] = [keras.Input(input_shape)]
    if name == "mlp":
        layers += [keras.layers.Flatten(), keras.layers.Dense(128, activation="relu")]
    elif name == "cnn":
        layers.append(keras.layers.Reshape((*input_shape, 1)))  # (28, 28) -> (28, 28, 1)
        for filters in (32, 64):
            layers.append(keras.layers.Conv2D(filters, 5, padding="same", activation="relu"))
            layers.append(keras.layers.MaxPooling2D(2, padding="same"))
        layers += [keras.layers.Flatten(), keras.layers.Dense(512, activation="relu")]
    else:
        raise ValueError(f"model {name!r} has no Keras twin here; use mlp or cnn")
    layers.append(keras.layers.Dense(num_classes))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@functools.lru_cache(maxsize=4)
def _config(items: tuple[tuple[str, Any], ...]) -> Config:
    return from_run_config(dict(items))


def unpack_config(record: ConfigRecord) -> Config:
    """The run's Config from a train message's ConfigRecord (server-round dropped)."""
    return _config(tuple(sorted((k, v) for k, v in record.items() if k != SERVER_ROUND)))


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One client update the quickstart way: fresh Keras model per call, set, fit, reply."""
    t0 = time.perf_counter()
    cfg = unpack_config(cast(ConfigRecord, msg.content["config"]))
    partition_id = int(cast(int, context.node_config["partition-id"]))
    dataset, partitions = client_data(cfg)  # the same partitions fl_ondevice's clients use
    idx = partitions[partition_id].train_indices
    x, y = dataset.train_x(idx), dataset.y_train[idx]
    keras.backend.clear_session()
    model = keras_twin(
        cfg.model.name, dataset.input_shape, dataset.num_classes, cfg.model.learning_rate
    )
    model.set_weights(cast(ArrayRecord, msg.content["arrays"]).to_numpy_ndarrays())
    t1 = time.perf_counter()
    history = model.fit(
        x, y, epochs=cfg.client.local_epochs, batch_size=cfg.client.batch_size, verbose=0
    )
    fit_seconds = time.perf_counter() - t1
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(x),
            TRAIN_LOSS: float(history.history["loss"][-1]),
            FIT_SECONDS: fit_seconds,
            CLIENT_SECONDS: time.perf_counter() - t0,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.get_weights()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def run_peer(cfg: Config) -> list[dict[str, float]]:
    """Run ``cfg``'s federated workload with the Keras peer; one row per round (0 = initial).

    Same data, partitions (client i trains partition i), initial weights (fl_ondevice's
    ``build_model`` with the run seed), optimizer, E, B, rounds; Flower's own FedAvg samples
    the nodes (seeded through Python's ``random``).
    """
    from flwr.simulation import run_simulation

    from fl_ondevice.simulate import backend_config

    rows: list[dict[str, float]] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        dataset = load_dataset(cfg.dataset, cfg.seed)
        shape, classes = dataset.input_shape, dataset.num_classes
        central = keras_twin(cfg.model.name, shape, classes, cfg.model.learning_rate)
        initial = [w.numpy() for w in build_model(cfg.model, shape, classes, cfg.seed).weights_]
        replies: dict[str, float] = {}

        def aggregate_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
            ms = [next(iter(c.metric_records.values())) for c in contents]
            replies.update(
                clients_replied=len(ms),
                client_seconds=statistics.median(float(cast(float, m[CLIENT_SECONDS])) for m in ms),
                train_seconds=statistics.median(float(cast(float, m[FIT_SECONDS])) for m in ms),
                examples=sum(float(cast(float, m[weighted_by_key])) for m in ms),
            )
            return MetricRecord({k: v for k, v in replies.items()})

        t_prev = [time.perf_counter()]

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            t_eval = time.perf_counter()
            central.set_weights(arrays.to_numpy_ndarrays())
            loss, acc = central.evaluate(
                dataset.x_test, dataset.y_test, batch_size=cfg.eval_batch_size, verbose=0
            )
            now = time.perf_counter()
            rows.append(
                {
                    "round": server_round,
                    "accuracy": float(acc),
                    "loss": float(loss),
                    "seconds": now - t_prev[0] if server_round else 0.0,
                    "eval_seconds": now - t_eval,
                    "rss_mib": process_tree_rss_mib() or float("nan"),
                    **(replies if server_round else {}),
                }
            )
            t_prev[0] = now
            if ROUND_HOOK is not None:
                ROUND_HOOK(server_round)
            return MetricRecord({"accuracy": float(acc), "loss": float(loss)})

        strategy = FedAvg(
            fraction_train=cfg.strategy["fraction_train"],
            fraction_evaluate=0.0,
            min_train_nodes=cfg.strategy["min_train_nodes"],
            min_available_nodes=cfg.num_clients,
            train_metrics_aggr_fn=aggregate_metrics,
        )
        run_config: dict[str, Any] = dict(to_run_config(cfg))  # Flower's kebab-case keys
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=cfg.num_rounds,
            train_config=ConfigRecord(run_config),
            evaluate_fn=evaluate,
        )

    random.seed(cfg.seed)  # FedAvg samples nodes with Python's global random
    np.random.seed(cfg.seed)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=server,
        client_app=app,
        num_supernodes=cfg.num_clients,
        backend_config=backend_config(cfg),  # type: ignore[arg-type]
    )
    if len(rows) != cfg.num_rounds + 1:
        raise RuntimeError(f"the peer finished {len(rows) - 1} of {cfg.num_rounds} rounds")
    return rows
