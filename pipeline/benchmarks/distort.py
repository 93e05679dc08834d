"""Benchmark the distortions: pipeline.data.distort versus the SciPy recipe it replaced, side by side.

The train stage's ``train.distort_*`` distorts every training image every epoch, so an epoch of
the 250,000-image set costs that many distortions on top of its training. This prints the time
of the elastic distortion both ways (same images, same draws, same bytes out), the ratio, and
the time of the full distortion (rotation, scaling, elastic) per 250,000 images, in one thread (as the
train stage on the CPU, where training takes the cores) and in one per core (beside a GPU).

    python -m pipeline.benchmarks.distort [--images 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from scipy import ndimage

from pipeline.benchmarks.expand import best_of
from pipeline.data import distort
from pipeline.table.rows import DISTORT_SETTINGS


def scipy_elastic(images: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """The expand stage's first elastic distortion: gaussian_filter and map_coordinates."""
    n = len(images)
    field = rng.uniform(-1.0, 1.0, size=(2, n, 28, 28))
    field = ndimage.gaussian_filter(field, sigma=(0, 0, sigma, sigma), mode="constant") * alpha
    index, y, x = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    warped = ndimage.map_coordinates(
        images.astype(np.float32), [index, y + field[0], x + field[1]], order=1, mode="constant", cval=0.0
    )
    return np.clip(np.rint(warped), 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="synthetic 28x28 images to distort")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    images = np.zeros((args.images, 28, 28), dtype=np.uint8)
    images[:, 4:24, 4:24] = (rng.random((args.images, 20, 20)) > 0.6) * 255
    chunk = 2_000  # the expand stage's ELASTIC_CHUNK, for both

    def by_chunks(fn):
        generator = np.random.default_rng(1)
        return np.concatenate([fn(images[i : i + chunk], generator, 34.0, 4.0) for i in range(0, len(images), chunk)])

    old = best_of(args.repeats, lambda: by_chunks(scipy_elastic))
    new = best_of(args.repeats, lambda: by_chunks(distort.elastic))
    same = np.array_equal(by_chunks(scipy_elastic), by_chunks(distort.elastic))
    settings = {
        key.removeprefix("distort_"): value for key, value in DISTORT_SETTINGS.items() if key.startswith("distort_")
    }
    full = best_of(args.repeats, lambda: distort.distort_blocks(images, [1], **settings))
    threads = os.cpu_count() or 1
    threaded = best_of(args.repeats, lambda: distort.distort_blocks(images, [1], workers=threads, **settings))
    per_epoch = full * 250_000 / args.images
    print(
        f"elastic, {args.images} images: scipy recipe {old:.2f} s, pipeline.data.distort {new:.2f} s: "
        f"{old / new:.1f}x faster; same bytes: {same}"
    )
    print(
        f"rotation + scaling + elastic ({settings}): {full:.2f} s for {args.images} images, "
        f"{per_epoch:.1f} s per 250,000-image epoch; in {threads} threads {threaded:.2f} s ({full / threaded:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
