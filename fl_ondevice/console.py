"""What reaches the console: fl_ondevice's own lines; the libraries' chatter goes to the log file.

``python -m fl_ondevice.simulate`` shows the data, the partition summary, one line per round,
warnings that ask the user to act and the final line. Flower's, Ray's, alembic's and Python's
warnings, and the TF/TFLite C++ runtime's direct writes to stderr (TensorFlow's start-up lines
among them), go to ``simulate.log`` (Hydra's file handler) only; errors from anywhere still reach
the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator

# Loggers whose INFO lines a user reads on the console; any other logger's only from ERROR on.
CONSOLE_LOGGERS = ("fl_ondevice", "__main__", "hydra")


class ConsoleFilter(logging.Filter):
    """Pass our own records, and other libraries' errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in CONSOLE_LOGGERS
        return ours or record.levelno >= logging.ERROR


class ClientCrashEcho(logging.Filter):
    """Drop the engine's stack dump of a client crash: the strategy logs it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ClientAppException" not in f"{type(record.msg).__name__} {record.msg}"


def quiet_console() -> None:
    """Route every library's log records through the root logger's handlers (Hydra's console and
    file), and keep the console's to ours and errors. For the command line: a library user's own
    logging setup is left alone."""
    import flwr.common.logger  # noqa: F401 - installs Flower's console handler, replaced here
    import ray  # noqa: F401 - installs Ray's handler, replaced here

    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) and not any(
            isinstance(f, ConsoleFilter) for f in handler.filters
        ):
            handler.addFilter(ConsoleFilter())
    for name in ("flwr", "ray"):
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    logging.captureWarnings(True)
    quiet_libraries()


def quiet_libraries() -> None:
    """Flower at WARNING (its INFO lines are one per message), its client crash dumps dropped;
    alembic (imported by Flower) at WARNING."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    if flwr_log.handlers:  # Flower's own console handler: do not print its records twice
        flwr_log.propagate = False
    if not any(isinstance(f, ClientCrashEcho) for f in flwr_log.filters):
        flwr_log.addFilter(ClientCrashEcho())
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


LINE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's, ours


def ours_to_stderr() -> None:
    """In a process nobody set logging up for (the ServerApp that Flower's SuperLink starts),
    write fl_ondevice's INFO lines to stderr, which Flower streams to ``flwr log`` (and
    ``fl_ondevice.deploy`` shows)."""
    ours = logging.getLogger("fl_ondevice")
    if logging.getLogger().handlers or ours.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def log_file() -> str | None:
    """The file the root logger writes to (Hydra's ``simulate.log``), if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


# The error and fatal lines of absl/glog-style logs (TF and LiteRT's C++ runtime): "E0512 ...".
NATIVE_ERROR = re.compile(r"^[EF]\d{4} ")


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Send what C++ code writes to this process's stderr (TensorFlow's start-up lines when it
    is imported, the TFLite runtime's "Created TensorFlow Lite delegate" lines, the converter's
    absl warnings) to the log file meanwhile; its error lines are shown on the console too, after
    the block.

    Only while importing TensorFlow, converting models and opening interpreters: a Python
    traceback is raised after the block, and prints to the console as usual.
    """
    path = log_file()
    if path is None:
        yield
        return
    sys.stderr.flush()
    start = os.path.getsize(path) if os.path.exists(path) else 0  # where the block's lines begin
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        _echo_native_errors(path, start)


def _echo_native_errors(path: str, start: int) -> None:
    # The log's lines since `start` hold the block's stderr and our own records (which the
    # console shows already); copy the native error lines to the console.
    try:
        with open(path, "rb") as log:
            log.seek(start)
            lines = log.read().decode("utf-8", "replace").splitlines()
    except OSError:  # the log file went away meanwhile: nothing to copy
        return
    errors = [line for line in lines if NATIVE_ERROR.match(line)]
    if errors:
        sys.stderr.write("".join(f"{line}\n" for line in errors))
        sys.stderr.flush()
