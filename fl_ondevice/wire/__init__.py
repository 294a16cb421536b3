"""What crosses between server and clients, known to both sides.

- ``message``: the record keys and the format of an engine message for several clients;
- ``encoding``: update encodings (float32, float16 and int8 deltas) and back;
- ``updates``: the checks a client's reply passes before a strategy sees it;
- ``node``: a node's own settings (data, cache) and the model it was sent;
- ``transport``: :class:`~fl_ondevice.wire.transport.ClientGrid`, one node per client over the
  engine's nodes.

Nothing is re-exported here: a deployed ClientApp pays every import per message, and the client
side needs none of ``transport``'s.
"""
