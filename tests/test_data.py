"""Tests of fl_ondevice.data's sources: IDX reader, lookup, download, offline errors, digits."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fl_ondevice.config import DatasetConfig
from fl_ondevice.data import datasets, download, idx
from fl_ondevice.data.dataset import Dataset, select_classes, unit_float32
from fl_ondevice.data.datasets import load_dataset
from fl_ondevice.data.digits import digits_cache_file
from fl_ondevice.data.idx import read_idx
from fl_ondevice.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, gz: bool, magic: bytes | None = None) -> Path:
    """Write ``array`` as an IDX file, built by hand from the format's definition."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = magic if magic is not None else bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + big_endian.tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_idx_dataset(
    directory: Path, n_train: int = 12, n_test: int = 5, size: int = 4, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write the four gzip'd IDX files of a tiny 10-class image dataset; return the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays["x_train"][0, 0, 0] = 255  # the maximum must map to exactly 1.0
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in idx.IDX_FILES.items():
        write_idx(directory / f"{stem}.gz", arrays[key], gz=True)
    return arrays


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point the system dirs and the Keras cache at empty tmp dirs; forget cached datasets."""
    monkeypatch.setattr(
        idx,
        "SYSTEM_DIRS",
        {"fashion_mnist": tmp_path / "system-fashion", "mnist": tmp_path / "system-mnist"},
    )
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    datasets.clear_cache()
    yield
    datasets.clear_cache()


# ---------------------------------------------------------------------------------------------
# IDX reader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_read_idx_returns_declared_shape_and_values(tmp_path: Path, gz: bool) -> None:
    # Prepare
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, -3, 100000], dtype=np.int32)  # multi-byte: checks the byte order
    write_idx(tmp_path / "images", images, gz=gz)
    write_idx(tmp_path / "labels", labels, gz=gz)

    # Execute
    read_images = read_idx(tmp_path / "images")
    read_labels = read_idx(tmp_path / "labels")

    # Assert
    assert read_images.shape == (2, 3, 4) and read_images.dtype == np.uint8
    np.testing.assert_array_equal(read_images, images)
    assert read_labels.dtype.isnative
    np.testing.assert_array_equal(read_labels, labels)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_read_idx_rejects_truncated_file_naming_it(tmp_path: Path, gz: bool) -> None:
    # Prepare
    full = tmp_path / "full"
    write_idx(full, np.zeros((10, 28, 28), np.uint8), gz=False)
    cut = full.read_bytes()[:-100]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(cut) if gz else cut)

    # Execute / Assert
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "truncated" in message and "7840 data bytes" in message and "7740" in message


def test_read_idx_rejects_file_cut_inside_its_header(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "labels"
    write_idx(path, np.zeros((5,), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:6])

    # Execute / Assert
    with pytest.raises(DataError, match="truncated.*header"):
        read_idx(path)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_read_idx_rejects_wrong_magic_naming_it(tmp_path: Path, gz: bool) -> None:
    # Prepare: a PNG-like header instead of 0x0000TTDD
    path = write_idx(
        tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), gz=gz, magic=b"\x89PNG"
    )

    # Execute / Assert
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "not an IDX file" in message and "wrong magic number 0x89504e47" in message


def test_read_idx_rejects_unknown_type_code(tmp_path: Path) -> None:
    # Prepare: type byte 0x07 is not defined by the format
    path = write_idx(tmp_path / "x", np.zeros(3, np.uint8), gz=False, magic=b"\x00\x00\x07\x01")

    # Execute / Assert
    with pytest.raises(DataError, match="wrong magic number 0x00000701"):
        read_idx(path)


def test_read_idx_rejects_trailing_bytes(tmp_path: Path) -> None:
    # Prepare
    path = write_idx(tmp_path / "x", np.zeros(4, np.uint8), gz=False)
    path.write_bytes(path.read_bytes() + b"\x00\x00")

    # Execute / Assert
    with pytest.raises(DataError, match="longer than its header says"):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip_naming_it(tmp_path: Path) -> None:
    # Prepare: a gzip stream cut in the middle
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(range(256)) * 40)[:50])

    # Execute / Assert
    with pytest.raises(DataError, match=f"cannot read IDX file {path}"):
        read_idx(path)


# ---------------------------------------------------------------------------------------------
# Lookup of fashion_mnist / mnist
# ---------------------------------------------------------------------------------------------


def test_load_dataset_reads_idx_files_from_data_dir_scaled_to_unit_float32(tmp_path: Path) -> None:
    # Prepare
    raw = write_idx_dataset(tmp_path / "mine")
    cfg = DatasetConfig(name="fashion_mnist", data_dir=str(tmp_path / "mine"), download=False)

    # Execute
    dataset = load_dataset(cfg)

    # Assert
    assert isinstance(dataset, Dataset)
    assert dataset.x_train.shape == (12, 4, 4) and dataset.x_test.shape == (5, 4, 4)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int64
    assert dataset.input_shape == (4, 4) and dataset.num_classes == 10
    np.testing.assert_array_equal(dataset.x_train * 255.0, raw["x_train"].astype(np.float32))
    assert dataset.x_train[0, 0, 0] == 1.0
    assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() <= 1.0
    np.testing.assert_array_equal(dataset.y_test, raw["y_test"])
    assert not dataset.x_train.flags.writeable  # shared by all clients of a process


def test_idx_images_stay_uint8_and_the_rows_asked_for_convert_to_unit_float32(
    tmp_path: Path,
) -> None:
    # Prepare
    raw = write_idx_dataset(tmp_path / "mine", n_train=12, n_test=5)
    cfg = DatasetConfig(name="fashion_mnist", data_dir=str(tmp_path / "mine"), download=False)
    rows = np.array([7, 0, 3])  # a client's partition: any rows, in any order

    # Execute
    dataset = load_dataset(cfg)
    part = dataset.train_x(rows)

    # Assert: one byte per pixel kept; a pixel p becomes p / 255 rounded once to float32
    # (float64 division then rounding gives the same 256 values), the same bits whether a
    # client's rows or the whole split are converted
    assert dataset.train_images.dtype == np.uint8 and dataset.train_images.nbytes == 12 * 4 * 4
    np.testing.assert_array_equal(dataset.train_images, raw["x_train"])
    assert not dataset.train_images.flags.writeable and not dataset.test_images.flags.writeable
    expected = (raw["x_train"][rows].astype(np.float64) / 255.0).astype(np.float32)
    assert part.dtype == np.float32 and part.shape == (3, 4, 4)
    assert part.tobytes() == expected.tobytes()
    assert part.tobytes() == dataset.x_train[rows].tobytes()
    assert dataset.x_train[0, 0, 0] == 1.0  # pixel 255
    test = (raw["x_test"].astype(np.float64) / 255.0).astype(np.float32)
    assert dataset.test_x().tobytes() == test.tobytes() == dataset.x_test.tobytes()
    assert dataset.test_x(slice(1, 3)).tobytes() == test[1:3].tobytes()


def test_unit_float32_maps_every_pixel_value_to_its_nearest_float32_of_p_over_255() -> None:
    # Prepare
    pixels = np.arange(256, dtype=np.uint8)

    # Execute
    scaled = unit_float32(pixels)

    # Assert
    expected = np.array([np.float32(p / 255.0) for p in range(256)], dtype=np.float32)
    assert scaled.tobytes() == expected.tobytes()
    assert scaled[255] == 1.0 and scaled[0] == 0.0
    floats = np.array([0.5, 1.0], np.float32)
    assert unit_float32(floats) is floats  # digits: already in [0, 1]
    with pytest.raises(DataError, match=r"images are int32; expected uint8 0\.\.255 or float32"):
        unit_float32(np.zeros(3, np.int32))


def test_whole_split_float32_is_converted_once_read_only(tmp_path: Path) -> None:
    # Prepare
    write_idx_dataset(tmp_path / "mine")
    dataset = load_dataset(DatasetConfig(name="mnist", data_dir=str(tmp_path / "mine")))

    # Execute
    first, again = dataset.x_train, dataset.x_train

    # Assert
    assert first is again
    assert not first.flags.writeable  # shared by all clients of a process
    assert dataset.train_x(np.array([0])).flags.writeable  # a caller's own copy


def test_select_classes_keeps_images_as_stored(tmp_path: Path) -> None:
    # Prepare
    raw = write_idx_dataset(tmp_path / "mine", n_train=20)
    full = load_dataset(DatasetConfig(name="mnist", data_dir=str(tmp_path / "mine")))

    # Execute
    picked = select_classes(full, (3, 1))

    # Assert: class 3 becomes 0, class 1 becomes 1; the images stay uint8
    assert picked.train_images.dtype == np.uint8
    np.testing.assert_array_equal(picked.train_images[picked.y_train == 0], raw["x_train"][[3, 13]])
    np.testing.assert_array_equal(picked.train_images[picked.y_train == 1], raw["x_train"][[1, 11]])


def test_load_dataset_prefers_data_dir_then_system_dir_then_keras_cache(tmp_path: Path) -> None:
    # Prepare: three complete copies of different sizes, so the one read is identifiable
    write_idx_dataset(tmp_path / "mine", n_train=11)
    write_idx_dataset(idx.SYSTEM_DIRS["fashion_mnist"], n_train=12)
    write_idx_dataset(download.keras_cache_dir() / "fashion-mnist", n_train=13)
    with_dir = DatasetConfig(name="fashion_mnist", data_dir=str(tmp_path / "mine"), download=False)
    without_dir = DatasetConfig(name="fashion_mnist", download=False)

    # Execute
    from_data_dir = len(load_dataset(with_dir).y_train)
    from_system = len(load_dataset(without_dir).y_train)
    for stem in idx.IDX_FILES.values():
        (idx.SYSTEM_DIRS["fashion_mnist"] / f"{stem}.gz").unlink()
    datasets.clear_cache()
    from_keras = len(load_dataset(without_dir).y_train)

    # Assert
    assert (from_data_dir, from_system, from_keras) == (11, 12, 13)


def test_load_dataset_accepts_uncompressed_idx_files(tmp_path: Path) -> None:
    # Prepare: the four files gunzip'd, without the .gz suffix
    raw = write_idx_dataset(tmp_path / "gz")
    for stem in idx.IDX_FILES.values():
        plain = gzip.decompress((tmp_path / "gz" / f"{stem}.gz").read_bytes())
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "plain" / stem).write_bytes(plain)

    # Execute
    dataset = load_dataset(DatasetConfig(name="mnist", data_dir=str(tmp_path / "plain")))

    # Assert
    np.testing.assert_array_equal(dataset.y_train, raw["y_train"])


def test_mnist_is_read_from_keras_npz(tmp_path: Path) -> None:
    # Prepare: keras.datasets.mnist stores mnist.npz directly in the Keras cache
    rng = np.random.default_rng(1)
    cache = download.keras_cache_dir()
    cache.mkdir(parents=True)
    np.savez(
        cache / "mnist.npz",
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=np.arange(20, dtype=np.uint8) % 10,
        x_test=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        y_test=np.arange(6, dtype=np.uint8) % 10,
    )

    # Execute
    dataset = load_dataset(DatasetConfig(name="mnist", download=False))

    # Assert
    assert dataset.name == "mnist"
    assert dataset.x_train.shape == (20, 28, 28) and dataset.y_test.shape == (6,)
    assert dataset.x_train.dtype == np.float32 and dataset.x_train.max() <= 1.0


def test_offline_error_lists_every_place_looked_and_how_to_get_fashion_mnist(
    tmp_path: Path,
) -> None:
    # Prepare
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = DatasetConfig(name="fashion_mnist", data_dir=str(empty), download=False)

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(cfg)

    # Assert
    message = str(info.value)
    for place in (empty, idx.SYSTEM_DIRS["fashion_mnist"], download.keras_cache_dir()):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "dataset.data_dir=PATH" in message and "dataset.download=true" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_offline_error_for_mnist_mentions_keras_npz(tmp_path: Path) -> None:
    # Prepare
    cfg = DatasetConfig(name="mnist", download=False)

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(cfg)

    # Assert
    message = str(info.value)
    assert str(idx.SYSTEM_DIRS["mnist"]) in message
    assert str(download.keras_cache_dir() / "mnist.npz") in message


# ---------------------------------------------------------------------------------------------
# Download (from a real HTTP server on 127.0.0.1 serving files the test writes)
# ---------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory without writing a log line per request to stderr."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Server:
    """A local HTTP server: ``url`` serves the files of ``root``."""

    url: str
    root: Path

    def sha256(self) -> dict[str, str]:
        """sha256 (hex) of every served file, by name: the table that accepts these files."""
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in self.root.iterdir()}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """An HTTP server on 127.0.0.1 (free port) serving ``tmp_path/served`` until the test ends."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Server(f"http://127.0.0.1:{httpd.server_address[1]}/", root)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def write_mnist_npz(path: Path, n_train: int = 20, n_test: int = 6) -> dict[str, np.ndarray]:
    """Write an npz with keras' mnist.npz array names; return the arrays."""
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.uint8) % 10,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def test_fetch_fashion_mnist_downloads_the_idx_files_into_the_keras_cache_and_loads_them(
    server: Server,
) -> None:
    # Prepare
    raw = write_idx_dataset(server.root)

    # Execute
    dataset = idx.fetch_dataset("fashion_mnist", base_url=server.url, sha256=server.sha256())

    # Assert: keras' layout, byte-identical copies, values as written
    cache = download.keras_cache_dir() / "fashion-mnist"
    names = sorted(f"{stem}.gz" for stem in idx.IDX_FILES.values())
    assert [p.name for p in files_under(download.keras_cache_dir())] == names
    for name in names:
        assert (cache / name).read_bytes() == (server.root / name).read_bytes()
    for key in ("x_train", "x_test"):
        np.testing.assert_array_equal(getattr(dataset, key) * 255.0, raw[key].astype(np.float32))
    for key in ("y_train", "y_test"):
        np.testing.assert_array_equal(getattr(dataset, key), raw[key])
    # ... and the offline lookup finds the downloaded copy
    again = load_dataset(DatasetConfig(name="fashion_mnist", download=False))
    np.testing.assert_array_equal(again.y_train, raw["y_train"])


def test_fetch_mnist_downloads_keras_npz_into_the_keras_cache_and_loads_it(
    server: Server,
) -> None:
    # Prepare
    raw = write_mnist_npz(server.root / "mnist.npz")

    # Execute
    dataset = idx.fetch_dataset("mnist", base_url=server.url, sha256=server.sha256())

    # Assert
    assert files_under(download.keras_cache_dir()) == [download.keras_cache_dir() / "mnist.npz"]
    np.testing.assert_array_equal(dataset.x_test * 255.0, raw["x_test"].astype(np.float32))
    np.testing.assert_array_equal(dataset.y_train, raw["y_train"])


def test_fetch_skips_files_already_downloaded_with_the_expected_sha256(server: Server) -> None:
    # Prepare: a first fetch, then the server loses its files
    raw = write_idx_dataset(server.root)
    sha256 = server.sha256()
    idx.fetch_dataset("fashion_mnist", base_url=server.url, sha256=sha256)
    for path in server.root.iterdir():
        path.unlink()

    # Execute
    dataset = idx.fetch_dataset("fashion_mnist", base_url=server.url, sha256=sha256)

    # Assert
    np.testing.assert_array_equal(dataset.y_test, raw["y_test"])


@pytest.mark.parametrize(
    ("name", "first_file"),
    [("fashion_mnist", "train-images-idx3-ubyte.gz"), ("mnist", "mnist.npz")],
)
def test_download_rejects_a_file_whose_sha256_is_not_the_published_one_leaving_no_file(
    server: Server, monkeypatch: pytest.MonkeyPatch, name: str, first_file: str
) -> None:
    # Prepare: valid files of the right names, but not the published ones; URL from the env var
    write_idx_dataset(server.root)
    write_mnist_npz(server.root / "mnist.npz")
    monkeypatch.setenv("FL_ONDEVICE_DATASET_URL", server.url)
    served = hashlib.sha256((server.root / first_file).read_bytes()).hexdigest()

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name=name, download=True))

    # Assert
    message = str(info.value)
    assert f"cannot download {server.url}{first_file}" in message
    assert f"sha256 is {served}, expected {download.DOWNLOAD_SHA256[name][first_file]}" in message
    assert str(idx.SYSTEM_DIRS[name]) in message and str(download.keras_cache_dir()) in message
    assert download.HOW_TO_GET[name] in message
    assert files_under(download.keras_cache_dir()) == []


def test_download_from_a_server_without_the_files_names_the_url_and_the_http_error(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the server's directory is empty
    monkeypatch.setenv("FL_ONDEVICE_DATASET_URL", server.url)

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name="fashion_mnist", download=True))

    # Assert
    message = str(info.value)
    assert f"cannot download {server.url}train-images-idx3-ubyte.gz" in message
    assert "HTTPError: HTTP Error 404" in message
    assert str(idx.SYSTEM_DIRS["fashion_mnist"]) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert files_under(download.keras_cache_dir()) == []


def test_download_from_an_unreachable_server_names_the_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a port that was free a moment ago, so nothing listens on it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/datasets/"
    monkeypatch.setenv("FL_ONDEVICE_DATASET_URL", url)

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(name="mnist", download=True))

    # Assert
    message = str(info.value)
    assert f"cannot download {url}mnist.npz" in message
    assert "URLError" in message and "refused" in message
    assert str(download.keras_cache_dir() / "mnist.npz") in message  # among the places looked
    assert "dataset.data_dir=PATH" in message
    assert files_under(download.keras_cache_dir()) == []


def test_download_and_load_do_not_import_tensorflow(server: Server, tmp_path: Path) -> None:
    # Prepare: a fresh interpreter, since this test process has imported TensorFlow already
    raw = write_idx_dataset(server.root, n_train=7)
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from fl_ondevice.data import datasets, idx
        url, sha256, tmp = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
        idx.SYSTEM_DIRS = {"fashion_mnist": tmp / "none", "mnist": tmp / "none"}
        idx.fetch_dataset("fashion_mnist", base_url=url, sha256=sha256)
        datasets.clear_cache()
        from fl_ondevice.config import DatasetConfig
        dataset = datasets.load_dataset(DatasetConfig(name="fashion_mnist", download=False))
        print(json.dumps({
            "y_train": dataset.y_train.tolist(),
            "imported": sorted(m for m in ("tensorflow", "keras") if m in sys.modules),
        }))
        """
    )
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras-home-subprocess")}

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", script, server.url, json.dumps(server.sha256()), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["y_train"] == raw["y_train"].tolist()
    assert result["imported"] == []


def test_labels_out_of_range_are_rejected(tmp_path: Path) -> None:
    # Prepare
    write_idx_dataset(tmp_path / "bad")
    write_idx(
        tmp_path / "bad" / "t10k-labels-idx1-ubyte.gz",
        np.array([0, 1, 2, 3, 10], np.uint8),
        gz=True,
    )

    # Execute / Assert
    with pytest.raises(DataError, match="test labels .* span 0..10, expected 0..9"):
        load_dataset(DatasetConfig(name="fashion_mnist", data_dir=str(tmp_path / "bad")))


# ---------------------------------------------------------------------------------------------
# digits, caching, real Fashion-MNIST
# ---------------------------------------------------------------------------------------------


def test_digits_is_a_seeded_stratified_split_of_all_1797_images_scaled_by_16() -> None:
    # Prepare
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    cfg = DatasetConfig(name="digits", test_fraction=0.2)

    # Execute
    first = load_dataset(cfg, seed=0)
    again = load_dataset(cfg, seed=0)
    other = load_dataset(cfg, seed=1)

    # Assert: all images present once, each class' share in the test set equals its overall share
    assert len(first.y_train) + len(first.y_test) == 1797 and len(first.y_test) == 360
    assert first.input_shape == (8, 8) and first.x_train.dtype == np.float32
    assert first.x_train.max() == 1.0 and first.x_train.min() == 0.0
    merged = np.concatenate([first.x_train, first.x_test]).reshape(1797, 64) * 16.0
    np.testing.assert_array_equal(merged[np.lexsort(merged.T)], x_all[np.lexsort(x_all.T)])
    expected_test_per_class = np.bincount(y_all) * 360 / 1797
    assert np.all(np.abs(np.bincount(first.y_test) - expected_test_per_class) <= 1)
    assert again is first
    assert not np.array_equal(first.y_test, other.y_test)


# A fresh process (a deployed node's ClientApp, one per message): digits from the cache file,
# printed as the sha256 of its arrays, and whether scikit-learn was imported.
DIGITS_CHILD = """
import hashlib, json, sys
from fl_ondevice.config import DatasetConfig
from fl_ondevice.data.datasets import load_dataset
d = load_dataset(DatasetConfig(name="digits", test_fraction=0.2), seed=3, cache_dir=sys.argv[1])
arrays = (d.train_images, d.y_train, d.test_images, d.y_test)
digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
print(json.dumps(dict(sha256=digest, sklearn="sklearn" in sys.modules)))
"""


def _digest(dataset: Dataset) -> str:
    arrays = (dataset.train_images, dataset.y_train, dataset.test_images, dataset.y_test)
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()


def test_digits_split_is_cached_and_read_back_by_a_process_without_scikit_learn(
    tmp_path: Path,
) -> None:
    # Prepare: the split as scikit-learn makes it, without a cache
    cfg = DatasetConfig(name="digits", test_fraction=0.2)
    split = load_dataset(cfg, seed=3)
    datasets.clear_cache()

    # Execute: the first load with a cache dir writes the file, a new process reads it
    first = load_dataset(cfg, seed=3, cache_dir=str(tmp_path))
    child = subprocess.run(
        [sys.executable, "-c", DIGITS_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout)
    assert report == {"sha256": _digest(split), "sklearn": False}
    assert _digest(first) == _digest(split)
    path = digits_cache_file(tmp_path, 0.2, 3)
    assert path.parent == tmp_path / "datasets" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_digits_cache_file_differs_by_seed_and_test_fraction() -> None:
    # Execute
    names = {digits_cache_file("c", f, s).name for f in (0.2, 0.25) for s in (0, 1)}

    # Assert
    assert len(names) == 4


def test_digits_classes_are_selected_from_the_cached_full_split(tmp_path: Path) -> None:
    # Prepare
    full = load_dataset(DatasetConfig(name="digits"), seed=0)
    datasets.clear_cache()

    # Execute
    picked = load_dataset(DatasetConfig(name="digits", classes=[7, 2]), 0, str(tmp_path))

    # Assert: one file, of the full split; class 7 is label 0
    assert len(list((tmp_path / "datasets").iterdir())) == 1
    np.testing.assert_array_equal(picked.x_test[picked.y_test == 0], full.x_test[full.y_test == 7])


def test_a_corrupt_digits_cache_file_is_split_anew_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    cfg = DatasetConfig(name="digits")
    split = load_dataset(cfg, seed=0)
    datasets.clear_cache()
    path = digits_cache_file(tmp_path, cfg.test_fraction, 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 cut short")

    # Execute
    again = load_dataset(cfg, seed=0, cache_dir=str(tmp_path))

    # Assert
    assert "cannot be read" in caplog.text and str(path) in caplog.text
    assert _digest(again) == _digest(split)
    with np.load(path) as npz:  # rewritten whole
        np.testing.assert_array_equal(npz["y_test"], split.y_test)


def test_an_unwritable_digits_cache_warns_and_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the cache dir is a file, so nothing can be written under it
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")

    # Execute
    dataset = load_dataset(DatasetConfig(name="digits"), seed=0, cache_dir=str(blocker))

    # Assert
    assert len(dataset.y_train) + len(dataset.y_test) == 1797
    assert "cannot cache the digits split" in caplog.text


def test_fashion_mnist_real_files_load_with_official_split() -> None:
    # Prepare
    if not all((FASHION_DIR / f"{s}.gz").is_file() for s in idx.IDX_FILES.values()):
        pytest.skip(f"Fashion-MNIST not in {FASHION_DIR}: apt-get install dataset-fashion-mnist")
    cfg = DatasetConfig(name="fashion_mnist", data_dir=str(FASHION_DIR), download=False)

    # Execute
    dataset = load_dataset(cfg)

    # Assert
    assert dataset.x_train.shape == (60000, 28, 28) and dataset.x_test.shape == (10000, 28, 28)
    assert dataset.y_train.shape == (60000,) and dataset.y_test.shape == (10000,)
    assert dataset.num_classes == 10 and dataset.input_shape == (28, 28)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int64
    assert dataset.x_train.min() == 0.0 and dataset.x_train.max() == 1.0
    assert dataset.train_images.nbytes == 60000 * 28 * 28  # uint8: 45 MiB, not 179 MiB
    np.testing.assert_array_equal(np.bincount(dataset.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(dataset.y_test), np.full(10, 1000))
