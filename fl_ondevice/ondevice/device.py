"""OnDeviceModel: a TFLite interpreter trained and checkpointed through its signatures."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from fl_ondevice.errors import (
    CheckpointError,
    InputError,
    ModelError,
    RuntimeUnsupportedError,
    TrainingError,
)
from fl_ondevice.ondevice.interpreters import flex_unsupported, open_interpreter
from fl_ondevice.ondevice.layouts import (
    INFER,
    INITIALIZE,
    LOAD,
    PERSONALIZATION,
    RESET,
    RESTORE,
    SAVE,
    TENSOR_IO,
    TRAIN,
    TRAIN_PROXIMAL,
    Layout,
    detect_layout,
)
from fl_ondevice.ondevice.scratch import scratch_dir
from fl_ondevice.ondevice.signatures import Signatures, read_signatures
from fl_ondevice.ondevice.weights import Weights, WeightSpec

# Examples per `infer` (and `load`) call, unless the caller says otherwise: each interpreter
# keeps buffers of this batch. A run passes its config's eval_batch_size (same default).
EVAL_BATCH_SIZE = 256


def _path_tensor(path: str | os.PathLike[str]) -> np.ndarray:
    # A bytes scalar: an object array would reach the Save op as a garbage file name.
    return np.array(os.fspath(path).encode(), dtype=np.bytes_)


def _checkpoint_files() -> ModuleType:
    # TF's checkpoint reader and Save op, for models whose save/restore take a checkpoint path:
    # those run TF's Save/Restore ops, so on TF's own interpreter, and TensorFlow is there.
    import fl_ondevice.ondevice.checkpoint

    return fl_ondevice.ondevice.checkpoint


def explain_load_error(err: BaseException, source: str) -> ModelError | RuntimeUnsupportedError:
    """Turn an interpreter's load or invoke error into one that says what to do."""
    return flex_unsupported(err, source) or ModelError(
        f"{source} is not a loadable .tflite model: {_first_line(err)}"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass(frozen=True)
class Staged:
    """Weights checked against a model, ready for any number of ``restore_staged`` calls.

    Attributes
    ----------
    weights : dict of str to np.ndarray
        The weights, float32 as the model's, in sorted name order.
    path : str or None
        For a model whose ``restore`` takes a checkpoint path: the file written once for them.
    """

    weights: Weights
    path: str | None = None


class OnDeviceModel:
    """A ``.tflite`` on-device training model, in any layout of :mod:`fl_ondevice.ondevice.layouts`.

    Works with any such model (ours from :mod:`fl_ondevice.ondevice.model`, one built by following
    TensorFlow's on-device training guide, TensorFlow's model_personalization app or Flower's
    Android example): the layout, input names, shapes and the label encoding (integer labels or
    one-hot) are read from the signatures.

    ``fit`` and ``train_step`` take ``train``'s inputs: images, or for the personalization
    layout the bottlenecks ``load`` computes from them; ``evaluate`` and ``predict`` take images
    (``infer``). Weights are ``{name: array}`` whatever the layout and however ``save`` and
    ``restore`` carry them (``weight_io``): tensors, or a checkpoint file's tensors.

    The file runs on LiteRT (``ai_edge_litert``) unless it has Flex ops, which only TensorFlow
    2.18's interpreter runs (``fl_ondevice.ondevice.interpreters``); ``runtime`` says which.

    Parameters
    ----------
    model
        Path to a ``.tflite`` file, or its bytes.
    num_threads
        Interpreter threads. The convolution kernels (and their gradients) of a model with
        trainable weights run single-threaded whatever this says; dense layers (BATCH_MATMUL)
        do use more threads. In a simulation, one single-threaded interpreter per core is the
        efficient layout.
    """

    def __init__(self, model: str | os.PathLike[str] | bytes, num_threads: int = 1) -> None:
        if isinstance(model, bytes):
            self.model_bytes, self.source = model, "<bytes>"
        else:
            self.source = os.fspath(model)
            try:
                self.model_bytes = Path(self.source).read_bytes()
            except OSError as err:
                raise ModelError(f"cannot read model file {self.source!r}: {err}") from None
        self.num_threads = num_threads
        self.loaded_examples = 0  # examples run through `load` by this object, ever
        self._load()
        self.layout: Layout = detect_layout(self.signatures, self.source)
        self.io: Signatures = read_signatures(
            self.layout, self.signatures, self._runners, self.source
        )
        # What callers check their data against (see Signatures).
        self.x_shape, self.train_x_shape = self.io.x_shape, self.io.train_x_shape
        self.num_classes, self.one_hot = self.io.num_classes, self.io.one_hot
        self.weight_io = self.io.weight_io
        try:
            initial = self.get_weights()
        except TrainingError as err:
            raise ModelError(
                f"{self.source}: the {self.io.getter} signature failed: {err}"
            ) from None
        self.weight_spec = WeightSpec.of(initial)

    # -- loading ------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            self.interpreter, self.runtime = open_interpreter(
                self.model_bytes, self.num_threads, self.source
            )
            self.signatures = self.interpreter.get_signature_list()
            self._runners = {
                name: self.interpreter.get_signature_runner(name) for name in self.signatures
            }
        except (ValueError, RuntimeError) as err:
            raise explain_load_error(err, self.source) from None

    def _invoke(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return dict(self._runners[signature](**inputs))
        except (ValueError, RuntimeError) as err:
            flex = flex_unsupported(err, self.source)
            if flex is not None:
                raise flex from None
            # Error text accumulates on a failed interpreter: replace it before going on.
            self._load()
            raise TrainingError(
                f"{self.source}: the {signature} signature failed ({_first_line(err)}); the "
                "interpreter was reloaded with the model file's initial weights"
            ) from None

    # -- input validation ---------------------------------------------------------------------
    def _check_x(self, x: np.ndarray, shape: tuple[int, ...], what: str = "x") -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        got = tuple(x.shape[1:])
        if x.ndim != len(shape) + 1 or any(
            want not in (-1, g) for want, g in zip(shape, got, strict=True)
        ):
            raise InputError(
                f"{what} has shape {tuple(x.shape)}; the model expects (batch, "
                f"{', '.join(str(d) for d in shape)})"
            )
        return x

    def _check_y(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"y must be a 1-D array of integer labels, got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise InputError(f"x holds {len(x)} examples but y holds {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise InputError(
                f"labels must be in [0, {self.num_classes}), got min {y.min()} max {y.max()}"
            )
        return y

    def _check_train(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        what = "x (load's bottlenecks)" if self.layout is PERSONALIZATION else "x"
        x = self._check_x(x, self.train_x_shape, what)
        return x, self._check_y(x, y)

    def _encode_y(self, y: np.ndarray) -> np.ndarray:
        if self.one_hot:
            return np.eye(self.num_classes, dtype=self.io.y_dtype)[y]
        return y.astype(self.io.y_dtype)

    # -- the frozen base (personalization layout) ---------------------------------------------
    def load(self, x: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        """``train``'s inputs for images ``x``: ``load``'s bottlenecks (personalization layout,
        counted in ``loaded_examples``), the images themselves for the other layouts."""
        x = self._check_x(x, self.x_shape)
        if self.layout is not PERSONALIZATION:
            return x
        parts = [
            self._invoke(LOAD, **{self.io.x_name_load: x[i : i + batch_size]})[
                self.io.bottleneck_name
            ]
            for i in range(0, len(x), batch_size)
        ]
        self.loaded_examples += len(x)
        if not parts:
            return np.zeros((0, *self.train_x_shape), np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    # -- training -----------------------------------------------------------------------------
    def _train_batch(self, x: np.ndarray, y: np.ndarray, mu: float = 0.0) -> float:
        inputs = {self.io.x_name: x, self.io.y_name: self._encode_y(y)}
        if mu:
            out = self._invoke(TRAIN_PROXIMAL, **inputs, mu=np.array(mu, np.float32))
        else:
            out = self._invoke(TRAIN, **inputs)
        loss = float(out["loss"])
        if not np.isfinite(loss):
            raise TrainingError(
                f"train returned a non-finite loss ({loss}) on a batch of {len(x)}: the weights "
                "have diverged; lower model.learning_rate or check the inputs for NaN/Inf"
            )
        return loss

    def train_step(self, x: np.ndarray, y: np.ndarray, proximal_mu: float = 0.0) -> float:
        """Run one optimizer step on a batch of ``train``'s inputs and return its loss:
        ``train``, or with ``proximal_mu`` > 0 the FedProx step ``train_proximal`` (anchored at
        the weights the last ``restore`` loaded)."""
        x, y = self._check_train(x, y)
        self.check_proximal(proximal_mu)
        if not len(x):
            raise InputError("train_step needs at least one example")
        return self._train_batch(x, y, proximal_mu)

    def check_proximal(self, mu: float) -> None:
        """Raise unless this model can take FedProx steps with ``mu``: ``InputError`` for a
        negative or non-finite mu, ``ModelError`` for mu > 0 without ``train_proximal``."""
        if mu < 0 or not np.isfinite(mu):
            raise InputError(f"proximal_mu={mu} must be a finite number >= 0")
        if mu > 0 and not self.io.proximal:
            raise ModelError(
                f"{self.source} has no {TRAIN_PROXIMAL}(x, y, mu) signature, so it cannot "
                f"train with FedProx's proximal term (proximal_mu={mu}); use one of fl_ondevice's "
                f"models, add that signature to the file, or set strategy.proximal_mu=0"
            )

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int = 1,
        batch_size: int | None = 32,
        seed: int = 0,
        proximal_mu: float = 0.0,
    ) -> dict[str, float]:
        """Train for ``epochs`` passes of shuffled minibatches (the last one may be smaller).

        ``x`` are ``train``'s inputs (``load``'s bottlenecks for the personalization layout).
        ``batch_size=None`` means full batch (one step per epoch: FedSGD's B = inf).
        ``proximal_mu`` > 0 takes FedProx steps (``train_proximal``). Returns the
        mean loss over all steps, ``examples`` (per epoch), ``steps``, wall ``seconds`` and the
        ``train_seconds`` spent inside the ``train`` signature.
        """
        x, y = self._check_train(x, y)
        self.check_proximal(proximal_mu)
        n = len(x)
        if n == 0:
            raise InputError("fit needs at least one example")
        if epochs < 1 or (batch_size is not None and batch_size < 1):
            raise InputError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
        b = n if batch_size is None else batch_size
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        losses: list[float] = []
        in_train = 0.0
        for _ in range(epochs):
            order = rng.permutation(n)
            for start in range(0, n, b):
                idx = order[start : start + b]
                xb, yb = x[idx], y[idx]
                t1 = time.perf_counter()
                losses.append(self._train_batch(xb, yb, proximal_mu))
                in_train += time.perf_counter() - t1
        return {
            "loss": float(np.mean(losses)),
            "examples": float(n),
            "steps": float(len(losses)),
            "seconds": time.perf_counter() - t0,
            "train_seconds": in_train,
        }

    def reset_optimizer(self) -> None:
        """Zero optimizer state (momentum, Adam moments, step) so no client inherits another's.

        Models with a ``reset`` signature (ours) reset in place; for any other model the
        interpreter is recreated from the model bytes, which also resets the weights to the
        file's: call ``set_weights`` after this.
        """
        if RESET in self.signatures:
            self._invoke(RESET)
        else:
            self._load()

    # -- inference ----------------------------------------------------------------------------
    def _infer(self, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        probs, log_probs = [], []
        for start in range(0, len(x), batch_size):
            out = self._invoke(INFER, **{self.io.x_name_infer: x[start : start + batch_size]})
            p = out[self.io.prob_name]
            if self.io.has_logits:
                lp = _log_softmax(out["logits"].astype(np.float64))
            elif self.io.prob_name == "output" or _are_probabilities(p):
                lp = np.log(np.clip(p.astype(np.float64), 1e-12, None))
            else:  # `logits` that are scores after all: no softmax at the end of infer
                lp = _log_softmax(p.astype(np.float64))
                p = np.exp(lp).astype(np.float32)
            probs.append(p)
            log_probs.append(lp)
        return np.concatenate(probs), np.concatenate(log_probs)

    def predict(self, x: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        """Class probabilities ``(N, classes)`` from the ``infer`` signature."""
        x = self._check_x(x, self.x_shape)
        return self._infer(x, batch_size)[0]

    def evaluate(
        self, x: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH_SIZE
    ) -> dict[str, float]:
        """Mean cross-entropy ``loss`` and ``accuracy`` of the model on images ``x`` and labels
        ``y`` (through ``infer``, base included for the personalization layout)."""
        x = self._check_x(x, self.x_shape)
        y = self._check_y(x, y)
        if not len(x):
            raise InputError("evaluate needs at least one example")
        probs, log_probs = self._infer(x, batch_size)
        return {
            "loss": float(-log_probs[np.arange(len(y)), y].mean()),
            "accuracy": float((probs.argmax(axis=1) == y).mean()),
        }

    # -- weights ------------------------------------------------------------------------------
    def get_weights(self) -> Weights:
        """The current weights, ``{name: array}`` in sorted name order: ``save``'s (or the
        android layout's ``parameters``') tensors, or the tensors of the checkpoint file
        ``save`` writes."""
        if self.weight_io == TENSOR_IO:
            out = self._invoke(self.io.getter)
            return {n: np.array(out[n]) for n in sorted(out)}
        path = os.path.join(scratch_dir(), f"weights-{id(self)}.ckpt")
        self.save_checkpoint(path)
        return _checkpoint_files().read_checkpoint(path)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Run ``save(checkpoint_path)``: the model writes its weights as a TF checkpoint file at
        ``path`` (a model whose ``save`` takes a checkpoint path, ``weight_io`` checkpoint)."""
        self._invoke(SAVE, **{self.io.path_names[SAVE]: _path_tensor(path)})
        if not Path(path).is_file():
            raise CheckpointError(f"{self.source}: the save signature did not write {path!r}")

    def restore_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Run ``restore(checkpoint_path)`` on the TF checkpoint file at ``path``, unchecked
        (:meth:`stage` checks the weights and writes the file)."""
        self._invoke(RESTORE, **{self.io.path_names[RESTORE]: _path_tensor(path)})

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Set the weights through ``restore`` (checked first: a wrong name, shape or dtype
        raises ``CheckpointError`` and leaves the weights unchanged)."""
        self.restore_staged(self.stage(weights))

    def stage(self, weights: Mapping[str, np.ndarray]) -> Staged:
        """Check ``weights`` once for any number of :meth:`restore_staged` calls (the clients of
        one message); a model whose ``restore`` takes a checkpoint path gets the file written
        once (in this process's scratch directory; the next ``stage`` overwrites it)."""
        self.weight_spec.validate(weights, "weights")
        checked = {t.name: np.ascontiguousarray(weights[t.name]) for t in self.weight_spec.tensors}
        if self.weight_io == TENSOR_IO:
            return Staged(checked)
        path = os.path.join(scratch_dir(), f"staged-{id(self)}.ckpt")
        _checkpoint_files().write_checkpoint(path, checked)
        return Staged(checked, path)

    def restore_staged(self, staged: Staged) -> None:
        """Load weights :meth:`stage` checked (for this model) through ``restore``."""
        if staged.path is None:
            self._invoke(RESTORE, **staged.weights)
        else:
            self.restore_checkpoint(staged.path)

    def initial_weights(self) -> Weights:
        """The weights a federation starts from: ``initialize()``'s where the file has that
        signature (the personalization layout's starting head), else the file's own."""
        if INITIALIZE in self.signatures:
            self._invoke(INITIALIZE)
        return self.get_weights()


def _are_probabilities(p: np.ndarray) -> bool:
    return bool(np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0, atol=1e-3))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def evaluate_split(
    models: Sequence[OnDeviceModel],
    weights: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, float]:
    """``evaluate`` of ``weights`` on ``(x, y)``, the examples split over interpreters of one
    model, each in its own thread (``Invoke`` releases the GIL).

    Why not ``num_threads``: with trainable weights the conv kernels run single-threaded (see
    ``experiments/bench_device.md``), so one interpreter per core is what uses the cores.
    Loss and accuracy are recombined from per-part sums: equal to one ``evaluate`` up to float
    rounding of the means.
    """
    models = models[: max(1, min(len(models), len(x)))]  # no empty parts
    staged = models[0].stage(weights)
    for m in models:
        m.restore_staged(staged)
    parts = np.array_split(np.arange(len(x)), len(models))
    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(lambda m, i: m.evaluate(x[i], y[i], batch_size), models, parts))
    n = np.array([len(i) for i in parts], dtype=np.float64)
    return {k: float(np.dot(n, [r[k] for r in results]) / n.sum()) for k in ("loss", "accuracy")}
