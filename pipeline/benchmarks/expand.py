"""Benchmark the expand stage: vectorised shifts versus the book's per-image loop, side by side.

Goal (issue: foundation): the 250,000-image expansion in under 2 seconds on a 2-core machine.
The book's loop is timed on a subset and scaled up, since the full loop takes minutes.

    python -m pipeline.benchmarks.expand [--images 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from pipeline.data.expand import ExpandConfig, expand_arrays


def book_expand(images: np.ndarray, labels: np.ndarray, seed: int) -> list:
    """expand_mnist.py from the book, as it was (flattened images, np.roll, zeroed edge, shuffle)."""
    pairs = []
    for x, y in zip(images.reshape(len(images), -1), labels):
        pairs.append((x, y))
        image = np.reshape(x, (-1, 28))
        for d, axis, index_position, index in [
            (1, 0, "first", 0),
            (-1, 0, "first", 27),
            (1, 1, "last", 0),
            (-1, 1, "last", 27),
        ]:
            new_img = np.roll(image, d, axis)
            if index_position == "first":
                new_img[index, :] = np.zeros(28)
            else:
                new_img[:, index] = np.zeros(28)
            pairs.append((np.reshape(new_img, 784), y))
    random.Random(seed).shuffle(pairs)
    return pairs


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.expand",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=50_000, help="training images to expand (the book: 50,000)")
    parser.add_argument("--book-subset", type=int, default=5_000, help="images for timing the book's loop")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.uint8)
    config = ExpandConfig()

    ours = best_of(args.repeats, lambda: expand_arrays(images, labels, config))
    subset = min(args.book_subset, args.images)
    book = best_of(1, lambda: book_expand(images[:subset], labels[:subset], 0)) * args.images / subset

    out = args.images * config.copies_per_image
    print(f"expanding {args.images:,} images to {out:,} (best of {args.repeats})")
    print(f"  vectorised (ours):  {ours:8.3f} s   {out / ours:12,.0f} images/s")
    print(f"  book's loop:        {book:8.3f} s   {out / book:12,.0f} images/s   (timed on {subset:,}, scaled)")
    met = "met" if ours < 2 and out >= 250_000 else "NOT met"
    print(f"  speed-up: {book / ours:.1f}x;  goal < 2 s for 250,000: {met}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
