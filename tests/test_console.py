"""Tests of fl_ondevice.console: native stderr goes to the log file, its errors to the console."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_ondevice.console import native_stderr_to_log


@pytest.fixture
def log_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The root logger's one file handler, as Hydra installs for simulate.log (pytest's own
    handlers set aside meanwhile)."""
    path = tmp_path / "simulate.log"
    handler = logging.FileHandler(path)
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    yield path
    handler.close()


def test_native_lines_go_to_the_log_and_native_errors_also_to_the_console(
    log_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Prepare: what C++ code writes to fd 2, in absl's format
    chatter = b"I0000 00:00:1.0  1 port.cc:153] oneDNN custom operations are on.\n"
    error = b"E0000 00:00:1.0  1 loader.cc:7] could not open model.pb\n"

    # Execute
    with native_stderr_to_log():
        os.write(2, chatter + error)
    os.write(2, b"after the block\n")

    # Assert
    console = capfd.readouterr().err
    assert console == error.decode() + "after the block\n"
    assert log_path.read_bytes() == chatter + error


def test_without_a_log_file_nothing_is_redirected(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no file handler (a library user's own logging, or none)
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler()])

    # Execute
    with native_stderr_to_log():
        os.write(2, b"I0000 shown\n")

    # Assert
    assert capfd.readouterr().err == "I0000 shown\n"


# A fresh process that imports TensorFlow inside the block, as a run does at its end.
IMPORT_CHILD = """
import logging, sys
logging.getLogger().addHandler(logging.FileHandler(sys.argv[1]))
from fl_ondevice.console import native_stderr_to_log
with native_stderr_to_log():
    import tensorflow
"""


def test_tensorflow_start_up_lines_go_to_the_log_file(tmp_path: Path) -> None:
    # Prepare
    log = tmp_path / "simulate.log"

    # Execute
    child = subprocess.run(
        [sys.executable, "-c", IMPORT_CHILD, str(log)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Assert: a quiet console; whatever TF printed (oneDNN, absl lines) is in the log
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stderr == ""
    assert "absl::InitializeLog" in log.read_text() or log.read_text() == ""
