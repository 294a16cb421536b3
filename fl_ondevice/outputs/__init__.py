"""What a run writes, as files of numbers.

- ``results``: ``metrics.csv``/``.json`` rewritten every round, and the run's summary;
- ``clients``: ``clients.csv``, one row per client;
- ``plots``: the run's accuracy and personalization plots;
- ``sweep``: a sweep's ``summary.csv`` and plots, and a failed job's ``error.json``.
"""
