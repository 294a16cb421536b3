"""Exceptions that tell the user what was wrong and what to do about it."""


class FlOnDeviceError(Exception):
    """Base class of every error fl_ondevice raises on purpose."""


class ConfigError(FlOnDeviceError, ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


class DataError(FlOnDeviceError):
    """A dataset cannot be found or read, or a partition request is impossible."""


class ModelError(FlOnDeviceError):
    """A .tflite model is unusable: missing signatures, unexpected inputs, bad conversion."""


class CheckpointError(FlOnDeviceError):
    """A checkpoint file is corrupt or does not match the model's weights."""


class InputError(FlOnDeviceError, ValueError):
    """Arrays passed to a model have the wrong shape, dtype or label range."""


class TrainingError(FlOnDeviceError):
    """Training produced a non-finite loss or the interpreter failed while training."""


class RuntimeUnsupportedError(FlOnDeviceError):
    """The installed TensorFlow cannot run the model (e.g. its interpreter lacks Flex ops)."""


class ResumeError(FlOnDeviceError):
    """A run directory cannot be resumed (no completed round, or its files disagree)."""


class EngineError(FlOnDeviceError):
    """The simulation engine (Flower's, on Ray) stopped during a run; its log has the cause."""
