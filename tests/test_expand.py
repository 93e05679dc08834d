import dataclasses
import json

import numpy as np
import pytest

from pipeline.core.config import ConfigError, from_section
from pipeline.core.files import load_npz, save_npz
from pipeline.data.expand import ExpandConfig, elastic, expand, expand_arrays, shift


def hand_made():
    """A 28x28 image with distinct values in the corners and the edges, so every move is visible."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[0, 0], image[0, 27], image[27, 0], image[27, 27] = 1, 2, 3, 4
    image[0, 10] = 5  # top edge
    image[27, 10] = 6  # bottom edge
    image[10, 0] = 7  # left edge
    image[10, 27] = 8  # right edge
    image[14, 14] = 9  # centre
    return image


def pixels(image):
    return {(int(r), int(c)): int(image[r, c]) for r, c in zip(*np.nonzero(image))}


def test_one_pixel_shifts_pixel_by_pixel():
    image = hand_made()[None]
    # down: row 27 falls off, row 0 is zero-filled
    assert pixels(shift(image, 1, 0)[0]) == {(1, 0): 1, (1, 27): 2, (1, 10): 5, (11, 0): 7, (11, 27): 8, (15, 14): 9}
    # up: row 0 falls off
    assert pixels(shift(image, -1, 0)[0]) == {(26, 0): 3, (26, 27): 4, (26, 10): 6, (9, 0): 7, (9, 27): 8, (13, 14): 9}
    # right: column 27 falls off
    assert pixels(shift(image, 0, 1)[0]) == {(0, 1): 1, (27, 1): 3, (0, 11): 5, (27, 11): 6, (10, 1): 7, (14, 15): 9}
    # left: column 0 falls off
    assert pixels(shift(image, 0, -1)[0]) == {(0, 26): 2, (27, 26): 4, (0, 9): 5, (27, 9): 6, (10, 26): 8, (14, 13): 9}


def test_shift_fills_with_zeros_not_wrapping():
    image = np.full((1, 28, 28), 200, dtype=np.uint8)
    down = shift(image, 1, 0)[0]
    assert (down[0] == 0).all() and (down[1:] == 200).all()
    left2 = shift(image, 0, -2)[0]
    assert (left2[:, 26:] == 0).all() and (left2[:, :26] == 200).all()


def test_matches_the_books_roll_and_zero_loop():
    """The book's expand_mnist.py, per image with np.roll, is the reference for the four shifts."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    for image in images:
        for (d, axis, edge), (dy, dx) in zip(
            [(1, 0, ("row", 0)), (-1, 0, ("row", 27)), (1, 1, ("col", 0)), (-1, 1, ("col", 27))],
            [(1, 0), (-1, 0), (0, 1), (0, -1)],
        ):
            book = np.roll(image, d, axis)
            if edge[0] == "row":
                book[edge[1], :] = 0
            else:
                book[:, edge[1]] = 0
            np.testing.assert_array_equal(shift(image[None], dy, dx)[0], book)


def test_counts_and_contents_of_the_books_expansion():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (20, 28, 28), dtype=np.uint8)
    labels = (np.arange(20) % 10).astype(np.uint8)
    out_images, out_labels = expand_arrays(images, labels, ExpandConfig(seed=1))
    assert out_images.shape == (100, 28, 28) and out_labels.shape == (100,)
    assert np.bincount(out_labels).tolist() == [10] * 10
    # every original and every shifted copy is present exactly once, with its own label
    expected = {(images[i].tobytes(), labels[i]) for i in range(20)}
    for dy, dx in [(1, 0), (-1, 0), (0, 1), (0, -1)]:
        expected |= {(shift(images[i : i + 1], dy, dx)[0].tobytes(), labels[i]) for i in range(20)}
    got = [(img.tobytes(), lab) for img, lab in zip(out_images, out_labels)]
    assert len(set(got)) == 100 and set(got) == expected
    # shuffled: the originals are not simply first
    assert not np.array_equal(out_images[:20], images)


def test_same_seed_same_output_other_seed_other_order():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.uint8)
    config = ExpandConfig(seed=7, elastic_copies=1)
    a = expand_arrays(images, labels, config)
    b = expand_arrays(images, labels, config)
    c = expand_arrays(images, labels, ExpandConfig(seed=8, elastic_copies=1))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_larger_shifts_and_elastic_copies_are_all_there():
    """max_shift 2 adds the four 2-pixel shifts to the book's four; each elastic copy is a new image."""
    rng = np.random.default_rng(5)
    images = rng.integers(1, 256, (10, 28, 28), dtype=np.uint8)
    labels = np.arange(10, dtype=np.uint8)
    out_images, out_labels = expand_arrays(images, labels, ExpandConfig(max_shift=2, elastic_copies=3))
    assert len(out_images) == 10 * (1 + 8 + 3) and np.bincount(out_labels).tolist() == [12] * 10
    got = [(image.tobytes(), label) for image, label in zip(out_images, out_labels)]
    moves = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2)]
    shifted = {(shift(images[i : i + 1], dy, dx)[0].tobytes(), labels[i]) for i in range(10) for dy, dx in moves}
    assert len(shifted) == 90 and shifted <= set(got)
    elastic_copies = [(image, label) for image, label in got if (image, label) not in shifted]
    assert len({image for image, _ in elastic_copies}) == 30  # three distinct copies of every image
    assert sorted(label for _, label in elastic_copies) == sorted(labels.tolist() * 3)


def test_elastic_with_zero_alpha_is_identity_and_alpha_moves_pixels():
    rng = np.random.default_rng(0)
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    images[:, 8:20, 12:16] = 255  # a vertical bar
    same = elastic(images, np.random.default_rng(1), alpha=0.0, sigma=4.0)
    np.testing.assert_array_equal(same, images)
    moved = elastic(images, rng, alpha=34.0, sigma=4.0)
    assert moved.dtype == np.uint8 and moved.shape == images.shape
    assert not np.array_equal(moved, images)
    # a smooth distortion keeps the stroke roughly where it was: most ink stays within the old box +- 4 px
    ink = moved.astype(float)
    assert ink[:, 4:24, 8:20].sum() > 0.8 * ink.sum()


def test_expand_stage_writes_npz(tmp_path):
    rng = np.random.default_rng(0)
    save_npz(
        tmp_path / "train.npz",
        images=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        labels=np.arange(8, dtype=np.uint8),
    )
    summary = expand(config=ExpandConfig(), train_path=tmp_path / "train.npz", out_dir=tmp_path / "out", progress=False)
    data = load_npz(tmp_path / "out" / "train.npz")
    source = load_npz(tmp_path / "train.npz")
    images, labels = expand_arrays(source["images"], source["labels"], ExpandConfig())
    np.testing.assert_array_equal(data["images"], images)
    np.testing.assert_array_equal(data["labels"], labels)
    assert summary == {"count": 40, "source_count": 8, "config": dataclasses.asdict(ExpandConfig())}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


@pytest.mark.parametrize(
    "section, message",
    [
        ({"max_shift": -1}, r"Got expand.max_shift=-1: must be 0..13"),
        ({"max_shift": 14}, r"Got expand.max_shift=14: must be 0..13 pixels"),
        ({"elastic_copies": -1}, r"Got expand.elastic_copies=-1: must be >= 0"),
        ({"elastic_alpha": -0.5}, r"Got expand.elastic_alpha=-0.5: must be >= 0"),
        ({"elastic_sigma": 0}, r"Got expand.elastic_sigma=0.0: must be > 0"),
        ({"seed": "x"}, r"Got expand.seed='x': expected an integer"),
        ({"shift": 1}, r"unknown key expand.shift"),
    ],
)
def test_bad_params(section, message):
    with pytest.raises(ConfigError, match=message):
        from_section(ExpandConfig, {"expand": section}, "expand")


@pytest.mark.parametrize("max_shift", [0, 13])
def test_the_edges_of_max_shift_are_accepted(max_shift):
    """0: the images alone; 13: a digit moved 13 pixels, the furthest that keeps some of it."""
    images = np.full((1, 28, 28), 7, dtype=np.uint8)
    out_images, _ = expand_arrays(images, np.zeros(1, np.uint8), ExpandConfig(max_shift=max_shift))
    assert len(out_images) == 1 + 4 * max_shift
    assert min(int((image > 0).sum()) for image in out_images) == 28 * (28 - max_shift)
