"""What crosses between server and clients, known to both sides.

- ``message``: the record keys and the format of an engine message for several clients;
- ``encoding``: update encodings (float32, float16 and int8 deltas) and back;
- ``updates``: the checks a client's reply passes before a strategy sees it;
- ``node``: a node's own settings (data, cache) and the model it was sent;
- ``transport``: :class:`~fl_ondevice.wire.transport.ClientGrid`, one node per client over the
  engine's nodes, composed of the four below;
- ``grouping``: which engine node trains which clients (grouped, or the SuperNode owning them);
- ``policy``: dropouts and the round on the simulated clock (over-commitment, the close);
- ``replies``: a train reply decoded to float32 weights and checked;
- ``traffic``: what crossed the wire in a round, counted as it happens.

Nothing is re-exported here: a deployed ClientApp pays every import per message, and the client
side needs none of the server's (``transport`` and the four after it).
"""
