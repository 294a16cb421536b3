"""The server side of a run.

- ``prepare``: load data, partition it, build the model and strategy, before any engine starts;
- ``server``: run the rounds over a grid and write the run's outputs;
- ``recorder``: after each round, one hook per concern, in order: central evaluation, metrics
  row, clients.csv, resume save, progress line;
- ``rounds``: the round loop over a strategy's phases;
- ``strategy``: building the configured Flower strategy and reading its settings;
- ``fedavg``: FedAvg folding each update in as it arrives;
- ``resume``: what each round saves, and continuing after the last saved one;
- ``server_app``: the ServerApp of ``flwr run`` and the Deployment Engine.
"""
