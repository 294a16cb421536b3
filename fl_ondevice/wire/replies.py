"""A client's train reply on the server: decoded to float32 weights and checked, or rejected."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Message, MetricRecord, RecordDict

from fl_ondevice.ondevice.weights import WeightSpec
from fl_ondevice.wire.encoding import FLOAT32, decode_update, encoded_bytes
from fl_ondevice.wire.message import ARRAYS, NUM_EXAMPLES, array_view, num_bytes, to_arrays
from fl_ondevice.wire.updates import checked_update


@dataclass(frozen=True)
class Update:
    """A train reply that passed: what the strategy gets, and what it counts for."""

    content: RecordDict  # the reply, its update as float32 weights
    examples: float  # its num-examples
    bytes_sent: int  # its update's bytes as the client sent them (encoded: before decoding)
    metrics: MetricRecord  # its one MetricRecord


class ReplyCheck:
    """Decodes and checks the clients' train replies against the global model.

    Parameters
    ----------
    weight_spec
        The global model's tensors: a train reply must match them.
    update_encoding
        How clients encode their train replies (``client.update_encoding``, see
        ``fl_ondevice.wire.encoding``). Other than ``float32``, each reply is decoded against the
        global weights the strategy sent that client (its ``arrays`` record) before it is
        checked, so a strategy only sees float32 weights. A reply that does not decode is
        rejected, as one that fails the check.
    """

    def __init__(self, weight_spec: WeightSpec, update_encoding: str = FLOAT32) -> None:
        self.weight_spec = weight_spec
        self.update_encoding = update_encoding
        # One update's bytes as sent; raises for an unknown encoding before any round starts.
        self.update_bytes = encoded_bytes(weight_spec, update_encoding)

    def check(self, sent: Message, reply: RecordDict) -> Update | str:
        """``reply`` to the strategy's message ``sent`` as an :class:`Update`, or why it is
        rejected."""
        part = reply
        if self.update_encoding != FLOAT32:
            decoded = self._decoded(sent, reply)
            if isinstance(decoded, str):
                return decoded
            part = decoded
        checked = checked_update(part, self.weight_spec, NUM_EXAMPLES)
        if isinstance(checked, str):
            return checked
        return Update(
            part,
            checked[0],
            num_bytes(next(iter(reply.array_records.values()))),
            next(iter(part.metric_records.values())),
        )

    def _decoded(self, sent: Message, part: RecordDict) -> RecordDict | str:
        # The reply with its encoded ArrayRecord replaced by the float32 weights g + d, under
        # the same key, with g what the strategy sent this client; or why it does not decode.
        if len(part.array_records) != 1:
            return "expected one ArrayRecord"
        received = sent.content.array_records.get(ARRAYS)
        if received is None:
            return f"the strategy sent no '{ARRAYS}' ArrayRecord to decode the update against"
        key, record = next(iter(part.array_records.items()))
        decoded = decode_update(
            {name: array_view(a) for name, a in record.items()},
            {name: array_view(a) for name, a in received.items()},
            self.update_encoding,
        )
        if isinstance(decoded, str):
            return decoded
        content = RecordDict(dict(part.items()))
        content[key] = to_arrays(decoded)
        return content
