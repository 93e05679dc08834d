"""The distortions against SciPy's independent implementations (gaussian_filter, map_coordinates,
affine_transform) and hand-made images."""

import numpy as np
import pytest
from scipy import ndimage

from pipeline.data import distort


def digits(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 28, 28): random strokes in the middle 20x20, as MNIST's digits sit, zeros around."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 4:24, 4:24] = (rng.random((n, 20, 20)) > 0.6) * rng.integers(0, 256, (n, 20, 20))
    return images


@pytest.mark.parametrize("sigma", [0.7, 4.0, 5.0, 9.0])
def test_smoothing_equals_scipy_gaussian_filter_with_constant_mode(sigma):
    fields = np.random.default_rng(1).uniform(-1, 1, (2, 3, 28, 28))
    expected = ndimage.gaussian_filter(fields, sigma=(0, 0, sigma, sigma), mode="constant")
    np.testing.assert_allclose(distort.smooth_fields(fields, sigma), expected, rtol=0, atol=1e-12)


def test_bilinear_sampling_equals_scipy_map_coordinates_inside_on_the_edge_and_outside():
    images = digits(4, seed=2)
    images[:, 0, :] = 255  # content on the border, so the edge rule matters
    rng = np.random.default_rng(3)
    y, x = rng.uniform(-2, 30, (2, 4, 28, 28))
    y[:, 0, :4], x[:, 0, :4] = [0.0, 27.0, 27.0, 13.5], [0.0, 27.0, 5.0, 27.0]  # exactly on the edges
    index = np.broadcast_to(np.arange(4)[:, None, None], y.shape)
    expected = ndimage.map_coordinates(images.astype(np.float64), [index, y, x], order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(distort.bilinear(images, y, x), expected, rtol=0, atol=1e-9)


def test_elastic_equals_the_scipy_recipe_it_replaced():
    """pipeline.data.expand's elastic copies were made with gaussian_filter and map_coordinates: same bytes."""
    images = digits(2000, seed=4)
    field = np.random.default_rng(5).uniform(-1.0, 1.0, size=(2, 2000, 28, 28))
    field = ndimage.gaussian_filter(field, sigma=(0, 0, 4.0, 4.0), mode="constant") * 34.0
    index, y, x = np.meshgrid(np.arange(2000), np.arange(28), np.arange(28), indexing="ij")
    warped = ndimage.map_coordinates(
        images.astype(np.float32), [index, y + field[0], x + field[1]], order=1, mode="constant", cval=0.0
    )
    expected = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(distort.elastic(images, np.random.default_rng(5), 34.0, 4.0), expected)


def test_rotation_and_scaling_equal_scipy_affine_transform_with_the_same_draws():
    images = digits(20, seed=6)
    out = distort.distort(images, np.random.default_rng(7), rotation=15.0, scale=0.2)
    rng = np.random.default_rng(7)  # the same draws, in the documented order: angles, then scales
    angles = np.deg2rad(rng.uniform(-15.0, 15.0, 20))
    factors = rng.uniform(0.8, 1.2, 20)
    centre = np.array([13.5, 13.5])
    for image, angle, factor, got in zip(images, angles, factors, out):
        # the target pixel p reads the source point centre + inverse @ (p - centre)
        inverse = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / factor
        expected = ndimage.affine_transform(
            image.astype(np.float64), inverse, offset=centre - inverse @ centre, order=1, mode="constant", cval=0.0
        )
        difference = np.abs(got.astype(int) - np.clip(np.rint(expected), 0, 255))
        assert difference.max() <= 1 and np.count_nonzero(difference) <= 2  # rounding of .5 only


def test_a_hand_made_bar_turns_and_grows_about_the_centre():
    bar = np.zeros((1, 28, 28), dtype=np.uint8)
    bar[0, 13:15, 6:22] = 255  # horizontal, 16 pixels long, centred
    # rotation 90 with every angle drawn from [-90, 90]: find a seed whose angle is near +-90
    seed = next(s for s in range(1000) if abs(abs(np.random.default_rng(s).uniform(-90, 90)) - 90) < 1)
    turned = distort.distort(bar, np.random.default_rng(seed), rotation=90.0)[0]
    rows, cols = np.nonzero(turned > 127)
    assert np.ptp(rows) >= 14 and np.ptp(cols) <= 2  # now vertical, as long
    assert abs(rows.mean() - 13.5) < 0.6 and abs(cols.mean() - 13.5) < 0.6  # about the centre
    # scale up to 1.5: a factor near 1.5 makes the bar some 24 pixels long
    # (the angle is drawn first, from [0, 0]; the factor second)
    seed = next(s for s in range(1000) if np.random.default_rng(s).uniform(0.5, 1.5, 2)[1] > 1.45)
    grown = distort.distort(bar, np.random.default_rng(seed), scale=0.5)[0]
    assert 22 <= np.ptp(np.nonzero(grown[13] > 127)[0]) + 1 <= 25


def test_no_distortion_is_the_identity_and_shapes_come_back():
    images = digits(5)
    np.testing.assert_array_equal(distort.distort(images, np.random.default_rng(0)), images)
    flat = images.reshape(5, 784)
    assert distort.distort(flat, np.random.default_rng(0), rotation=5.0, alpha=10.0).shape == (5, 784)


def test_elastic_moves_pixels_by_about_the_expected_amount():
    """The smoothed uniform field has std 1/sqrt(3) / (2 sqrt(pi) sigma) (a 2-D Gaussian's L2 norm), times alpha."""
    dy, dx = distort.elastic_displacements(np.random.default_rng(8), 2000, alpha=34.0, sigma=5.0)
    middle = dy[:, 10:18, 10:18]  # away from the zero-padded border
    expected = 34.0 / np.sqrt(3) / (2 * np.sqrt(np.pi) * 5.0)
    assert middle.std() == pytest.approx(expected, rel=0.05)
    assert abs(middle.mean()) < 0.05 and dx[:, 10:18, 10:18].std() == pytest.approx(expected, rel=0.05)


def test_blocks_do_not_depend_on_how_the_work_is_split_nor_on_the_threads():
    images = digits(2500, seed=9)
    settings = dict(rotation=10.0, scale=0.1, alpha=34.0, sigma=5.0)
    whole = distort.distort_blocks(images, [1, 2], **settings)
    assert not np.array_equal(whole, images)
    first = distort.distort_blocks(images[:1000], [1, 2], **settings)
    np.testing.assert_array_equal(whole[:1000], first)
    other = distort.distort_blocks(images, [1, 3], **settings)
    assert not np.array_equal(whole, other)
    threaded = distort.distort_blocks(images, [1, 2], workers=3, **settings)
    np.testing.assert_array_equal(whole, threaded)
