"""Flower ClientApp: translates train/evaluate messages into calls of fl_ondevice.client."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fl_ondevice.client import evaluate_clients, train_clients
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
# The server names the clients (partitions) a message is for, so which clients train in a round
# is decided by the run seed, not by the random node ids the engine assigns. One message carries
# several clients (client.clients_per_message); the reply holds one record set per client, keyed
# "<kind>.<client id>", and "error.<client id>" for a client that failed.
PARTITION_IDS = "partition-ids"
PARTITION_ID = "partition-id"  # node_config key of a node that owns one partition (flwr run)
MODEL_FILE = "model-file"  # the .tflite every client loads (resolved by the server)
ERROR = "error"
REASON = "reason"

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _parse(items: tuple[tuple[str, object], ...]) -> Config:
    return from_run_config(dict(items))


def _unpack(msg: Message, context: Context) -> tuple[Config, str, list[int], int, dict]:
    config = msg.content.config_records[CONFIG]
    run_config = {k: v for k, v in config.items() if k not in _MESSAGE_KEYS}
    cfg = _parse(tuple(sorted(run_config.items())))
    default = [int(cast(int, context.node_config.get(PARTITION_ID, -1)))]
    client_ids = [int(c) for c in cast(list, config.get(PARTITION_IDS, default))]
    weights = from_arrays(msg.content.array_records[ARRAYS])
    server_round = int(cast(int, config[SERVER_ROUND]))
    return cfg, str(config[MODEL_FILE]), client_ids, server_round, weights


_MESSAGE_KEYS = {PARTITION_IDS, MODEL_FILE, SERVER_ROUND}


def client_key(kind: str, client_id: int) -> str:
    """Key of one client's record in a reply: ``arrays.7``, ``metrics.7``, ``error.7``."""
    return f"{kind}.{client_id}"


def _failure(content: RecordDict, err: Exception, what: str, client_id: int, rnd: int) -> None:
    # The server logs this one line (client, round, cause) instead of the worker's stack dump.
    cause = str(err) if isinstance(err, FlOnDeviceError) else f"{type(err).__name__}: {err}"
    reason = f"client {client_id}, round {rnd}, {what}: {cause}"
    content[client_key(ERROR, client_id)] = ConfigRecord({REASON: reason})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the clients named in the message, from the received global weights."""
    cfg, model_file, client_ids, rnd, weights = _unpack(msg, context)
    content = RecordDict()
    for cid, update in train_clients(cfg, model_file, client_ids, rnd, weights):
        if isinstance(update, Exception):
            _failure(content, update, "train", cid, rnd)
            continue
        content[client_key(ARRAYS, cid)] = to_arrays(update.weights)
        content[client_key(METRICS, cid)] = MetricRecord(
            {
                NUM_EXAMPLES: update.num_examples,
                TRAIN_LOSS: update.train_loss,
                CLIENT_SECONDS: update.seconds,
                TRAIN_SECONDS: update.train_seconds,
            }
        )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluation of the global weights on the local test split of each client named."""
    cfg, model_file, client_ids, rnd, weights = _unpack(msg, context)
    content = RecordDict()
    for cid, result in evaluate_clients(cfg, model_file, client_ids, weights):
        if isinstance(result, Exception):
            _failure(content, result, "evaluate", cid, rnd)
            continue
        content[client_key(METRICS, cid)] = MetricRecord(
            {
                NUM_EXAMPLES: result.num_examples,
                EVAL_LOSS: result.loss,
                EVAL_ACCURACY: result.accuracy,
            }
        )
    return Message(content, reply_to=msg)


def client_reply(content: RecordDict, client_id: int) -> RecordDict | str:
    """One client's part of a reply as Flower's strategies expect a reply (one ArrayRecord,
    one MetricRecord), or the reason it has none."""
    error = content.config_records.get(client_key(ERROR, client_id))
    if error is not None:
        return str(error.get(REASON, "no reason given"))
    metrics = content.metric_records.get(client_key(METRICS, client_id))
    if metrics is None:
        return f"client {client_id} is missing from the reply"
    part = RecordDict({METRICS: metrics})
    arrays = content.array_records.get(client_key(ARRAYS, client_id))
    if arrays is not None:
        part[ARRAYS] = arrays
    return part


def to_arrays(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Weights as an ArrayRecord, in checkpoint (sorted name) order."""
    return ArrayRecord({name: Array(np.asarray(weights[name])) for name in sorted(weights)})


def from_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord back as ``{name: ndarray}``."""
    return {name: array.numpy() for name, array in record.items()}
