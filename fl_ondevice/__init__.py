"""fl_ondevice: federated learning simulation of TensorFlow Lite on-device training."""

import os

# TF's C++ INFO/WARNING lines (oneDNN, CPU features, MLIR) drown the per-round progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
