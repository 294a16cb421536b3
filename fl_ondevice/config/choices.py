"""The values a config key may take, and the checks every config dataclass runs."""

from __future__ import annotations

from typing import Any

from fl_ondevice.errors import ConfigError

DATASETS = ("digits", "fashion_mnist", "mnist", "femnist", "cifar10", "files")
PARTITIONERS = ("iid", "dirichlet", "shards", "label_quantity")
MODELS = ("mlp", "2nn", "cnn", "simple_cnn", "tflite", "transfer")
# Classes and image shape (H, W), or (H, W, C) for colour, per dataset, to check class lists and
# export a model before any data is loaded; a files dataset's come from its file. FEMNIST: 10
# digits + 26 + 26 letters.
DATASET_CLASSES = {"digits": 10, "fashion_mnist": 10, "mnist": 10, "femnist": 62, "cifar10": 10}
DATASET_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (8, 8),
    "fashion_mnist": (28, 28),
    "mnist": (28, 28),
    "femnist": (28, 28),
    "cifar10": (32, 32, 3),
}
# What a client uploads (client.update_encoding; fl_ondevice.wire.encoding encodes and decodes).
FLOAT32, FLOAT16, INT8 = "float32", "float16", "int8"
ENCODINGS = (FLOAT32, FLOAT16, INT8)
TRAINABLE = ("head", "all")
OPTIMIZERS = ("sgd", "adam")
ATTACKS = ("none", "sign_flip", "scale")
# How a DP run's clients are assumed drawn, for its epsilon (dp.sampling; config.groups.DpConfig).
WITHOUT_REPLACEMENT, POISSON, NO_AMPLIFICATION = (
    "without_replacement",
    "poisson",
    "no_amplification",
)
DP_SAMPLING = (WITHOUT_REPLACEMENT, POISSON, NO_AMPLIFICATION)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError`` naming ``key``, its ``value`` and what is ``allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def check_classes(key: str, classes: list[int], num_classes: int | None) -> None:
    """Check a class list: at least 2 distinct labels >= 0, below ``num_classes`` if given."""
    require(len(classes) >= 2, key, classes, "list at least 2 classes")
    require(len(set(classes)) == len(classes), key, classes, "list each class once")
    require(min(classes) >= 0, key, classes, "classes are label numbers >= 0")
    if num_classes is not None:
        require(
            max(classes) < num_classes,
            key,
            classes,
            f"the dataset's classes are 0..{num_classes - 1}",
        )
