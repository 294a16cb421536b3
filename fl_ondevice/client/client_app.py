"""Flower ClientApp: each engine message's clients through one handler chain, mods included.

The engine delivers a message for several clients (``fl_ondevice.wire.message``). For each of them
the ClientApp builds the message a Flower client would get (the strategy's records alone) and
the context its own SuperNode would give it (``node_config`` with Flower's ``partition-id`` and
``num-partitions``, the node's settings and its copy of the model; the run config), and runs it
through :func:`client_app`: the configured ``client.mods`` around the train/evaluate handlers
below, which translate to ``fl_ondevice.client.client``. A train reply leaves in
``client.update_encoding`` (``fl_ondevice.wire.encoding``), encoded after the mods. The replies go
back together in one reply.

The model comes by content and the data from the node's own settings (``fl_ondevice.wire.node``).
A ``query`` answers with the partition the node's config gives it (a deployed SuperNode).
"""

from __future__ import annotations

import functools
import random
from dataclasses import replace
from typing import Any, cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp

from fl_ondevice import seeds
from fl_ondevice.client.client import (
    StagedWeights,
    evaluate_client,
    local_seed,
    train_client,
)
from fl_ondevice.config import Config, from_run_config
from fl_ondevice.errors import FlOnDeviceError
from fl_ondevice.ondevice.device import OnDeviceModel, Staged
from fl_ondevice.ondevice.layouts import PERSONALIZATION
from fl_ondevice.ondevice.pool import pooled_model
from fl_ondevice.wire.encoding import FLOAT32, encode_update
from fl_ondevice.wire.message import (
    ARRAYS,
    CLIENT_SECONDS,
    CONFIG,
    EVAL_ACCURACY,
    EVAL_ACCURACY_PERSONAL,
    EVAL_LOSS,
    EVAL_LOSS_PERSONAL,
    LOADED_EXAMPLES,
    METRICS,
    MODEL_FILE,
    MODEL_MISSING,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    PROXIMAL_MU,
    SERVER_ROUND,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    array_view,
    from_arrays,
    pack_replies,
    to_arrays,
    unpack,
)
from fl_ondevice.wire.mods import client_mods
from fl_ondevice.wire.node import ModelMissing, NodeSettings, node_settings, received_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of each client the message names."""
    return _serve(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluation of the global model on each named client's local test split."""
    return _serve(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The partition this node owns: ``partition-id`` and ``num-partitions`` of its config."""
    own = {k: context.node_config.get(k) for k in (PARTITION_ID, NUM_PARTITIONS)}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in own.values()):
        reason = (
            f"this SuperNode's node config has {PARTITION_ID}={own[PARTITION_ID]!r} and "
            f"{NUM_PARTITIONS}={own[NUM_PARTITIONS]!r}; start it with --node-config "
            f"'{PARTITION_ID}=P {NUM_PARTITIONS}=N' (integers, N the run's num-clients)"
        )
        return Message(Error(code=1, reason=reason), reply_to=msg)
    return Message(RecordDict({CONFIG: ConfigRecord(own)}), reply_to=msg)  # type: ignore[arg-type]


def _serve(msg: Message, context: Context) -> Message:
    group = unpack(msg.content)
    node = node_settings(context.node_config)
    try:
        model_file = received_model(group.model_sha256, group.model_bytes, node.cache_dir)
    except ModelMissing:
        reason = f"model {group.model_sha256} is not on this node; send its bytes"
        return Message(Error(code=MODEL_MISSING, reason=reason), reply_to=msg)
    cfg, chain = _setup(tuple(sorted(group.run_config.items())), node)
    _RUN[:] = [(group.run_config, cfg)]  # what _run_of finds for each of the clients below
    node_config = {**node.as_node_config(), MODEL_FILE: model_file, NUM_PARTITIONS: cfg.num_clients}
    replies: list[tuple[int, RecordDict | str]] = []
    for client in group.clients:
        content = RecordDict(dict(group.content.items()))  # the strategy's records only
        own = Message(content, metadata=_copy(msg.metadata))  # type: ignore[call-overload]
        ctx = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={**node_config, PARTITION_ID: client},
            state=RecordDict(),
            run_config=group.run_config,  # one object for the message's clients
        )
        replies.append((client, _run(chain, own, ctx, cfg, client)))
    return Message(pack_replies(replies), reply_to=msg)


def _run(
    chain: ClientApp, msg: Message, ctx: Context, cfg: Config, client: int
) -> RecordDict | str:
    what = msg.metadata.message_type.split(".")[0]
    r = int(cast(int, msg.content.config_records[CONFIG].get(SERVER_ROUND, 0)))
    if cfg.client.mods:
        # Mods that draw random numbers (LocalDpMod's noise) use the global generators: seeded
        # per client and round, so a run repeats. Our handlers draw from their own seeds.
        py_seed, np_seed = np.random.SeedSequence(
            [local_seed(cfg.seed, r, client), seeds.MODS]
        ).generate_state(2)
        random.seed(int(py_seed))
        np.random.seed(int(np_seed))
    received = msg.content.array_records.get(ARRAYS)  # before any mod can replace it
    try:
        reply = chain(msg, ctx)
        if reply.has_error():  # a mod answered with an error instead of calling the handler
            return f"client {client}, round {r}, {what}: {reply.error.reason}"
        if what != MessageType.TRAIN or cfg.client.update_encoding == FLOAT32:
            return reply.content
        return _encoded(reply.content, received, cfg, r, client)
    except Exception as err:  # noqa: BLE001 - one client's failure, reported to the server
        return _failure(err, what, client, r)


def _encoded(
    content: RecordDict, received: ArrayRecord | None, cfg: Config, r: int, client: int
) -> RecordDict:
    # The upload in client.update_encoding: encoded after the mods, as a phone compresses what
    # it sends last, so a mod (fixedclipping_mod, LocalDpMod) works on weights, not on int8
    # deltas; and against the weights the server sent, the ones it decodes with.
    if ARRAYS not in content.array_records or received is None:
        return content  # nothing to encode: the server rejects the reply as it stands
    weights = {k: array_view(a) for k, a in content.array_records[ARRAYS].items()}
    global_weights = {k: array_view(a) for k, a in received.items()}
    seed = [cfg.seed, r, client, seeds.ENCODING]
    encoded = encode_update(weights, global_weights, cfg.client.update_encoding, seed)
    out = RecordDict(dict(content.items()))
    out[ARRAYS] = to_arrays(encoded)
    return out


def _failure(err: Exception, what: str, client: int, r: int) -> str:
    # The server logs this one line (client, round, cause) instead of the worker's stack dump.
    if isinstance(err, FlOnDeviceError):
        cause = str(err)
    else:
        cause = f"{type(err).__name__}: {err}"
    return f"client {client}, round {r}, {what}: {cause}"


def _copy(metadata: Metadata) -> Metadata:
    copied = Metadata.__new__(Metadata)
    copied.__dict__.update(metadata.__dict__)
    return copied


@functools.lru_cache(maxsize=4)
def _setup(items: tuple[tuple[str, Any], ...], node: NodeSettings) -> tuple[Config, ClientApp]:
    # Per run (its run config), once per worker process: the config and the handler chain.
    # The run config's paths and switches are the server's; the node's own settings replace
    # them (a client never acts on a path it was sent).
    cfg = from_run_config(dict(items))
    dataset = replace(cfg.dataset, data_dir=node.data_dir, download=node.download)
    cfg = replace(cfg, dataset=dataset, cache_dir=node.cache_dir)
    return cfg, client_app(cfg)


def client_app(cfg: Config) -> ClientApp:
    """The handler chain of one client: ``client.mods`` (outermost first) around the handlers."""
    chain = ClientApp(mods=client_mods(cfg))
    chain.train()(_train)
    chain.evaluate()(_evaluate)
    return chain


_STAGED = StagedWeights()  # one per process: the weights the current message's clients share
_RUN: list[tuple[object, Config]] = []  # the run config the current message's clients share


def _run_of(context: Context) -> Config:
    # The Config of a client's context; the clients of a message share one run_config object,
    # so it is parsed (and sorted, hashed) once per message, not per client.
    if not _RUN or _RUN[0][0] is not context.run_config:
        node = node_settings(context.node_config)
        cfg, _ = _setup(tuple(sorted(context.run_config.items())), node)
        _RUN[:] = [(context.run_config, cfg)]  # holds run_config: its id is not reused
    return _RUN[0][1]


def _unpack(msg: Message, context: Context) -> tuple[Config, OnDeviceModel, int, int, Staged]:
    cfg = _run_of(context)
    model = pooled_model(str(context.node_config[MODEL_FILE]), cfg.client.num_threads)
    arrays = msg.content.array_records[ARRAYS]
    staged = _STAGED.get(model, arrays, lambda: from_arrays(arrays))
    client = int(cast(int, context.node_config[PARTITION_ID]))
    r = int(cast(int, msg.content.config_records[CONFIG][SERVER_ROUND]))
    return cfg, model, client, r, staged


def _train(msg: Message, context: Context) -> Message:
    cfg, model, client, r, staged = _unpack(msg, context)
    mu = float(cast(float, msg.content.config_records[CONFIG].get(PROXIMAL_MU, 0.0)))
    loaded = model.loaded_examples
    update = train_client(cfg, model, staged, client, r, proximal_mu=mu, run_id=context.run_id)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: update.num_examples,
            TRAIN_LOSS: update.train_loss,
            CLIENT_SECONDS: update.seconds,
            TRAIN_SECONDS: update.train_seconds,
        }
    )
    if model.layout is PERSONALIZATION:
        metrics[LOADED_EXAMPLES] = model.loaded_examples - loaded
    content = RecordDict({ARRAYS: to_arrays(update.weights), METRICS: metrics})
    return Message(content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    cfg, model, client, r, staged = _unpack(msg, context)
    loaded = model.loaded_examples
    result = evaluate_client(cfg, model, staged, client, r, run_id=context.run_id)
    metrics = MetricRecord(
        {NUM_EXAMPLES: result.num_examples, EVAL_LOSS: result.loss, EVAL_ACCURACY: result.accuracy}
    )
    if result.personal_accuracy is not None and result.personal_loss is not None:
        metrics[EVAL_LOSS_PERSONAL] = result.personal_loss
        metrics[EVAL_ACCURACY_PERSONAL] = result.personal_accuracy
        if model.layout is PERSONALIZATION:  # fine-tuning a client's first time runs `load`
            metrics[LOADED_EXAMPLES] = model.loaded_examples - loaded
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)
