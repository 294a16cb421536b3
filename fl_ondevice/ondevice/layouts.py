"""Model layouts: which signatures an on-device training ``.tflite`` has, and what each means.

Three layouts are federated, each as the public example that defines it builds its file:

- ``guide``: TensorFlow Lite's on-device training guide (and fl_ondevice's own models):
  ``train(x, y) -> {loss}``, ``infer(x) -> {output}``, ``save``, ``restore``.
- ``personalization``: TensorFlow's ``model_personalization`` Android app (transfer learning):
  ``load(feature) -> {bottleneck}`` runs the frozen base once per example,
  ``train(bottleneck, label one-hot) -> {loss, gradients...}`` trains the head,
  ``infer(feature) -> {output}`` runs base and head, ``save`` / ``restore`` (the head's
  weights), ``initialize() -> {...}`` (optional) sets the head's starting weights.
- ``android``: Flower's ``examples/android-kotlin``: ``train(x, y one-hot) -> {loss}``,
  ``infer(x) -> {logits}`` (softmax probabilities under that name), ``parameters() -> {a0..aN}``
  and ``restore(a0, ..., aN)``.

``save`` and ``restore`` come in two kinds (:data:`WEIGHT_IO`): by checkpoint path, as the guide
and the app write them (``save(checkpoint_path)`` / ``restore(checkpoint_path)`` around TF's
Save/Restore ops, which run only with the Flex delegate), or as tensors (``save() -> {name:
weight}`` / ``restore(name=weight, ...)``, builtin ops only: fl_ondevice's own models).
Weights travel between client and server as tensors either way.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from fl_ondevice.errors import ModelError

# The signature names, as every layout's file spells them (a signature's name is the key a
# runner is looked up by; fl_ondevice's tf.Modules name their tf.function attributes alike).
TRAIN, INFER, SAVE, RESTORE = "train", "infer", "save", "restore"
LOAD = "load"  # personalization: the frozen base, images -> bottlenecks
PARAMETERS = "parameters"  # android: its name for a tensor-returning `save`
INITIALIZE = "initialize"  # personalization, optional: sets the head's starting weights
# Optional signatures of any layout (fl_ondevice's models have both):
# `reset()` zeroes optimizer slots and the step counter. Why a signature and not slots in the
# weights: the weights are what crosses the wire (the server averages them), and FedAvg averages
# weights, not optimizer state; a client starts every round from fresh optimizer state, as a new
# local training session on a phone would. A pooled interpreter calls `reset` between clients.
RESET = "reset"
# FedProx (arXiv:1812.06127) on the device: `train_proximal(x, y, mu)` is `train` whose gradient
# also has mu * (w - w_global), the gradient of mu/2 * ||w - w_global||^2. w_global is what
# `restore` last loaded (the round's global model), kept in variables of its own. A separate
# signature, not a third input of `train`, so FedAvg's step costs nothing extra and `train(x, y)`
# keeps the layout of TensorFlow's on-device training guide.
TRAIN_PROXIMAL = "train_proximal"


@dataclass(frozen=True)
class Layout:
    """One layout: its name, the signatures it needs, and how a user would recognise it."""

    name: str
    required: tuple[str, ...]
    marker: str | None  # the signature only this layout has (None: the guide, the fallback)
    summary: str


GUIDE = Layout(
    "guide",
    (TRAIN, INFER, SAVE, RESTORE),
    None,
    "train(x, y) -> loss, infer(x) -> output, save(checkpoint_path) or save() -> weights, "
    "restore(checkpoint_path) or restore(weights)",
)
PERSONALIZATION = Layout(
    "personalization",
    (LOAD, TRAIN, INFER, SAVE, RESTORE),
    LOAD,
    "load(feature) -> bottleneck, train(bottleneck, label) -> loss, infer(feature) -> output, "
    "save(checkpoint_path) or save() -> weights, restore(checkpoint_path) or restore(weights), "
    "optionally initialize()",
)
# The two kinds of save/restore (see the module docstring).
CHECKPOINT_IO, TENSOR_IO = "checkpoint", "tensors"
WEIGHT_IO = (CHECKPOINT_IO, TENSOR_IO)
ANDROID = Layout(
    "android",
    (TRAIN, INFER, PARAMETERS, RESTORE),
    PARAMETERS,
    "train(x, y) -> loss, infer(x) -> logits, parameters() -> a0..aN, restore(a0..aN)",
)
LAYOUTS = (GUIDE, PERSONALIZATION, ANDROID)
# The signatures of fl_ondevice's own files: the guide layout's plus train_proximal and reset
# (model=mlp, 2nn, cnn, simple_cnn, and transfer with trainable=all), and the personalization
# layout's plus initialize, in the order an app calls them (model=transfer, trainable=head).
OWN_GUIDE_SIGNATURES = (*GUIDE.required, TRAIN_PROXIMAL, RESET)
OWN_PERSONALIZATION_SIGNATURES = (*PERSONALIZATION.required, INITIALIZE)
NAMES = {
    GUIDE.name: "TensorFlow Lite's on-device training guide",
    PERSONALIZATION.name: "TensorFlow's model_personalization app",
    ANDROID.name: "Flower's android-kotlin example",
}


def detect_layout(signatures: Collection[str], source: str) -> Layout:
    """The layout a file's signature names select, or a ``ModelError`` that says what the file
    has, what it lacks for the layout it comes closest to, and what each layout needs.

    A layout is chosen by its marker signature (``load``, ``parameters``), else it is the guide.
    """
    marked = [layout for layout in LAYOUTS if layout.marker in signatures]
    layout = marked[0] if len(marked) == 1 else None
    if layout is None and not marked:
        layout = GUIDE
    if layout is not None and all(s in signatures for s in layout.required):
        return layout
    closest = layout or min(marked, key=lambda lo: len(_missing(lo, signatures)))
    needs = "; ".join(f"{lo.name} ({NAMES[lo.name]}): {lo.summary}" for lo in LAYOUTS)
    why = (
        f"lacks the signature(s) {_missing(closest, signatures)} of the {closest.name} layout"
        if layout is not None
        else f"has both {[lo.marker for lo in marked]}, the markers of different layouts"
    )
    raise ModelError(
        f"{source} {why} (it has {sorted(signatures)}); fl_ondevice federates three layouts, "
        f"detected from the signatures: {needs}"
    )


def _missing(layout: Layout, signatures: Collection[str]) -> list[str]:
    return [s for s in layout.required if s not in signatures]
