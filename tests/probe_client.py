"""A ClientApp mod for tests: reports from inside a Ray worker whether TensorFlow is imported."""

# Nothing here imports TensorFlow: Hydra imports this module in the worker (``_target_``).

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fl_ondevice.wire.node import ENV


class TensorflowProbe:
    """A Flower mod: after each handler call, writes ``{report_dir}/{pid}.json`` with the
    worker's pid, whether it has imported TensorFlow (``imported``), whether its
    ``sys.modules`` holds the ``None`` entry that blocks the import (``blocked``), and the node
    config its environment gives it (``node_config``); use as
    ``client.mods.probe={_target_: probe_client.TensorflowProbe, report_dir: DIR}``."""

    def __init__(self, report_dir: str) -> None:
        self.report_dir = Path(report_dir)

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)  # after the client's work: what it imported counts
        report = {
            "pid": os.getpid(),
            "imported": sys.modules.get("tensorflow") is not None,
            "blocked": "tensorflow" in sys.modules and sys.modules["tensorflow"] is None,
            "node_config": os.environ.get(ENV),
        }
        path = self.report_dir / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, path)  # the test never reads half a file
        return reply
