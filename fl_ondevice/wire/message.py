"""The message format both apps share: record keys, and several clients in one engine message.

A strategy talks to one node per client. Beneath it, fl_ondevice sends one *engine message* to
a worker for several clients that got the same content: the strategy's records, plus

- ``fl-ondevice.group`` (ConfigRecord): ``clients`` (their ids, i.e. partitions) and
  ``model-sha256``, the name of the ``.tflite`` they train;
- ``fl-ondevice.model`` (ConfigRecord, ``tflite``: bytes): the model itself, in the first
  message a node gets in a run, and again whenever a node answers ``MODEL_MISSING``; a node
  keeps it by its SHA-256 (``fl_ondevice.wire.node``), so no client ever opens a path it was sent;
- ``fl-ondevice.run`` (ConfigRecord): the run config (``config.to_run_config``), from which a
  worker rebuilds the data, partitions and model of the run. Its paths and switches are not
  used on the node: those are the node's own settings (``fl_ondevice.wire.node``).

A deployed SuperNode owns one partition: before it gets work, the server asks it (a ``query``
message) for the ``partition-id`` and ``num-partitions`` of its node config.

The worker passes each client a message of the strategy's records alone, and answers with one
*reply* whose records are those of each client's reply under ``<client>:<key>``, or, for a
client that failed, ``<client>:error`` (a ConfigRecord with the ``reason``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

# Record keys of Flower's strategies (their defaults) and the metrics our clients report.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"  # FedAvg's weighted_by_key
SERVER_ROUND = "server-round"  # set by Flower's strategies in every config they send
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
TRAIN_LOSS = "train-loss"
CLIENT_SECONDS = "client-seconds"  # the whole update: restore, train, save, checkpoint I/O
TRAIN_SECONDS = "train-seconds"  # inside the train signature only
# Examples a client ran through the model's `load` signature in this reply (personalization
# layout only: the frozen base, once per example and run).
LOADED_EXAMPLES = "loaded-examples"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
# With personalize.epochs > 0: the same evaluation after fine-tuning the global model locally.
EVAL_LOSS_PERSONAL = "eval-loss-personal"
EVAL_ACCURACY_PERSONAL = "eval-accuracy-personal"

# Transport records: added beneath the strategy, removed before any handler or mod sees them.
GROUP = "fl-ondevice.group"
RUN = "fl-ondevice.run"
CLIENTS = "clients"
MODEL = "fl-ondevice.model"
MODEL_SHA256 = "model-sha256"
TFLITE = "tflite"
MODEL_FILE = "model-file"  # a client's context: the node's own copy of the model
MODEL_MISSING = 2  # Error code of a node that has no copy of the model and was not sent it
ERROR = "error"
REASON = "reason"
# Flower's node_config keys of a node that owns one partition; each simulated client's handler
# sees them, as it would on its own SuperNode.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

_SEP = ":"


@dataclass(frozen=True)
class Group:
    """An engine message's content, taken apart: what each of ``clients`` gets, and the run."""

    content: RecordDict  # the strategy's records, shared by the clients
    clients: list[int]
    model_sha256: str
    model_bytes: bytes | None  # None: the node should have it already
    run_config: dict[str, int | float | str | bool]


def pack(
    content: RecordDict,
    clients: Iterable[int],
    model: tuple[str, bytes | None],
    run_config: ConfigRecord,
) -> RecordDict:
    """One engine message's content for ``clients`` that all got ``content``; ``model`` is
    ``(sha256, bytes)``, with the bytes None once the node has them."""
    sha256, data = model
    packed = RecordDict(dict(content.items()))
    packed[GROUP] = ConfigRecord({CLIENTS: [int(c) for c in clients], MODEL_SHA256: sha256})
    if data is not None:
        packed[MODEL] = ConfigRecord({TFLITE: data})
    packed[RUN] = run_config
    return packed


def unpack(packed: RecordDict) -> Group:
    """The inverse of :func:`pack`."""
    group = packed.config_records[GROUP]
    model = packed.config_records.get(MODEL)
    content = RecordDict({k: v for k, v in packed.items() if k not in (GROUP, MODEL, RUN)})
    return Group(
        content=content,
        clients=[int(c) for c in cast(list, group[CLIENTS])],
        model_sha256=str(group[MODEL_SHA256]),
        model_bytes=None if model is None else cast(bytes, model[TFLITE]),
        run_config=dict(packed.config_records[RUN]),  # type: ignore[arg-type]
    )


def pack_replies(replies: Iterable[tuple[int, RecordDict | str]]) -> RecordDict:
    """One reply for a group: each client's records, or the reason it failed."""
    packed = RecordDict()
    for client, reply in replies:
        if isinstance(reply, str):
            packed[f"{client}{_SEP}{ERROR}"] = ConfigRecord({REASON: reply})
            continue
        for key, record in reply.items():
            packed[f"{client}{_SEP}{key}"] = record
    return packed


def unpack_replies(packed: RecordDict, clients: Iterable[int]) -> dict[int, RecordDict | str]:
    """Each of ``clients``' reply records, or why it has none (the inverse of ``pack_replies``)."""
    parts: dict[int, RecordDict] = {}
    for key, record in packed.items():
        prefix, sep, name = key.partition(_SEP)
        if sep and prefix.isdigit():
            parts.setdefault(int(prefix), RecordDict())[name] = record
    out: dict[int, RecordDict | str] = {}
    for client in clients:
        part = parts.get(client)
        if part is None:
            out[client] = f"client {client} is missing from the reply"
        elif ERROR in part.config_records:
            out[client] = str(part.config_records[ERROR].get(REASON, "no reason given"))
        else:
            out[client] = part
    return out


def to_arrays(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Weights as an ArrayRecord, in checkpoint (sorted name) order."""
    return ArrayRecord({name: Array(np.asarray(weights[name])) for name in sorted(weights)})


def from_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord back as ``{name: ndarray}``."""
    return {name: array.numpy() for name, array in record.items()}


def array_view(array: Array) -> np.ndarray:
    """An Array's values without a copy: a read-only view of its bytes where it holds a
    C-ordered NumPy array in native byte order (what our clients send), else a decoded copy.

    ``Array.numpy()`` parses the ``.npy`` header and copies the data, ~0.1 ms per MLP update:
    the server reads every update to check it and to average it, while the workers train.
    """
    dtype = np.dtype(array.dtype)
    nbytes = int(np.prod(array.shape)) * dtype.itemsize
    data = array.data
    header = data[: len(data) - nbytes]
    plain = b"'fortran_order': False" in header and f"'descr': '{dtype.str}'".encode() in header
    if array.stype != "numpy.ndarray" or not plain or dtype.hasobject:
        return array.numpy()
    offset = len(data) - nbytes
    return np.frombuffer(data, dtype, nbytes // dtype.itemsize, offset).reshape(array.shape)


def num_bytes(record: ArrayRecord) -> int:
    """Tensor bytes an ArrayRecord carries (what a phone downloads or uploads), headers aside."""
    return sum(
        int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize for array in record.values()
    )
