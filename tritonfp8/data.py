"""Real data that works offline: Fashion-MNIST from its IDX files, and a text corpus.

* **Fashion-MNIST** (Zalando; 60,000 train + 10,000 test 28x28 grey images, 10
  classes) is read from the four original IDX files, gzip-compressed or not.
  Debian's ``dataset-fashion-mnist`` package installs them under
  ``/usr/share/datasets/fashion-mnist/``; :func:`find_fashion_mnist` also looks in
  ``$TRITONFP8_FASHION_MNIST``. Reading needs only gzip and numpy.
* **Text**: the running Python's own standard library sources (``Lib/*.py``, about
  4.7 MB for CPython 3.11), present on every machine that runs this package.

:func:`read_idx` checks the header, the declared sizes and the payload length, so a
truncated or corrupt file raises :class:`IDXError` naming the file and what is
wrong, never an error from deep inside numpy or gzip.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
import struct
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = [
    "IDXError", "DatasetMissing", "read_idx", "write_idx", "find_fashion_mnist", "load_fashion_mnist",
    "FashionMNIST", "FASHION_MNIST_FILES", "FASHION_MNIST_DIRS", "FASHION_MNIST_ENV", "FASHION_MNIST_CLASSES",
    "text_corpus", "corpus_files", "TextCorpus", "load_text_corpus",
]

# IDX type codes (LeCun's format): code -> (numpy dtype, big-endian on disk)
_IDX_TYPES = {
    0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
_IDX_MAX_DIMS = 8
_IDX_MAX_BYTES = 1 << 33  # 8 GiB: a header declaring more is corrupt, not a data set of this kind

FASHION_MNIST_ENV = "TRITONFP8_FASHION_MNIST"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
# split -> (images file, labels file), as Zalando names them
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_HOWTO = (
    "Fashion-MNIST is not installed. Install it with\n"
    "    apt-get install -y dataset-fashion-mnist        (Debian / Ubuntu; as root, ~30 MB)\n"
    "which puts the four IDX files under /usr/share/datasets/fashion-mnist/, or copy\n"
    "    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz  t10k-images-idx3-ubyte.gz  t10k-labels-idx1-ubyte.gz\n"
    "(from https://github.com/zalandoresearch/fashion-mnist, directory data/fashion) into a directory and pass\n"
    f"--data-dir DIR or set {FASHION_MNIST_ENV}=DIR. Nothing is downloaded at run time.\n"
    "To run without it: python -m tritonfp8 reproduce --task text-gpt"
)


class IDXError(ValueError):
    """An IDX file that is truncated, corrupt or not IDX at all."""


class DatasetMissing(FileNotFoundError):
    """A data set that is not on this machine; the message says how to get it."""


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # truncated or damaged gzip stream
        raise IDXError(f"{path}: the gzip stream is truncated or corrupt ({e}); reinstall or re-copy the file") from None


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as a numpy array in native byte order.

    The header is ``0x00 0x00 <type code> <ndims>`` followed by ``ndims`` big-endian
    uint32 sizes; the payload must hold exactly prod(sizes) items of the type.

    Raises:
        FileNotFoundError: no such file.
        IDXError: bad magic bytes, unknown type code, implausible dimensions, or a
            payload shorter or longer than the header declares (truncated / corrupt).
    """
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: {len(data)} bytes is too short for an IDX header (4 bytes of magic + sizes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IDXError(f"{path}: not an IDX file (the first two bytes are {data[:2].hex()}, expected 0000)")
    if code not in _IDX_TYPES:
        raise IDXError(f"{path}: unknown IDX type code 0x{code:02x} (known: {', '.join(hex(c) for c in _IDX_TYPES)})")
    if not 1 <= ndim <= _IDX_MAX_DIMS:
        raise IDXError(f"{path}: {ndim} dimensions declared; expected 1..{_IDX_MAX_DIMS}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated header ({len(data)} bytes, the {ndim} sizes need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[code]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = count * dtype.itemsize
    if expected > _IDX_MAX_BYTES:
        raise IDXError(f"{path}: the header declares shape {shape} ({expected} bytes); the file is corrupt")
    payload = len(data) - header
    if payload < expected:
        raise IDXError(f"{path}: truncated: shape {shape} of {dtype.name} needs {expected} bytes of data, "
                       f"the file has {payload}")
    if payload > expected:
        raise IDXError(f"{path}: {payload - expected} bytes after the declared shape {shape}; the file is corrupt")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: Union[str, os.PathLike], array: np.ndarray, compress: Optional[bool] = None) -> Path:
    """Write ``array`` as an IDX file (gzip when ``compress`` or the name ends in .gz); for tests and tools."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"IDX stores uint8, int8, int16, int32, float32 or float64, got {array.dtype}")
    body = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body += array.astype(_IDX_TYPES[code]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        body = gzip.compress(body, mtime=0)
    path.write_bytes(body)
    return path


# ----------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------


def _locate(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def find_fashion_mnist(root: Union[str, os.PathLike, None] = None) -> Path:
    """The directory that holds the four Fashion-MNIST IDX files.

    Looks in ``root`` if given (only there), else in ``$TRITONFP8_FASHION_MNIST`` and
    then in :data:`FASHION_MNIST_DIRS`. Raises :class:`DatasetMissing` with the way to
    get them.
    """
    if root is not None:
        candidates = [Path(root)]
    else:
        env = os.environ.get(FASHION_MNIST_ENV)
        candidates = ([Path(env)] if env else []) + [Path(d) for d in FASHION_MNIST_DIRS]
    for d in candidates:
        if all(_locate(d, stem) for pair in FASHION_MNIST_FILES.values() for stem in pair):
            return d
    looked = ", ".join(str(d) for d in candidates)
    raise DatasetMissing(f"{FASHION_MNIST_HOWTO}\n(looked in: {looked})")


@dataclass
class FashionMNIST:
    """One split: ``images`` uint8 [N, 28, 28], ``labels`` uint8 [N] in 0..9, and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    files: tuple

    def __len__(self) -> int:
        return len(self.labels)


def load_fashion_mnist(split: str = "train", root: Union[str, os.PathLike, None] = None) -> FashionMNIST:
    """Read one split ("train" or "test") of Fashion-MNIST and check that it is consistent."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    directory = find_fashion_mnist(root)
    img_path, lbl_path = (_locate(directory, stem) for stem in FASHION_MNIST_FILES[split])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IDXError(f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IDXError(f"{lbl_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise IDXError(f"{lbl_path}: label {int(labels.max())} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return FashionMNIST(images, labels, (str(img_path), str(lbl_path)))


# ----------------------------------------------------------------------------
# Text: the Python standard library's sources
# ----------------------------------------------------------------------------


def corpus_files() -> list[str]:
    """The running Python's top-level standard library sources (``Lib/*.py``), sorted."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def text_corpus(max_bytes: Optional[int] = 2_000_000) -> bytes:
    """Real English/code text that every machine has: the running Python's own standard library sources.

    The files of :func:`corpus_files` concatenated (up to ``max_bytes``; None: all),
    as ASCII, other bytes replaced by ``?`` (63), so a byte model needs 128 symbols.
    """
    data = bytearray()
    for path in corpus_files():
        with open(path, "rb") as f:
            data += f.read()
        if max_bytes is not None and len(data) >= max_bytes:
            break
    data = bytes(data if max_bytes is None else data[:max_bytes])
    return data.translate(_ASCII)


_ASCII = bytes(b if b < 128 else 63 for b in range(256))


@dataclass
class TextCorpus:
    """A byte corpus split into train / validation (the last ``val_fraction``, as nanoGPT does)."""

    train: np.ndarray  # uint8 [n_train]
    val: np.ndarray    # uint8 [n_val]
    description: dict


def load_text_corpus(max_bytes: Optional[int] = None, val_fraction: float = 0.1) -> TextCorpus:
    """The stdlib corpus as uint8 arrays, split at ``1 - val_fraction``; ``description`` says what it is."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    data = text_corpus(max_bytes)
    if len(data) < 1024:
        raise DatasetMissing(f"the Python standard library sources under {sysconfig.get_paths()['stdlib']} hold only "
                             f"{len(data)} bytes of *.py; this Python installation has no usable Lib/ sources")
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    cut = int(len(arr) * (1.0 - val_fraction))
    files = corpus_files()
    description = {
        "name": f"CPython {sys.version.split()[0]} standard library sources (Lib/*.py), ASCII bytes",
        "path": sysconfig.get_paths()["stdlib"],
        "files": len(files),
        "bytes": len(arr),
        "train_bytes": cut,
        "val_bytes": len(arr) - cut,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return TextCorpus(arr[:cut], arr[cut:], description)
