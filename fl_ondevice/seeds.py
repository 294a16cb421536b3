"""Every random stream of a run, by id: one registry, so no two draws share a stream by accident.

A stream is a NumPy seed sequence keyed by the run seed, some of (round, client), and an id from
this module. The ids only need to differ between streams keyed the same way: ``(seed, round,
client, 5)`` and ``(seed, 5)`` are unrelated sequences. The values are fixed: changing one changes
every result drawn from it.
"""

# -- keyed (seed, id): drawn once per run ----------------------------------------------------------
TRANSFER_HEAD = 1  # the transfer head's starting weights (model=transfer)
TRANSFER_PRETRAIN = 2  # the order of the transfer base's pretraining examples
ATTACKERS = 3  # which clients attack (client.attack)
DEVICE_CLASSES = 4  # which phone class each client gets (device=...)
ONLINE_WINDOWS = 5  # when in the day each phone is online (device=...)
# Also keyed (seed, client): each client's local train/test split (data.partitioners.local_split),
# and (seed) alone: the partitioners' own draws, the models' initial weights.

# -- keyed (seed, round, id) -------------------------------------------------------------------
# The strategy's phases: Python's and NumPy's global generators are seeded with these around each
# phase (Flower's strategies sample nodes with Python's `random`).
CONFIGURE_TRAIN, AGGREGATE_TRAIN, CONFIGURE_EVALUATE, AGGREGATE_EVALUATE = range(4)
OVERCOMMIT = 6  # the extra clients a round over-commits to (round.overcommit)

# -- keyed (seed, round, client, id) -------------------------------------------------------------
# (seed, round, client) alone: the client's shuffling seed (client.client.local_seed).
FAILURE = 1  # whether the client crashes (client.failure_rate)
DROPOUT = 2  # whether the client never replies (client.dropout_rate)
ENCODING = 5  # int8 stochastic rounding of its update (client.update_encoding)
PERSONALIZE = 7  # the shuffling of its fine-tuning (personalize.epochs)

# -- keyed (local seed of (seed, round, client), id) ---------------------------------------------
MODS = 4  # the global generators the client's mods draw from (e.g. LocalDpMod's noise)
