"""The three model layouts: detected from the signatures, trained, checkpointed and federated.

Each layout is tested twice: as its public example converts it (``flex``: Flex ops, run by TF
2.18.1's interpreter in the flex environment) and without Flex ops (``builtin``: LiteRT).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import FLEX, flex_param, metrics_rows
from guide_model import BuiltinGuideModel, guide_tflite_bytes, to_tflite
from layout_models import (
    AndroidModel,
    BuiltinAndroidModel,
    PersonalizationModel,
    android_tflite_bytes,
    personalization_tflite_bytes,
)

from fl_ondevice.config import parse_config
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.data.partitioners import make_partitions
from fl_ondevice.errors import ModelError, RuntimeUnsupportedError
from fl_ondevice.ondevice.checkpoint import read_checkpoint, write_checkpoint
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.interpreters import LITERT, TENSORFLOW
from fl_ondevice.ondevice.layouts import (
    CHECKPOINT_IO,
    INFER,
    PARAMETERS,
    RESTORE,
    SAVE,
    TENSOR_IO,
    TRAIN,
)

_FILES: dict[tuple[str, str], bytes] = {}
LAYOUTS = ("guide", "personalization", "android")
# Every layout, as its public example converts it (Flex) and without Flex ops.
VARIANTS = [
    *(flex_param(name, "flex") for name in LAYOUTS),
    *(pytest.param(name, "builtin") for name in LAYOUTS),
]
# The personalization head's weights: the checkpoint names of the app's file, or `save`'s outputs.
HEAD = {"flex": ("ws:0", "bs:0"), "builtin": ("ws", "bs")}


def layout_file(name: str, variant: str = "builtin") -> bytes:
    """The converted file of a layout, once per session (conversion takes seconds)."""
    makers = {
        "guide": guide_tflite_bytes,
        "personalization": personalization_tflite_bytes,
        "android": android_tflite_bytes,
    }
    if (name, variant) not in _FILES:
        _FILES[name, variant] = makers[name](flex=variant == "flex")
    return _FILES[name, variant]


@pytest.fixture(scope="module")
def layout_path(tmp_path_factory):
    def path(name: str, variant: str = "builtin"):
        p = tmp_path_factory.getbasetemp() / f"layout-{name}-{variant}.tflite"
        if not p.exists():
            p.write_bytes(layout_file(name, variant))
        return p

    return path


# -- detection ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_layout_runtime_and_weight_io_are_detected_from_the_file(name, variant):
    device = OnDeviceModel(layout_file(name, variant))

    assert device.layout.name == name
    assert device.x_shape == (8, 8) and device.num_classes == 10 and device.one_hot
    assert device.train_x_shape == ((64,) if name == "personalization" else (8, 8))
    assert device.runtime.name == (TENSORFLOW if variant == "flex" else LITERT)
    by_path = variant == "flex" and name != "android"  # android's weights are always tensors
    assert device.weight_io == (CHECKPOINT_IO if by_path else TENSOR_IO)
    shapes = {n: a.shape for n, a in device.get_weights().items()}  # what save/parameters export
    if name == "personalization":
        assert shapes == dict(zip(HEAD[variant], [(64, 10), (1, 10)], strict=True))
    if name == "android":
        assert shapes == {"a0": (64, 32), "a1": (32,), "a2": (32, 10), "a3": (10,)}


@pytest.mark.skipif(FLEX, reason="in the flex environment the file runs: see the flex variants")
@pytest.mark.parametrize(
    ("name", "ops"),
    [
        ("guide", "['FlexReluGrad', 'FlexRestore', 'FlexSave']"),
        ("personalization", "['FlexRestore', 'FlexSave']"),
        ("android", "['FlexReluGrad']"),
    ],
)
def test_a_flex_file_without_the_flex_extra_names_its_flex_ops_and_the_extra(name, ops):
    with pytest.raises(RuntimeUnsupportedError) as err:
        OnDeviceModel(layout_file(name, "flex"))

    text = str(err.value)
    assert f"uses TensorFlow (Flex) ops {ops}" in text
    assert "pip install -e '.[flex]'" in text and "TFLITE_BUILTINS only" in text


def test_a_file_of_no_layout_says_what_it_has_and_what_each_layout_needs():
    m = BuiltinGuideModel()
    sigs = {k: getattr(m, k).get_concrete_function() for k in (TRAIN, INFER)}

    with pytest.raises(ModelError) as err:
        OnDeviceModel(to_tflite(m, sigs, flex=False))

    text = str(err.value)
    assert "lacks the signature(s) ['save', 'restore'] of the guide layout" in text
    assert "it has ['infer', 'train']" in text
    for needs in ("load(feature) -> bottleneck", "parameters() -> a0..aN", "save() -> weights"):
        assert needs in text


def test_android_restore_that_does_not_take_parameters_outputs_is_refused():
    class Broken(BuiltinAndroidModel):
        @tf.function(input_signature=[])
        def parameters(self):
            return {f"a{i}": v.read_value() for i, v in enumerate(self.vars[:2])}

    m = Broken()
    restore = m.restore.get_concrete_function(
        **{f"a{i}": tf.TensorSpec(v.shape, v.dtype, name=f"a{i}") for i, v in enumerate(m.vars)}
    )
    sigs = {k: getattr(m, k).get_concrete_function() for k in (TRAIN, INFER, PARAMETERS)}
    with pytest.raises(ModelError, match=r"restore must take the tensors parameters\(\) returns"):
        OnDeviceModel(to_tflite(m, {**sigs, RESTORE: restore}, flex=False))


def test_save_that_takes_something_else_than_a_path_or_nothing_is_refused():
    class Broken(BuiltinGuideModel):
        @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
        def save(self, scale):
            return {n: v.read_value() * scale for n, v in zip(self.names, self.vars, strict=True)}

    m = Broken()
    sigs = {k: getattr(m, k).get_concrete_function() for k in (TRAIN, INFER, SAVE)}
    with pytest.raises(ModelError, match=r"save must take no input and return the weights"):
        OnDeviceModel(to_tflite(m, {**sigs, RESTORE: m.restore_signature()}, flex=False))


# -- what each layout's signatures compute --------------------------------------------------------
@pytest.mark.parametrize("variant", [flex_param("flex"), "builtin"])
def test_personalization_load_is_the_frozen_base_and_train_moves_the_head_only(digits, variant):
    device = OnDeviceModel(layout_file("personalization", variant))
    ws, bs = HEAD[variant]
    x, y = digits[0][:300], digits[1][:300]
    # The same Keras base, built in TF from the same seed, computed independently.
    expected = PersonalizationModel().base(x, training=False).numpy()

    bottlenecks = device.load(x)
    np.testing.assert_allclose(bottlenecks, expected, rtol=1e-5, atol=1e-6)
    before = device.get_weights()
    device.fit(bottlenecks, y, epochs=2, batch_size=32)

    assert device.loaded_examples == 300
    assert device.load(x).tobytes() == bottlenecks.tobytes()  # the base did not move
    after = device.get_weights()
    assert all(not np.array_equal(after[n], before[n]) for n in before)
    # infer = softmax(load(x) @ ws + bs), recomputed from the saved head.
    z = bottlenecks.astype(np.float64) @ after[ws] + after[bs]
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(device.predict(x), p / p.sum(1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("variant", [flex_param("flex"), "builtin"])
def test_initialize_gives_the_same_starting_head_in_every_interpreter(variant):
    a = OnDeviceModel(layout_file("personalization", variant)).initial_weights()
    b = OnDeviceModel(layout_file("personalization", variant)).initial_weights()

    assert float(np.abs(a[HEAD[variant][0]]).max()) > 0  # not the zeros the file starts with
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


@pytest.mark.parametrize("variant", [flex_param("flex"), "builtin"])
def test_android_logits_are_read_as_the_probabilities_they_are(digits, variant):
    device = OnDeviceModel(layout_file("android", variant))
    x, y = digits[2][:200], digits[3][:200]
    p = AndroidModel().model(x).numpy().astype(np.float64)  # same seed: same weights

    result = device.evaluate(x, y)

    assert result["loss"] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-5)
    assert result["accuracy"] == pytest.approx((p.argmax(1) == y).mean())


def test_android_logits_that_are_scores_are_softmaxed(digits):
    device = OnDeviceModel(android_tflite_bytes(activation=None, flex=False))
    x, y = digits[2][:200], digits[3][:200]
    z = AndroidModel(activation=None).model(x).numpy().astype(np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))

    result = device.evaluate(x, y)

    assert result["loss"] == pytest.approx(-log_p[np.arange(len(y)), y].mean(), rel=1e-5)
    np.testing.assert_allclose(device.predict(x), np.exp(log_p), atol=1e-6)


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_weights_round_trip_bitwise_through_a_checkpoint_file(name, variant, tmp_path, digits):
    # Out of one interpreter, into the server's checkpoint file, into another interpreter.
    trained = OnDeviceModel(layout_file(name, variant))
    fresh = OnDeviceModel(layout_file(name, variant))
    trained.fit(trained.load(digits[0][:128]), digits[1][:128], epochs=1, batch_size=16)
    weights = trained.get_weights()

    write_checkpoint(tmp_path / "w.ckpt", weights)
    fresh.set_weights(read_checkpoint(tmp_path / "w.ckpt"))

    got = fresh.get_weights()
    assert all(got[n].tobytes() == weights[n].tobytes() for n in weights)
    x = digits[2][:100]
    assert fresh.predict(x).tobytes() == trained.predict(x).tobytes()


# -- federated ------------------------------------------------------------------------------------
FEDERATED = ("num_clients=4", "num_rounds=3", "strategy.fraction_train=1.0")


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_each_layout_is_federated(name, variant, run, layout_path):
    path = layout_path(name, variant)

    out = run(*FEDERATED, "model=tflite", f"model.path={path}", "model.learning_rate=0.1")

    table = metrics_rows(out)
    assert [int(r["round"]) for r in table] == [0, 1, 2, 3]
    assert float(table[-1]["accuracy"]) > 0.5  # chance: 0.1
    runtime = json.loads((out / "metrics.json").read_text())["runtime"]
    assert runtime["name"] == (TENSORFLOW if variant == "flex" else LITERT) and runtime["version"]
    # The global model's weights, as written, give the accuracy the run reported.
    device = OnDeviceModel(path)
    device.set_weights(read_checkpoint(out / "global_model.ckpt"))
    data = load_dataset(parse_config({}).dataset, 0)
    assert device.evaluate(data.x_test, data.y_test)["accuracy"] == pytest.approx(
        float(table[-1]["accuracy"]), abs=1e-9
    )
    # Round 0 is the file's initialize()d head (personalization), or the file's weights.
    start = OnDeviceModel(path)
    start.set_weights(start.initial_weights())
    assert start.evaluate(data.x_test, data.y_test)["accuracy"] == pytest.approx(
        float(table[0]["accuracy"]), abs=1e-9
    )


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_personalization_clients_run_load_once_per_example_per_run(run, layout_path, partition):
    # Both runs share one engine (as the jobs of a sweep do): the second must not reuse the
    # first one's bottlenecks, whose clients hold other examples.
    out = run(
        *FEDERATED,
        "model=tflite",
        f"model.path={layout_path('personalization')}",
        "model.learning_rate=0.1",
        f"partition={partition}",
    )

    cfg = parse_config({"num_clients": 4, "partition": {"name": partition}})
    data = load_dataset(cfg.dataset, 0)
    sizes = [len(p.train_indices) for p in make_partitions(data, 4, cfg.partition, 0)]
    table = metrics_rows(out)[1:]
    assert [int(r["clients_failed"]) for r in table] == [0, 0, 0]
    # Every client trains in every round; each ran load over its examples in the first only.
    assert [int(r["examples_loaded"]) for r in table] == [sum(sizes), 0, 0]


@pytest.mark.skipif(FLEX, reason="in the flex environment the file runs: see the flex variants")
def test_a_run_of_a_flex_file_stops_before_the_engine_without_the_extra(
    no_engine, layout_path, tmp_path, cache
):
    from conftest import compose_config

    from fl_ondevice.simulate import simulate

    cfg = compose_config(
        tmp_path, f"cache_dir={cache}", "model=tflite", f"model.path={layout_path('guide', 'flex')}"
    )
    with pytest.raises(RuntimeUnsupportedError, match=r"layout-guide-flex\.tflite uses .*Flex"):
        simulate(cfg)
