"""The offline data readers: IDX files (Fashion-MNIST) and the standard-library text corpus.

Everything here uses small synthetic IDX files; the real data set is not needed."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from tritonfp8 import data as tfdata
from tritonfp8.data import DatasetMissing, IDXError, read_idx, write_idx


def _idx_bytes(code: int, shape, payload: bytes) -> bytes:
    """An IDX file written by hand from the format's definition (independent of write_idx)."""
    return struct.pack(">BBBB", 0, 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + payload


# ----------------------------------------------------------------------------
# read_idx
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_reads_hand_written_files(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(0x08, (2, 3, 4), images.tobytes())
    ints = _idx_bytes(0x0C, (3,), struct.pack(">3i", -1, 7, 1 << 30))
    floats = _idx_bytes(0x0D, (2,), struct.pack(">2f", 1.5, -2.25))
    out = {}
    for name, blob in (("u8", raw), ("i32", ints), ("f32", floats)):
        path = tmp_path / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(blob) if gz else blob)
        out[name] = read_idx(path)
    np.testing.assert_array_equal(out["u8"], images)
    assert out["u8"].dtype == np.uint8
    np.testing.assert_array_equal(out["i32"], [-1, 7, 1 << 30])
    assert out["i32"].dtype == np.dtype("int32") and out["i32"].dtype.isnative
    np.testing.assert_array_equal(out["f32"], np.array([1.5, -2.25], dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_write_read_round_trip(tmp_path, dtype):
    a = (np.arange(60) - 30).astype(dtype).reshape(3, 4, 5)
    for name in ("a.idx", "a.idx.gz"):
        np.testing.assert_array_equal(read_idx(write_idx(tmp_path / name, a)), a)


@pytest.mark.parametrize("case,match", [
    pytest.param(lambda ok: ok[:-5], "truncated: shape .* needs 24 bytes of data, the file has 19", id="short-payload"),
    pytest.param(lambda ok: ok + b"\x00\x01", "2 bytes after the declared shape", id="trailing-bytes"),
    pytest.param(lambda ok: ok[:10], "truncated header", id="short-header"),
    pytest.param(lambda ok: ok[:3], "too short for an IDX header", id="three-bytes"),
    pytest.param(lambda ok: b"", "too short for an IDX header", id="empty"),
    pytest.param(lambda ok: b"\x1f\x9d" + ok[2:], "not an IDX file", id="bad-magic"),
    pytest.param(lambda ok: ok[:2] + b"\x07" + ok[3:], "unknown IDX type code 0x07", id="bad-type"),
    pytest.param(lambda ok: ok[:3] + b"\x00" + ok[4:], "0 dimensions", id="zero-dims"),
    pytest.param(lambda ok: _idx_bytes(0x0E, (0xFFFFFFFF, 0xFFFFFFFF), b""), "the file is corrupt", id="absurd-shape"),
])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_corrupt_files_raise_a_clear_error(tmp_path, case, match, gz):
    ok = _idx_bytes(0x08, (2, 3, 4), bytes(24))
    path = tmp_path / ("bad.idx.gz" if gz else "bad.idx")
    blob = case(ok)
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(IDXError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream(tmp_path):
    ok = gzip.compress(_idx_bytes(0x08, (50, 28, 28), bytes(range(256)) * 153 + bytes(32)))
    for cut in (len(ok) // 2, len(ok) - 4, 12):
        path = tmp_path / f"cut{cut}.gz"
        path.write_bytes(ok[:cut])
        with pytest.raises(IDXError, match="gzip stream is truncated or corrupt"):
            read_idx(path)
    damaged = bytearray(ok)
    damaged[len(ok) // 2] ^= 0xFF  # a flipped byte inside the deflate stream (or its CRC check fails)
    path = tmp_path / "damaged.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(IDXError):
        read_idx(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.gz")


# ----------------------------------------------------------------------------
# Fashion-MNIST layout
# ----------------------------------------------------------------------------


def make_fashion_dir(root, n_train=64, n_test=32, gz=True, seed=0):
    """A synthetic Fashion-MNIST directory: the four IDX files with random images and labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = tfdata.FASHION_MNIST_FILES[split]
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / (img_name + suffix), images)
        write_idx(root / (lbl_name + suffix), labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_load_fashion_mnist_from_a_directory(tmp_path, gz):
    arrays = make_fashion_dir(tmp_path / "fm", gz=gz)
    for split in ("train", "test"):
        d = tfdata.load_fashion_mnist(split, tmp_path / "fm")
        np.testing.assert_array_equal(d.images, arrays[split][0])
        np.testing.assert_array_equal(d.labels, arrays[split][1])
        assert len(d) == len(arrays[split][1])
    with pytest.raises(ValueError, match="split must be one of"):
        tfdata.load_fashion_mnist("validation", tmp_path / "fm")


def test_environment_variable_points_to_the_data(tmp_path, monkeypatch):
    make_fashion_dir(tmp_path / "env")
    monkeypatch.setenv(tfdata.FASHION_MNIST_ENV, str(tmp_path / "env"))
    assert tfdata.find_fashion_mnist() == tmp_path / "env"


def test_missing_data_set_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tfdata, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv(tfdata.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(DatasetMissing) as info:
        tfdata.load_fashion_mnist("train")
    msg = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and tfdata.FASHION_MNIST_ENV in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg and str(tmp_path / "nowhere") in msg
    # three of the four files are not enough
    make_fashion_dir(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetMissing):
        tfdata.find_fashion_mnist(tmp_path / "partial")


def test_inconsistent_files_are_reported(tmp_path):
    make_fashion_dir(tmp_path / "fm", n_train=64)
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(63, dtype=np.uint8))
    with pytest.raises(IDXError, match="64 images but .* 63 labels"):
        tfdata.load_fashion_mnist("train", tmp_path / "fm")
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.full(64, 10, dtype=np.uint8))
    with pytest.raises(IDXError, match="label 10 outside 0..9"):
        tfdata.load_fashion_mnist("train", tmp_path / "fm")
    write_idx(tmp_path / "fm" / "train-images-idx3-ubyte.gz", np.zeros((64, 784), dtype=np.uint8))
    with pytest.raises(IDXError, match=r"expected uint8 images \[N, H, W\]"):
        tfdata.load_fashion_mnist("train", tmp_path / "fm")
    path = tmp_path / "fm" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IDXError, match="gzip stream is truncated"):
        tfdata.load_fashion_mnist("test", tmp_path / "fm")


# ----------------------------------------------------------------------------
# Text corpus
# ----------------------------------------------------------------------------


def test_text_corpus_is_the_stdlib_sources_as_ascii():
    files = tfdata.corpus_files()
    assert len(files) > 20 and all(f.endswith(".py") for f in files) and files == sorted(files)
    head = b"".join(open(f, "rb").read() for f in files[:3])
    expected = bytes(b if b < 128 else 63 for b in head)[:5000]
    assert tfdata.text_corpus(5000) == expected
    small = tfdata.text_corpus(100_000)
    assert len(small) == 100_000 and max(small) < 128


def test_text_corpus_split_and_description():
    c = tfdata.load_text_corpus(200_000, val_fraction=0.25)
    assert (len(c.train), len(c.val)) == (150_000, 50_000)
    assert c.train.dtype == np.uint8 and int(max(c.train.max(), c.val.max())) < 128
    d = c.description
    assert d["bytes"] == 200_000 and d["train_bytes"] == 150_000 and len(d["sha256"]) == 64
    assert "standard library" in d["name"] and d["files"] == len(tfdata.corpus_files())
    with pytest.raises(ValueError, match="val_fraction"):
        tfdata.load_text_corpus(1000, val_fraction=1.0)


def test_stock_models_helper_uses_the_package_corpus():
    from stock_models import text_corpus

    assert text_corpus(3000) == tfdata.text_corpus(3000)
