import gzip
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from pipeline.data.idx import MAX_DATA_BYTES, IdxError, read_idx, read_images, read_labels, read_pair, write_idx


def header(magic, *dims):
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    write_idx(tmp_path / f"i{suffix}", images)
    write_idx(tmp_path / f"l{suffix}", labels)
    got_images, got_labels = read_pair(tmp_path / f"i{suffix}", tmp_path / f"l{suffix}")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8


def test_written_bytes_follow_the_idx_layout(tmp_path):
    """Independent of our reader: the header bytes are exactly what the IDX spec says."""
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", images)
    assert (tmp_path / "x").read_bytes() == b"\x00\x00\x08\x03" + header(0, 2, 3, 4)[4:] + images.tobytes()


def test_wrong_magic_names_file_and_numbers(tmp_path):
    write_idx(tmp_path / "labels.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(IdxError, match=r"labels\.gz: magic number 0x00000801, expected 0x00000803"):
        read_images(tmp_path / "labels.gz")


def test_declared_count_larger_than_data(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(header(0x803, 10, 28, 28) + bytes(9 * 784))
    with pytest.raises(IdxError, match=r"declares shape \(10, 28, 28\) = 7840 bytes of data, but the file has 7056"):
        read_images(path)


def test_one_trailing_byte_is_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(header(0x801, 3) + bytes(4))
    with pytest.raises(IdxError) as error:
        read_labels(path)
    assert str(error.value) == f"{path}: header declares shape (3,) = 3 bytes of data, but the file has 4"


@pytest.mark.parametrize(
    "content, says",
    [
        (b"\x00\x00\x08", "3 bytes is too short for an IDX header"),
        (b"\x00\x00\x08\x03" + bytes(11), "15 bytes is too short for a 3-dimensional IDX header"),
    ],
    ids=["no-magic", "one-byte-short"],
)
def test_short_header(tmp_path, content, says):
    path = tmp_path / "images"
    path.write_bytes(content)
    with pytest.raises(IdxError) as error:
        read_images(path)
    assert str(error.value) == f"{path}: {says}"


def test_labels_are_the_digits_0_to_9_and_10_is_not_one(tmp_path):
    write_idx(tmp_path / "digits", np.arange(10, dtype=np.uint8))
    np.testing.assert_array_equal(read_labels(tmp_path / "digits"), np.arange(10))
    write_idx(tmp_path / "l", np.array([9, 0, 10, 3, 255], dtype=np.uint8))
    with pytest.raises(IdxError) as error:
        read_labels(tmp_path / "l")
    assert str(error.value) == f"{tmp_path / 'l'}: label 10 at index 2 is not a digit 0-9 (2 such labels)"


def test_count_mismatch_between_images_and_labels(tmp_path):
    write_idx(tmp_path / "i", np.zeros((4, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "l", np.zeros(5, dtype=np.uint8))
    with pytest.raises(IdxError, match="has 4 images but .* has 5 labels"):
        read_pair(tmp_path / "i", tmp_path / "l")


def test_truncated_gzip(tmp_path):
    payload = gzip.compress(header(0x801, 1000) + bytes(1000))
    (tmp_path / "l.gz").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(IdxError, match=r"l\.gz: cannot decompress"):
        read_labels(tmp_path / "l.gz")


def test_writer_leaves_no_temporary_files(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros(3, dtype=np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.gz"]


@pytest.mark.parametrize("rows, cols", [(32, 32), (28, 27), (27, 28), (28, 29), (1, 784)])
def test_images_that_are_not_28x28_are_refused(tmp_path, rows, cols):
    write_idx(tmp_path / "images.gz", np.zeros((5, rows, cols), dtype=np.uint8))
    with pytest.raises(
        IdxError,
        match=rf"images\.gz: images of {rows}x{cols} pixels \(header shape \(5, {rows}, {cols}\)\); expected 28x28",
    ):
        read_images(tmp_path / "images.gz")


def test_a_header_claiming_billions_of_images_is_refused_before_reading(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(header(0x803, 3_000_000_000, 28, 28) + bytes(784)))
    with pytest.raises(
        IdxError,
        match=r"images\.gz: header declares shape \(3000000000, 28, 28\) = 2352000000000 bytes of data, "
        r"more than the 268435456 an MNIST-format file may have here; refused before reading it",
    ):
        read_images(path)


# The limit is on the bytes a header declares, not on its count: as many labels as 2**28 bytes hold,
# but only 342,392 images of 28x28 (342,392 * 784 = 268,435,328 bytes; one more is 268,436,112).
AT_THE_LIMIT = [
    ("labels", 0x801, (MAX_DATA_BYTES,)),
    ("images", 0x803, (MAX_DATA_BYTES // 784, 28, 28)),
    ("32x32 images", 0x803, (MAX_DATA_BYTES // 1024, 32, 32)),  # exactly 2**28 bytes in three dimensions
]


@pytest.mark.parametrize("what, magic, shape", AT_THE_LIMIT, ids=[what for what, *_ in AT_THE_LIMIT])
def test_a_header_at_the_limit_is_accepted(tmp_path, what, magic, shape):
    """Its header passes; what refuses this (tiny) file is only that the data is not there."""
    assert MAX_DATA_BYTES - 784 < np.prod(shape) <= MAX_DATA_BYTES
    path = tmp_path / "file.gz"
    path.write_bytes(gzip.compress(header(magic, *shape)))
    with pytest.raises(IdxError) as error:
        read_idx(path, magic)
    assert str(error.value) == (
        f"{path}: header declares shape {shape} = {np.prod(shape)} bytes of data, but the file has 0"
    )


@pytest.mark.parametrize("what, magic, shape", AT_THE_LIMIT, ids=[what for what, *_ in AT_THE_LIMIT])
def test_a_header_one_past_the_limit_is_refused_in_one_line_before_reading(tmp_path, what, magic, shape):
    """One more label, image or byte: refused from its header, without reading (or allocating) its data."""
    shape = (shape[0] + 1,) + shape[1:]
    path = tmp_path / "file.gz"
    path.write_bytes(gzip.compress(header(magic, *shape) + bytes(1 << 20)))  # data there, never read
    tracemalloc.start()
    try:
        with pytest.raises(IdxError) as error:
            read_idx(path, magic)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value) == (
        f"{path}: header declares shape {shape} = {np.prod(shape)} bytes of data, more than the "
        f"268435456 an MNIST-format file may have here; refused before reading it"
    )
    assert peak < 256 << 10, peak  # the header and gzip's buffers, not the 1 MiB that follows


def test_the_largest_count_of_images_is_read_whole(tmp_path):
    """The limit at work on real data: 342,392 images (256 MiB, of zeros so the file stays small) read back."""
    count = MAX_DATA_BYTES // 784
    path = tmp_path / "images.gz"
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip format
    with open(path, "wb") as f:
        f.write(compressor.compress(header(0x803, count, 28, 28)))
        for _ in range(count // 1000):
            f.write(compressor.compress(bytes(784 * 1000)))
        f.write(compressor.compress(bytes(784 * (count % 1000))))
        f.write(compressor.flush())
    images = read_images(path)
    assert images.shape == (count, 28, 28) and not images.any()


def test_a_gzip_bomb_is_refused_without_holding_it_in_memory(tmp_path):
    """A 300 kB .gz that expands to 300 MB of zeros after a 10-image header: counted, never kept."""
    path = tmp_path / "images.gz"
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip format
    with open(path, "wb") as f:
        f.write(compressor.compress(header(0x803, 10, 28, 28) + bytes(7840)))
        zeros = bytes(1 << 20)
        for _ in range(300):
            f.write(compressor.compress(zeros))
        f.write(compressor.flush())
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(
            IdxError, match=r"declares shape \(10, 28, 28\) = 7840 bytes of data, but the file has more"
        ):
            read_images(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak


def test_corrupt_gzip_data_is_named(tmp_path):
    payload = bytearray(gzip.compress(header(0x801, 1000) + bytes(range(256)) * 4))
    payload[20:30] = b"\xff" * 10  # inside the deflate stream
    (tmp_path / "l.gz").write_bytes(bytes(payload))
    with pytest.raises(IdxError, match=r"l\.gz: cannot decompress"):
        read_labels(tmp_path / "l.gz")
