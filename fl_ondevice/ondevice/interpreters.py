"""Which interpreter runs a ``.tflite``: LiteRT for builtin-only files, TF 2.18's for Flex ones.

A file made of TFLite builtin ops (fl_ondevice's own models, and any user file converted with
``TFLITE_BUILTINS`` only) runs on ``ai_edge_litert.interpreter.Interpreter``, the maintained
TFLite runtime, which has no Flex (select TF ops) delegate. A file with Flex ops (the on-device
training guide's ``save(checkpoint_path)``, most Keras ``train_step`` exports) runs only on an
interpreter linked with that delegate: TensorFlow's ``tf.lite.Interpreter`` up to 2.18.1 (the
``flex`` extra; 2.19 and later dropped it). TensorFlow is imported for such files only, so
clients of a Flex-free model never import it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from typing import Any

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter as LiteRtInterpreter

from fl_ondevice.errors import ModelError, RuntimeUnsupportedError

LITERT, TENSORFLOW = "ai-edge-litert", "tensorflow"
FLEX_PREFIX = "Flex"  # the custom code of every select-TF op in a converted file
# What an interpreter without the Flex delegate says when it meets a TF op.
FLEX_MISSING = "Select TensorFlow op"
FLEX_DROPPED = (2, 19)  # the first TensorFlow whose Python interpreter lacks the Flex delegate
FLEX_EXTRA = (
    "install fl_ondevice's flex extra, TensorFlow 2.18.1 (the newest whose interpreter links "
    "the Flex delegate; Python <= 3.12): pip install -e '.[flex]'; or convert the model with "
    "TFLITE_BUILTINS only (fl_ondevice's own models show how: gradients written by hand, "
    "weights as save/restore tensors)"
)
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


@dataclass(frozen=True)
class Runtime:
    """The interpreter a model runs on: ``ai-edge-litert`` or ``tensorflow`` (Flex files)."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def operators(model: bytes, source: str = "<bytes>") -> list[str]:
    """The names of the operators a ``.tflite`` file uses, sorted (builtin names such as
    ``FULLY_CONNECTED``, custom codes such as ``FlexSave``)."""
    if len(model) < 8 or model[4:8] != b"TFL3":
        raise ModelError(f"{source} is not a .tflite flatbuffer (no 'TFL3' identifier)")
    try:
        root = schema.Model.GetRootAsModel(model, 0)
        names = set()
        for i in range(root.OperatorCodesLength()):
            code = root.OperatorCodes(i)
            custom = code.CustomCode()
            if custom is not None:
                names.add(custom.decode())
            else:  # files of schema >= 3a keep codes > 127 in BuiltinCode only
                builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
                names.add(_OP_NAMES.get(builtin, f"BUILTIN_{builtin}"))
    except Exception as err:  # noqa: BLE001 - flatbuffers raises plain errors on bad offsets
        raise ModelError(f"{source} is not a loadable .tflite model ({err})") from None
    return sorted(names)


def flex_ops(model: bytes, source: str = "<bytes>") -> list[str]:
    """The Flex (select TensorFlow) ops of a ``.tflite`` file, sorted; empty if it has none."""
    return [op for op in operators(model, source) if op.startswith(FLEX_PREFIX)]


def open_interpreter(model: bytes, num_threads: int, source: str) -> tuple[Any, Runtime]:
    """A new interpreter for ``model`` and the runtime it is: LiteRT unless the file has Flex ops.

    Raises ``RuntimeUnsupportedError`` for a Flex file when no interpreter with the Flex
    delegate is installed, naming its Flex ops and the extra to install.
    """
    runtime = runtime_for(model, source)
    if runtime.name == LITERT:
        return LiteRtInterpreter(model_content=model, num_threads=num_threads), runtime
    tf = importlib.import_module("tensorflow")  # runtime_for checked it runs Flex
    return tf.lite.Interpreter(model_content=model, num_threads=num_threads), runtime


def runtime_for(model: bytes, source: str = "<bytes>") -> Runtime:
    """The runtime that runs ``model``: LiteRT, or for a file with Flex ops TensorFlow's
    interpreter (``RuntimeUnsupportedError`` when the installed one cannot run them)."""
    flex = flex_ops(model, source)
    if not flex:
        return Runtime(LITERT, importlib.metadata.version(LITERT))
    return Runtime(TENSORFLOW, _tensorflow(flex, source).__version__)


def flex_unsupported(err: BaseException, source: str) -> RuntimeUnsupportedError | None:
    """The error to raise when an interpreter failed on a Flex op it cannot run, else None."""
    if FLEX_MISSING not in str(err):
        return None
    tf = sys.modules.get("tensorflow")
    version = getattr(tf, "__version__", "?")
    return RuntimeUnsupportedError(
        f"{source} uses TensorFlow (Flex) ops, and the interpreter of the installed TensorFlow "
        f"({version}) cannot run them (TensorFlow >= 2.19 has no Flex delegate); {FLEX_EXTRA}"
    )


def _tensorflow(flex: list[str], source: str) -> Any:
    what = f"{source} uses TensorFlow (Flex) ops {flex}, which LiteRT (ai-edge-litert) cannot run"
    allow_tensorflow()
    try:
        tf = importlib.import_module("tensorflow")
    except ImportError:
        raise RuntimeUnsupportedError(
            f"{what}, and TensorFlow is not installed; {FLEX_EXTRA}"
        ) from None
    if _major_minor(tf.__version__) >= FLEX_DROPPED:
        raise RuntimeUnsupportedError(
            f"{what}, nor can the interpreter of the installed TensorFlow {tf.__version__} "
            f"(TensorFlow {FLEX_DROPPED[0]}.{FLEX_DROPPED[1]} dropped its Flex delegate); "
            f"{FLEX_EXTRA}"
        )
    return tf


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.findall(r"\d+", version)[:2]
    return int(major), int(minor)


# -- keeping TensorFlow out of the simulation's workers -----------------------------------------
def block_tensorflow() -> None:
    """Make ``import tensorflow`` fail with ``ModuleNotFoundError`` in this process.

    The Ray worker setup hook of the simulation engine (``fl_ondevice.runtime.cluster.SETUP_HOOK``):
    Flower's actor module imports ``flwr.simulation``, whose ``ray_transport/utils.py`` runs
    ``import tensorflow`` (for its GPU-growth helper) whenever TensorFlow is installed; that
    costs each worker ~500 MiB and seconds, for nothing when the model is Flex-free. A ``None``
    entry in ``sys.modules`` is Python's documented way to make an import raise
    ``ModuleNotFoundError``, which Flower catches. A Flex file lifts the block
    (:func:`allow_tensorflow`).
    """
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]


def allow_tensorflow() -> None:
    """Undo :func:`block_tensorflow` (a no-op where TensorFlow is not blocked)."""
    if "tensorflow" in sys.modules and sys.modules["tensorflow"] is None:
        del sys.modules["tensorflow"]


def tensorflow_imported() -> bool:
    """Whether this process has imported TensorFlow."""
    return sys.modules.get("tensorflow") is not None
