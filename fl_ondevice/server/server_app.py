"""Flower ServerApp for ``flwr run``: the run config (pyproject.toml) is the configuration.

The nodes are SuperNodes (or ``flwr run``'s simulated ones), each owning the partition its node
config names (Flower's ``partition-id`` and ``num-partitions``).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_ondevice.config import from_run_config
from fl_ondevice.console import ours_to_stderr
from fl_ondevice.server.prepare import prepare
from fl_ondevice.server.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One run of the configured strategy on the nodes ``grid`` reaches."""
    ours_to_stderr()
    run_server(grid, prepare(from_run_config(dict(context.run_config))), nodes_own_data=True)
