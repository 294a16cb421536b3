"""Downloading (Fashion-)MNIST into the Keras cache, checked by SHA-256, without TensorFlow."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from fl_ondevice.errors import DataError

log = logging.getLogger(__name__)

# Where keras.datasets caches each dataset, relative to the Keras cache (`$KERAS_HOME/datasets`).
KERAS_SUBDIRS = {"fashion_mnist": "fashion-mnist", "mnist": ""}
KERAS_MNIST_NPZ = "mnist.npz"
# Where keras.datasets.{mnist,fashion_mnist}.load_data() download from; a mirror serving the same
# files (or a local server in tests) replaces it through the environment variable below.
KERAS_DATASETS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
DATASET_URL_ENV = "FL_ONDEVICE_DATASET_URL"
# sha256 of each file a download fetches. mnist.npz: the hash keras.datasets.mnist checks.
# Fashion-MNIST: keras checks none; these are the hashes TensorFlow Datasets pins for Zalando's
# original files (url_checksums/fashion_mnist.txt), which keras' copies match in name and size
# (26421880, 29515, 4422102 and 5148 bytes).
DOWNLOAD_SHA256: Mapping[str, Mapping[str, str]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
        ),
        "train-labels-idx1-ubyte.gz": (
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
        ),
    },
    "mnist": {
        KERAS_MNIST_NPZ: "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    },
}
# Seconds a connection attempt or one read may stall (not a limit on the whole file).
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20  # 1 MiB: the download is streamed, never held whole in memory
HOW_TO_GET = {
    "fashion_mnist": (
        "install Debian's package (`apt-get install dataset-fashion-mnist`, files land in "
        "/usr/share/datasets/fashion-mnist/), or put the four IDX .gz files in a directory and "
        "pass dataset.data_dir=PATH"
    ),
    "mnist": (
        "put the four IDX .gz files (train-images-idx3-ubyte.gz, ...) or keras' mnist.npz in a "
        "directory and pass dataset.data_dir=PATH"
    ),
}


def keras_cache_dir() -> Path:
    """Directory where keras.datasets keeps its downloads (``$KERAS_HOME/datasets``)."""
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(home) / "datasets"


def download_files(
    name: str, *, base_url: str | None = None, sha256: Mapping[str, str] | None = None
) -> Path:
    """Download the files of ``name`` into the Keras cache, verify their sha256, and return the
    directory they are in (see :func:`fl_ondevice.data.idx.fetch_dataset`, which reads them).

    A file already there with the expected sha256 is not fetched again. Plain ``urllib``:
    importing TensorFlow (~500 MiB) is what a client node must avoid. Each file is written under
    a temporary name beside its target and renamed only once its sha256 matches, so a failed or
    corrupt download leaves no file behind and processes downloading at the same time never read
    a half-written one. ``base_url`` and ``sha256`` as ``fetch_dataset`` takes them.

    Raises
    ------
    DataError
        An unknown ``name``, or a file could not be fetched or written (HTTP error, network
        failure, sha256 mismatch, unwritable cache): the message names the URL, the cause and
        how to get the dataset offline.
    """
    if name not in DOWNLOAD_SHA256:
        raise DataError(
            f"cannot download dataset {name!r}: choose one of {sorted(DOWNLOAD_SHA256)}"
        )
    expected = DOWNLOAD_SHA256[name] if sha256 is None else sha256
    if set(expected) != set(DOWNLOAD_SHA256[name]):
        raise DataError(
            f"sha256 table for {name} names {sorted(expected)}; it must name exactly the files "
            f"{sorted(DOWNLOAD_SHA256[name])}"
        )
    base = base_url or os.environ.get(DATASET_URL_ENV) or KERAS_DATASETS_URL
    directory = keras_cache_dir() / KERAS_SUBDIRS[name]
    for file_name, file_sha256 in expected.items():
        _download_file(name, f"{base.rstrip('/')}/{file_name}", directory / file_name, file_sha256)
    return directory


def _download_file(name: str, url: str, target: Path, sha256: str) -> None:
    if target.is_file() and _sha256_of(target) == sha256:
        log.info("%s already downloaded (sha256 matches)", target)
        return
    log.info("downloading %s to %s", url, target)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Beside the target, so that the final rename stays on one file system and is atomic.
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        tmp = Path(tmp_name)
        found = _stream_into(url, fd)
        if found == sha256:
            os.replace(tmp, target)
            return
        reason = (
            f"the file's sha256 is {found}, expected {sha256}: the transfer was corrupted or the "
            f"server holds another file under this name (a mirror in {DATASET_URL_ENV} must "
            "serve the original files)"
        )
    # URLError/HTTPError and socket timeouts are OSErrors, IncompleteRead is an HTTPException,
    # a malformed URL (e.g. in the environment variable) is a ValueError.
    except (OSError, http.client.HTTPException, ValueError) as err:
        reason = f"{type(err).__name__}: {err}"
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # gone already after a successful rename
    raise DataError(
        f"cannot download {url} to {target}: {reason}. The file was not written. "
        f"To get {name} offline: {HOW_TO_GET[name]}."
    )


def _stream_into(url: str, fd: int) -> str:
    """Write the body of ``url`` to the open file ``fd`` (closing it); return its sha256 (hex)."""
    digest = hashlib.sha256()
    with (
        os.fdopen(fd, "wb") as out,
        urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
    ):
        while chunk := response.read(_CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
