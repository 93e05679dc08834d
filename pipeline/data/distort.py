"""Random distortions of digit images: rotation, scaling and elastic deformation.

Beyond the book. Simard, Steinkraus and Platt (2003) and Ciresan et al. (2010, 2012) trained on
images distorted afresh every epoch: a random affine map (rotation and scaling about the centre)
followed by an elastic deformation (a random displacement field in [-1, 1], smoothed by a Gaussian
of width ``sigma`` and scaled by ``alpha`` pixels). The expand stage uses the elastic part for its
fixed copies; the train stage distorts every training image every epoch (``train.distort_*``).

Everything is vectorised NumPy so that 250,000 images take seconds, not minutes: the
Gaussian smoothing is a matrix product with a banded matrix (the same sums as
``scipy.ndimage.gaussian_filter`` with mode "constant"), and the bilinear sampling gathers the four
neighbours of every target pixel at once; a pixel whose source point lies outside the image is 0
(as ``scipy.ndimage.map_coordinates(order=1, mode="constant")``, which the expand stage used first).
"""

from __future__ import annotations

import concurrent.futures
import functools

import numpy as np

SIDE = 28
CENTRE = (SIDE - 1) / 2
BLOCK = 1_000  # images distorted at once (bounds the float64 temporaries to some 60 MB)


@functools.lru_cache(maxsize=8)
def gaussian_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(size, size) matrix G with G @ v = a 1-D Gaussian filter of v, zeros outside (ndimage's kernel)."""
    radius = int(truncate * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    offsets = np.arange(size)[None, :] - np.arange(size)[:, None]  # column minus row
    inside = np.abs(offsets) <= radius
    matrix = np.where(inside, kernel[np.clip(offsets + radius, 0, 2 * radius)], 0.0)
    matrix.flags.writeable = False
    return matrix


def smooth_fields(fields: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth each (SIDE, SIDE) field of ``fields`` (..., SIDE, SIDE) along both image axes."""
    g = gaussian_matrix(fields.shape[-1], float(sigma))
    return g @ fields @ g.T


def elastic_displacements(rng: np.random.Generator, n: int, alpha: float, sigma: float) -> np.ndarray:
    """(2, n, SIDE, SIDE) displacements (dy, dx) in pixels: uniform [-1, 1], smoothed, times ``alpha``."""
    fields = rng.uniform(-1.0, 1.0, size=(2, n, SIDE, SIDE))
    return smooth_fields(fields, sigma) * alpha


def bilinear(images: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample each image (n, SIDE, SIDE) at its own coordinates y, x (n, SIDE, SIDE); a point outside
    [0, SIDE - 1] on either axis reads 0."""
    n = len(images)
    flat = images.reshape(-1).astype(np.float64)
    inside = (y >= 0) & (y <= SIDE - 1) & (x >= 0) & (x <= SIDE - 1)
    y0, x0 = np.floor(y), np.floor(x)
    wy, wx = y - y0, x - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    base = (np.arange(n) * SIDE * SIDE)[:, None, None]
    out = np.zeros(y.shape, dtype=np.float64)
    for dy, weight_y in ((0, 1 - wy), (1, wy)):
        for dx, weight_x in ((0, 1 - wx), (1, wx)):
            # a neighbour past the last row or column has weight 0 (the point is on the edge)
            index = base + np.minimum(y0 + dy, SIDE - 1) * SIDE + np.minimum(x0 + dx, SIDE - 1)
            out += flat[np.where(inside, index, 0)] * (weight_y * weight_x)
    return np.where(inside, out, 0.0)


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def elastic(images: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """One elastic distortion of each uint8 image (n, SIDE, SIDE)."""
    n = len(images)
    dy, dx = elastic_displacements(rng, n, alpha, sigma)
    grid_y, grid_x = np.mgrid[0:SIDE, 0:SIDE]
    # rounded to float32 first, as the expand stage's first recipe (map_coordinates on float32 images)
    # returned it: a value just off a half grey level would otherwise round the other way
    return to_uint8(bilinear(images, grid_y + dy, grid_x + dx).astype(np.float32))


def distort(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    rotation: float = 0.0,
    scale: float = 0.0,
    alpha: float = 0.0,
    sigma: float = 4.0,
) -> np.ndarray:
    """A fresh random distortion of each uint8 image (n, SIDE, SIDE) or (n, SIDE * SIDE), same shape back.

    Each image is rotated by an angle uniform in [-rotation, rotation] degrees and scaled by a
    factor uniform in [1 - scale, 1 + scale] about its centre, then deformed elastically (``alpha``
    pixels, 0 for none). Draws, in this order and all from ``rng``: angles, scales, fields.
    """
    shape = images.shape
    images = images.reshape(-1, SIDE, SIDE)
    n = len(images)
    angle = np.deg2rad(rng.uniform(-rotation, rotation, size=n))[:, None, None]
    factor = rng.uniform(1 - scale, 1 + scale, size=n)[:, None, None]
    grid_y, grid_x = np.mgrid[0:SIDE, 0:SIDE] - CENTRE  # (SIDE, SIDE) each, about the centre
    # each target pixel reads from the source point that the inverse map sends it to
    cos, sin = np.cos(angle) / factor, np.sin(angle) / factor
    y = CENTRE + cos * grid_y - sin * grid_x  # (n, SIDE, SIDE)
    x = CENTRE + sin * grid_y + cos * grid_x
    if alpha:
        dy, dx = elastic_displacements(rng, n, alpha, sigma)
        y, x = y + dy, x + dx
    return to_uint8(bilinear(images, y, x)).reshape(shape)


def distort_blocks(images: np.ndarray, seed: list[int], *, workers: int = 1, **settings) -> np.ndarray:
    """:func:`distort` every image, in blocks of BLOCK with generator ``seed + [block]`` each, so the
    result does not depend on how a caller splits the work, nor on ``workers``: the number of
    threads (NumPy releases the GIL in the heavy loops, so they run in parallel)."""
    out = np.empty_like(images)

    def block(b: int) -> None:
        start = b * BLOCK
        rng = np.random.default_rng([*seed, b])
        out[start : start + BLOCK] = distort(images[start : start + BLOCK], rng, **settings)

    blocks = range(-(-len(images) // BLOCK))
    if workers == 1:
        for b in blocks:
            block(b)
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(block, blocks))  # list(): re-raise a block's exception here
    return out
