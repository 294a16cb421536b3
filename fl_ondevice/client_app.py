"""Flower ClientApp: translates train/evaluate messages into calls of fl_ondevice.client."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_ondevice.client import evaluate_client, train_client
from fl_ondevice.config import Config, from_run_config
from fl_ondevice.errors import FlOnDeviceError

# Record keys: Flower's FedAvg defaults plus ours, in one place.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
CLIENT_SECONDS = "client-seconds"
TRAIN_SECONDS = "train-seconds"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
SERVER_ROUND = "server-round"
# The server names the client (partition) a message is for, so which clients train in a round
# is decided by the run seed, not by the random node ids the engine assigns.
PARTITION_ID = "partition-id"
MODEL_FILE = "model-file"  # the .tflite every client loads (resolved by the server)

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _parse(items: tuple[tuple[str, object], ...]) -> Config:
    return from_run_config(dict(items))


def _unpack(msg: Message, context: Context) -> tuple[Config, str, int, int, dict]:
    config = msg.content.config_records[CONFIG]
    run_config = {k: v for k, v in config.items() if k not in _MESSAGE_KEYS}
    cfg = _parse(tuple(sorted(run_config.items())))
    client_id = int(cast(int, config.get(PARTITION_ID, context.node_config.get(PARTITION_ID, -1))))
    weights = from_arrays(msg.content.array_records[ARRAYS])
    server_round = int(cast(int, config[SERVER_ROUND]))
    return cfg, str(config[MODEL_FILE]), client_id, server_round, weights


_MESSAGE_KEYS = {PARTITION_ID, MODEL_FILE, SERVER_ROUND}


def _reraise(err: Exception, what: str, client_id: int, server_round: int) -> None:
    # The server logs this one line (client, round, cause) instead of the worker's stack dump.
    cause = str(err) if isinstance(err, FlOnDeviceError) else f"{type(err).__name__}: {err}"
    raise RuntimeError(f"client {client_id}, round {server_round}, {what}: {cause}") from err


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the client named in the message, from the received global weights."""
    cfg, model_file, cid, rnd, weights = _unpack(msg, context)
    try:
        update = train_client(cfg, model_file, cid, rnd, weights)
    except Exception as err:  # noqa: BLE001 - reported with client and round, never lost
        _reraise(err, "train", cid, rnd)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: update.num_examples,
            TRAIN_LOSS: update.train_loss,
            CLIENT_SECONDS: update.seconds,
            TRAIN_SECONDS: update.train_seconds,
        }
    )
    return Message(RecordDict({ARRAYS: to_arrays(update.weights), METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluation of the global weights on the client's local test split."""
    cfg, model_file, cid, rnd, weights = _unpack(msg, context)
    try:
        result = evaluate_client(cfg, model_file, cid, weights)
    except Exception as err:  # noqa: BLE001
        _reraise(err, "evaluate", cid, rnd)
    metrics = MetricRecord(
        {NUM_EXAMPLES: result.num_examples, EVAL_LOSS: result.loss, EVAL_ACCURACY: result.accuracy}
    )
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def to_arrays(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Weights as an ArrayRecord, in checkpoint (sorted name) order."""
    return ArrayRecord({name: Array(np.asarray(weights[name])) for name in sorted(weights)})


def from_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord back as ``{name: ndarray}``."""
    return {name: array.numpy() for name, array in record.items()}
