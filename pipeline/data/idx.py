"""Strict reader and writer for the IDX format of the MNIST files (optionally gzip-compressed).

An IDX file is a big-endian header -- two zero bytes, a type code, the number of dimensions, then
one uint32 per dimension -- followed by the data. MNIST uses type 0x08 (unsigned byte): images
are 3-dimensional (count, rows, cols) with magic 2051, labels 1-dimensional with magic 2049.
Every check names the file and says what is wrong, so a corrupt or mixed-up download is caught
before any training starts.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.core.config import PipelineError
from pipeline.core.files import write_bytes

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IMAGE_SIZE = (28, 28)  # (rows, cols) of every MNIST image
# The most data bytes a header may declare: 2**28, over five times MNIST's largest file (47 MB). A
# larger claim is refused before any data is read, so a small gzip file cannot expand into gigabytes.
# It bounds bytes, not counts: 342,392 images of 28x28 (60,000 in MNIST), or 2**28 labels.
MAX_DATA_BYTES = 2**28


class IdxError(PipelineError, ValueError):
    """A file that is not a well-formed MNIST IDX file."""


def _open(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes, checking magic number, dimensions and size.

    The header is read first and its declared size checked against MAX_DATA_BYTES, then exactly that
    many bytes are read: whatever follows is counted, not kept."""
    path = Path(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise IdxError(f"{path}: {len(head)} bytes is too short for an IDX header")
            magic = struct.unpack(">I", head)[0]
            if magic != expected_magic:
                raise IdxError(
                    f"{path}: magic number {magic:#010x}, expected {expected_magic:#010x} "
                    f"({'images' if expected_magic == IMAGES_MAGIC else 'labels'})"
                )
            ndim = magic & 0xFF
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise IdxError(f"{path}: {4 + len(dims)} bytes is too short for a {ndim}-dimensional IDX header")
            shape = struct.unpack(f">{ndim}I", dims)
            expected = math.prod(shape)
            if expected > MAX_DATA_BYTES:
                raise IdxError(
                    f"{path}: header declares shape {shape} = {expected} bytes of data, more than the "
                    f"{MAX_DATA_BYTES} an MNIST-format file may have here; refused before reading it"
                )
            data = f.read(expected)
            extra = 0  # counted up to MAX_DATA_BYTES, never kept
            while extra <= MAX_DATA_BYTES and (chunk := f.read(1 << 20)):
                extra += len(chunk)
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt gzip stream
        raise IdxError(f"{path}: cannot decompress: {e}") from None
    actual = len(data) + extra
    if actual != expected:
        has = f"more than {actual - 1}" if extra > MAX_DATA_BYTES else str(actual)
        raise IdxError(f"{path}: header declares shape {shape} = {expected} bytes of data, but the file has {has}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def read_images(path: str | Path, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """Images as uint8 of shape (count, rows, cols), refused unless (rows, cols) is ``size`` (MNIST's 28x28)."""
    images = read_idx(path, IMAGES_MAGIC)
    if images.shape[1:] != tuple(size):
        raise IdxError(
            f"{path}: images of {images.shape[1]}x{images.shape[2]} pixels (header shape {images.shape}); "
            f"expected {size[0]}x{size[1]}, the size of MNIST's images and of the networks' input"
        )
    return images


def read_labels(path: str | Path) -> np.ndarray:
    """Labels as uint8 of shape (count,), each checked to be a digit 0-9."""
    labels = read_idx(path, LABELS_MAGIC)
    if why := not_digits(labels):
        raise IdxError(f"{path}: {why}")
    return labels


def not_digits(labels: np.ndarray) -> str | None:
    """Why integer ``labels`` are not all digits 0-9, quoting the first that is not; None when they are."""
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        return f"label {labels[bad[0]]} at index {bad[0]} is not a digit 0-9 ({bad.size} such labels)"
    return None


def read_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels whose counts must agree."""
    images = read_images(images_path)
    labels = read_labels(labels_path)
    if len(images) != len(labels):
        raise IdxError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` (uint8) as IDX, gzip-compressed when ``compress`` or the name ends in .gz."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX writing supports uint8 only, got {array.dtype}")
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, mtime=0)
    write_bytes(path, payload)
