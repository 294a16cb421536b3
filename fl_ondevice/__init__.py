"""fl_ondevice: federated learning simulation of TensorFlow Lite on-device training.

The user API is imported from here (``from fl_ondevice import OnDeviceModel``), lazily: importing
the package loads no TensorFlow, Flower or LiteRT until a name is used.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# TF's C++ INFO/WARNING lines (oneDNN, CPU features, MLIR) drown the per-round progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if TYPE_CHECKING:
    from fl_ondevice.ondevice.device import OnDeviceModel

# Public name -> the module that defines it.
_API = {"OnDeviceModel": "fl_ondevice.ondevice.device"}

__all__ = ["OnDeviceModel"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fl_ondevice' has no attribute {name!r}")
