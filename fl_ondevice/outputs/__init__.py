"""What a run writes: ``metrics.csv``/``.json`` every round, ``clients.csv``, plots, and the
summary of a sweep (``results``)."""
