"""The only place that builds or runs ``.tflite`` files.

- ``layouts``: the signature layouts fl_ondevice federates (guide, personalization, android);
- ``interpreters``: which interpreter opens a file (LiteRT, or TF 2.18's for Flex ops);
- ``device``: :class:`OnDeviceModel`, training and checkpointing through the signatures;
- ``signatures``: what a file's signatures take and return, read and checked once;
- ``pool``: this process's interpreters, shared by its clients; ``scratch``: its checkpoint files;
- ``weights``, ``checkpoint``: weights by name, and TF checkpoint files of them;
- ``model``, ``transfer``: the trainable TensorFlow modules; ``architectures``, ``backprop``:
  the networks ``model.name`` selects and their hand-written gradients;
- ``convert``: conversion to ``.tflite``, verified and cached, and baking trained weights in.

Only the interpreter side is re-exported here: a Ray worker imports this package (its setup hook
is in ``interpreters``) and a client runs on it, neither needs conversion's configuration.
"""

from fl_ondevice.ondevice.device import OnDeviceModel, evaluate_split
from fl_ondevice.ondevice.pool import pooled_model
from fl_ondevice.ondevice.weights import Weights, WeightSpec

__all__ = [
    "OnDeviceModel",
    "WeightSpec",
    "Weights",
    "evaluate_split",
    "pooled_model",
]
