"""The three model layouts: detected from the signatures, trained, checkpointed and federated."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import metrics_rows
from guide_model import GuideModel, guide_tflite_bytes, to_tflite
from layout_models import (
    AndroidModel,
    PersonalizationModel,
    android_tflite_bytes,
    personalization_tflite_bytes,
)

from fl_ondevice.checkpoint import read_checkpoint
from fl_ondevice.config import parse_config
from fl_ondevice.data import load_dataset
from fl_ondevice.device import OnDeviceModel
from fl_ondevice.errors import ModelError
from fl_ondevice.partition import make_partitions

_FILES: dict[str, bytes] = {}


def layout_file(name: str) -> bytes:
    """The converted file of a layout, once per session (conversion takes seconds)."""
    makers = {
        "guide": guide_tflite_bytes,
        "personalization": personalization_tflite_bytes,
        "android": android_tflite_bytes,
    }
    if name not in _FILES:
        _FILES[name] = makers[name]()
    return _FILES[name]


@pytest.fixture(scope="module")
def layout_path(tmp_path_factory):
    def path(name: str):
        p = tmp_path_factory.getbasetemp() / f"layout-{name}.tflite"
        if not p.exists():
            p.write_bytes(layout_file(name))
        return p

    return path


# -- detection ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "train_x_shape", "weights"),
    [
        ("guide", (8, 8), None),
        ("personalization", (64,), {"ws:0": (64, 10), "bs:0": (1, 10)}),
        ("android", (8, 8), {"a0": (64, 32), "a1": (32,), "a2": (32, 10), "a3": (10,)}),
    ],
)
def test_layout_is_detected_from_the_signatures(name, train_x_shape, weights):
    device = OnDeviceModel(layout_file(name))

    assert device.layout.name == name
    assert device.x_shape == (8, 8) and device.num_classes == 10 and device.one_hot
    assert device.train_x_shape == train_x_shape
    if weights is not None:  # exactly what save / parameters exports
        assert {n: a.shape for n, a in device.get_weights().items()} == weights


def test_a_file_of_no_layout_says_what_it_has_and_what_each_layout_needs():
    m = GuideModel()
    sigs = {k: getattr(m, k).get_concrete_function() for k in ("train", "infer")}

    with pytest.raises(ModelError) as err:
        OnDeviceModel(to_tflite(m, sigs))

    text = str(err.value)
    assert "lacks the signature(s) ['save', 'restore'] of the guide layout" in text
    assert "it has ['infer', 'train']" in text
    for needs in ("load(feature) -> bottleneck", "parameters() -> a0..aN", "save(checkpoint_path)"):
        assert needs in text


def test_android_restore_that_does_not_take_parameters_outputs_is_refused():
    class Broken(AndroidModel):
        @tf.function(input_signature=[])
        def parameters(self):
            return {f"a{i}": v.read_value() for i, v in enumerate(self.vars[:2])}

    m = Broken()
    restore = m.restore.get_concrete_function(
        **{f"a{i}": tf.TensorSpec(v.shape, v.dtype, name=f"a{i}") for i, v in enumerate(m.vars)}
    )
    sigs = {k: getattr(m, k).get_concrete_function() for k in ("train", "infer", "parameters")}
    with pytest.raises(ModelError, match=r"parameters\(\) must .* returns \['a0', 'a1'\]"):
        OnDeviceModel(to_tflite(m, {**sigs, "restore": restore}))


# -- what each layout's signatures compute --------------------------------------------------------
def test_personalization_load_is_the_frozen_base_and_train_moves_the_head_only(digits):
    device = OnDeviceModel(layout_file("personalization"))
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
    z = bottlenecks.astype(np.float64) @ after["ws:0"] + after["bs:0"]
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(device.predict(x), p / p.sum(1, keepdims=True), atol=1e-5)


def test_initialize_gives_the_same_starting_head_in_every_interpreter():
    a = OnDeviceModel(layout_file("personalization")).initial_weights()
    b = OnDeviceModel(layout_file("personalization")).initial_weights()

    assert float(np.abs(a["ws:0"]).max()) > 0  # not the zeros the file starts with
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_android_logits_are_read_as_the_probabilities_they_are(digits):
    device = OnDeviceModel(layout_file("android"))
    x, y = digits[2][:200], digits[3][:200]
    p = AndroidModel().model(x).numpy().astype(np.float64)  # same seed: same weights

    result = device.evaluate(x, y)

    assert result["loss"] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-5)
    assert result["accuracy"] == pytest.approx((p.argmax(1) == y).mean())


def test_android_logits_that_are_scores_are_softmaxed(digits):
    device = OnDeviceModel(android_tflite_bytes(activation=None))
    x, y = digits[2][:200], digits[3][:200]
    z = AndroidModel(activation=None).model(x).numpy().astype(np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))

    result = device.evaluate(x, y)

    assert result["loss"] == pytest.approx(-log_p[np.arange(len(y)), y].mean(), rel=1e-5)
    np.testing.assert_allclose(device.predict(x), np.exp(log_p), atol=1e-6)


@pytest.mark.parametrize("name", ["personalization", "android"])
def test_weights_round_trip_bitwise(name, tmp_path, digits):
    trained, fresh = OnDeviceModel(layout_file(name)), OnDeviceModel(layout_file(name))
    trained.fit(trained.load(digits[0][:128]), digits[1][:128], epochs=1, batch_size=16)
    weights = trained.get_weights()

    trained.save(tmp_path / "w.ckpt")
    fresh.restore(tmp_path / "w.ckpt")
    assert all(
        read_checkpoint(tmp_path / "w.ckpt")[n].tobytes() == weights[n].tobytes() for n in weights
    )
    got = fresh.get_weights()
    assert all(got[n].tobytes() == weights[n].tobytes() for n in weights)
    x = digits[2][:100]
    assert fresh.predict(x).tobytes() == trained.predict(x).tobytes()


# -- federated ------------------------------------------------------------------------------------
FEDERATED = ("num_clients=4", "num_rounds=3", "strategy.fraction_train=1.0")


@pytest.mark.parametrize("name", ["personalization", "android"])
def test_each_layout_is_federated(name, run, layout_path):
    path = layout_path(name)

    out = run(*FEDERATED, "model=tflite", f"model.path={path}", "model.learning_rate=0.1")

    table = metrics_rows(out)
    assert [int(r["round"]) for r in table] == [0, 1, 2, 3]
    assert float(table[-1]["accuracy"]) > 0.5  # chance: 0.1
    # The global model's weights, as written, give the accuracy the run reported.
    device = OnDeviceModel(path)
    device.restore(out / "global_model.ckpt")
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
