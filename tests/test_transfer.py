"""model=transfer: the class filter, the pretrained base, and the personalization-layout file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from fl_ondevice.config import Config, DatasetConfig, ModelConfig, parse_config
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.errors import ConfigError
from fl_ondevice.ondevice.convert import bake, build_tflite, cache_key
from fl_ondevice.ondevice.device import OnDeviceModel
from fl_ondevice.ondevice.layouts import (
    INFER,
    INITIALIZE,
    LOAD,
    OWN_PERSONALIZATION_SIGNATURES,
    RESTORE,
    SAVE,
    TRAIN,
)
from fl_ondevice.ondevice.transfer import (
    HEAD,
    bottleneck,
    head_init,
    pretrain,
    pretrained_base,
    random_base,
)

CLIENTS = DatasetConfig(classes=[5, 6, 7, 8, 9])
BASE = DatasetConfig(classes=[0, 1, 2, 3, 4])
# Two pretraining epochs: enough for the base to beat a random one, and quick.
HEAD_CFG = ModelConfig(name="transfer", learning_rate=0.1, pretrain_epochs=2)
ALL_CFG = replace(HEAD_CFG, trainable="all")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("transfer-cache")


@pytest.fixture(scope="module")
def head_file(cache):
    return build_tflite(HEAD_CFG, (8, 8), 5, 0, cache, CLIENTS)


@pytest.fixture
def lite(head_file):
    return Interpreter(model_path=str(head_file))  # LiteRT, as the clients run it


def _images(n: int, seed: int = 0) -> np.ndarray:
    return load_dataset(CLIENTS).x_train[np.random.default_rng(seed).permutation(716)[:n]]


def _train_some(lite: Interpreter, steps: int = 5) -> None:
    data = load_dataset(CLIENTS)
    load, train = lite.get_signature_runner(LOAD), lite.get_signature_runner(TRAIN)
    for k in range(steps):
        x, y = data.x_train[16 * k : 16 * k + 16], data.y_train[16 * k : 16 * k + 16]
        features = load(feature=x)["bottleneck"]
        train(bottleneck=features, label=np.eye(5, dtype=np.float32)[y])


def _save(lite: Interpreter) -> dict[str, np.ndarray]:
    return {n: np.array(t) for n, t in lite.get_signature_runner(SAVE)().items()}


# -- dataset.classes -------------------------------------------------------------------------------
def test_dataset_classes_keep_those_classes_relabelled_in_listed_order():
    # load_digits holds 179 sevens, 177 twos and 180 nines; the 80/20 split keeps them all.
    full = load_dataset(DatasetConfig())
    picked = load_dataset(DatasetConfig(classes=[7, 2, 9]))

    counts = np.bincount(np.concatenate([picked.y_train, picked.y_test]))

    assert picked.num_classes == 3 and counts.tolist() == [179, 177, 180]
    _, raw_labels = load_digits(return_X_y=True)
    assert [int(np.sum(raw_labels == c)) for c in (7, 2, 9)] == [179, 177, 180]
    # New label 1 is old label 2: the same images, in the same order.
    np.testing.assert_array_equal(
        picked.x_train[picked.y_train == 1], full.x_train[full.y_train == 2]
    )
    np.testing.assert_array_equal(picked.x_test[picked.y_test == 0], full.x_test[full.y_test == 7])


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([3, 3], "list each class once"),
        ([3, 10], r"0\.\.9"),
        ([4], "at least 2"),
        ([-1, 2], ">= 0"),
    ],
)
def test_bad_dataset_classes_are_refused_naming_the_key(classes, message):
    with pytest.raises(ConfigError, match=f"dataset.classes=.*{message}"):
        DatasetConfig(classes=classes)


def test_transfer_classes_overlapping_the_base_classes_are_refused_with_the_reason():
    with pytest.raises(
        ConfigError, match=r"classes \[4\] are also in model.base_classes.*not have"
    ):
        parse_config(
            {"model": {"name": "transfer"}, "dataset": {"classes": [4, 5, 6]}, "output_dir": "o"}
        )
    with pytest.raises(ConfigError, match="model=transfer needs the clients' classes"):
        Config(model=ModelConfig(name="transfer"))


def test_transfer_head_refuses_an_optimizer_with_state():
    with pytest.raises(ConfigError, match="model.optimizer=.*trainable=all"):
        ModelConfig(name="transfer", optimizer="adam")


# -- the pretrained base ---------------------------------------------------------------------------
def test_pretraining_twice_with_one_seed_gives_the_same_bytes():
    data = load_dataset(BASE)

    first, acc1 = pretrain(data, 1, 0.05, seed=3)
    again, acc2 = pretrain(data, 1, 0.05, seed=3)

    assert acc1 == acc2
    assert all(first[n].tobytes() == again[n].tobytes() for n in first)


def _probe_accuracy(base: dict[str, np.ndarray]) -> float:
    # A linear classifier on the base's frozen features, on the base classes' test split.
    data = load_dataset(BASE)
    weights = [tf.constant(base[n]) for n in sorted(base, key=list(random_base((8, 8), 0)).index)]
    train = bottleneck(weights, tf.constant(data.x_train)).numpy()
    test = bottleneck(weights, tf.constant(data.x_test)).numpy()
    probe = LogisticRegression(max_iter=2000).fit(train, data.y_train)
    return float(probe.score(test, data.y_test))


def test_the_pretrained_base_beats_a_random_base_on_the_base_classes(cache, head_file):
    pretrained = pretrained_base(HEAD_CFG, CLIENTS, 0, cache)  # cached by head_file
    random = pretrained_base(replace(HEAD_CFG, pretrained=False), CLIENTS, 0, cache)

    ours, theirs = _probe_accuracy(pretrained.weights), _probe_accuracy(random.weights)

    assert pretrained.report["accuracy"] >= 0.9  # the temporary head's, after 2 epochs
    assert ours > theirs + 0.02, (ours, theirs)
    assert head_file.with_suffix(".json").is_file()  # the report beside the cached file


def test_the_cache_key_follows_the_data_the_base_learns_from():
    key = cache_key(HEAD_CFG, (8, 8), 5, 0, CLIENTS)

    assert key != cache_key(HEAD_CFG, (8, 8), 5, 0, replace(CLIENTS, test_fraction=0.3))
    assert key != cache_key(replace(HEAD_CFG, base_classes=[0, 1, 2]), (8, 8), 5, 0, CLIENTS)
    assert key != cache_key(replace(HEAD_CFG, pretrain_epochs=3), (8, 8), 5, 0, CLIENTS)


# -- the personalization layout --------------------------------------------------------------------
def test_the_file_has_the_model_personalization_signatures(lite):
    signatures = lite.get_signature_list()

    assert sorted(signatures) == sorted(OWN_PERSONALIZATION_SIGNATURES)
    assert signatures[TRAIN]["inputs"] == ["bottleneck", "label"]
    assert signatures[LOAD]["outputs"] == ["bottleneck"]
    assert signatures[INFER]["outputs"] == ["output"]
    assert signatures[SAVE] == {"inputs": [], "outputs": sorted(HEAD)}
    assert signatures[RESTORE]["inputs"] == sorted(HEAD)


def test_training_changes_the_head_and_never_the_base(lite, tmp_path):
    x = _images(20)
    before = lite.get_signature_runner(LOAD)(feature=x)["bottleneck"].copy()
    head_before = _save(lite)

    _train_some(lite)

    after = lite.get_signature_runner(LOAD)(feature=x)["bottleneck"]
    head_after = _save(lite)
    assert after.tobytes() == before.tobytes()
    assert sorted(head_after) == sorted(HEAD)
    assert all(np.abs(head_after[n] - head_before[n]).max() > 1e-4 for n in HEAD)


def test_save_then_restore_round_trips_bitwise(lite):
    _train_some(lite, 2)
    trained = _save(lite)
    other = head_init(5, seed=9)
    lite.get_signature_runner(RESTORE)(**other)
    assert all(_save(lite)[n].tobytes() == other[n].tobytes() for n in HEAD)

    lite.get_signature_runner(RESTORE)(**trained)

    back = _save(lite)
    assert all(back[n].tobytes() == trained[n].tobytes() for n in HEAD)


def test_infer_is_the_softmax_of_the_head_on_the_bottleneck(lite):
    _train_some(lite, 3)
    x = _images(12, seed=1)
    head = _save(lite)

    probs = lite.get_signature_runner(INFER)(feature=x)["output"]

    logits = lite.get_signature_runner(LOAD)(feature=x)["bottleneck"] @ head["output/kernel"]
    logits = logits + head["output/bias"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_initialize_sets_the_seeded_head(lite):
    _train_some(lite, 2)

    out = lite.get_signature_runner(INITIALIZE)()

    start = head_init(5, seed=0)
    assert all(out[n].tobytes() == start[n].tobytes() for n in HEAD)


def test_bake_keeps_the_base_and_starts_from_the_trained_head(cache, lite):
    _train_some(lite, 3)
    trained = _save(lite)
    base = pretrained_base(HEAD_CFG, CLIENTS, 0, cache).weights
    x = _images(8)

    baked = Interpreter(model_content=bake(HEAD_CFG, (8, 8), 5, trained, base=base))

    assert all(_save(baked)[n].tobytes() == trained[n].tobytes() for n in HEAD)
    np.testing.assert_array_equal(
        baked.get_signature_runner(INFER)(feature=x)["output"],
        lite.get_signature_runner(INFER)(feature=x)["output"],
    )
    start = baked.get_signature_runner(INITIALIZE)()
    assert start["output/kernel"].tobytes() == head_init(5, 0)["output/kernel"].tobytes()


# -- trainable=all ---------------------------------------------------------------------------------
def test_trainable_all_is_the_guide_layout_starting_from_the_pretrained_base(cache, head_file):
    device = OnDeviceModel(build_tflite(ALL_CFG, (8, 8), 5, 0, cache, CLIENTS))

    weights = device.get_weights()

    base = pretrained_base(ALL_CFG, CLIENTS, 0, cache).weights  # the one head_file used
    assert sorted(weights) == sorted([*base, *HEAD])
    assert all(weights[n].tobytes() == base[n].tobytes() for n in base)
    assert all(weights[n].tobytes() == head_init(5, 0)[n].tobytes() for n in HEAD)
    assert {"train", "infer", "save", "restore", "reset"} <= set(device.signatures)


def test_the_head_file_opens_as_the_personalization_layout_and_learns(head_file):
    device = OnDeviceModel(head_file)
    data = load_dataset(CLIENTS)
    start = device.initial_weights()
    before = device.evaluate(data.x_test, data.y_test)["accuracy"]

    device.fit(device.load(data.x_train), data.y_train, epochs=5, batch_size=32)

    assert device.layout.name == "personalization"
    assert (device.x_shape, device.train_x_shape, device.num_classes) == ((8, 8), (64,), 5)
    assert all(start[n].tobytes() == head_init(5, 0)[n].tobytes() for n in HEAD)
    assert device.evaluate(data.x_test, data.y_test)["accuracy"] > before + 0.2
