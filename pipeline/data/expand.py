"""Expand the training set as the book's expand_mnist.py does, plus optional extras.

The book keeps every training image and adds four copies shifted by one pixel -- down, up, right,
left -- with the vacated row or column filled with zeros (not wrapped around): 50,000 images become
250,000, shuffled. Beyond the book, off by default: shifts of 2..``max_shift`` pixels as well, and
``elastic_copies`` elastically distorted copies per image (Simard, Steinkraus and Platt, 2003:
a random displacement field, smoothed by a Gaussian of width ``elastic_sigma`` and scaled by
``elastic_alpha``, moves each pixel). Validation and test data are never expanded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import require
from pipeline.core.files import save_npz, write_json
from pipeline.data.distort import elastic
from pipeline.data.splits import load_split

ELASTIC_CHUNK = 2_000  # images distorted at once: bounds the float64 temporaries to some 50 MB
MAX_SHIFT = 13  # pixels: a 28x28 digit moved 14 pixels is mostly gone


def require_shift(key: str, value: int) -> None:
    """Refuse a shift distance outside 0..MAX_SHIFT, naming the setting it came from."""
    require(0 <= value <= MAX_SHIFT, key, value, f"must be 0..{MAX_SHIFT} pixels")


@dataclass(frozen=True)
class ExpandConfig:
    seed: int = 12345
    max_shift: int = 1
    elastic_copies: int = 0
    elastic_alpha: float = 34.0
    elastic_sigma: float = 4.0

    def __post_init__(self):
        require_shift("expand.max_shift", self.max_shift)
        require(self.elastic_copies >= 0, "expand.elastic_copies", self.elastic_copies, "must be >= 0")
        require(self.elastic_alpha >= 0, "expand.elastic_alpha", self.elastic_alpha, "must be >= 0")
        require(self.elastic_sigma > 0, "expand.elastic_sigma", self.elastic_sigma, "must be > 0")

    @property
    def copies_per_image(self) -> int:
        """The original, four shifts per distance, and the elastic copies."""
        return 1 + 4 * self.max_shift + self.elastic_copies


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move every image ``dy`` pixels down and ``dx`` right, filling the vacated pixels with zeros."""
    n, rows, cols = images.shape
    out = np.zeros_like(images)
    # destination and source windows along each axis; a negative shift moves up/left
    out[:, max(dy, 0) : rows + min(dy, 0), max(dx, 0) : cols + min(dx, 0)] = images[
        :, max(-dy, 0) : rows + min(-dy, 0), max(-dx, 0) : cols + min(-dx, 0)
    ]
    return out


def shifts(max_shift: int) -> list[tuple[int, int]]:
    """(dy, dx) in the book's order -- down, up, right, left -- for each distance 1..max_shift."""
    return [move for d in range(1, max_shift + 1) for move in ((d, 0), (-d, 0), (0, d), (0, -d))]


def expand_arrays(
    images: np.ndarray, labels: np.ndarray, config: ExpandConfig, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """All copies of every image, shuffled; deterministic for a given ``config.seed``."""
    n = len(images)
    shuffle_rng, elastic_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(2))
    blocks = [images] + [shift(images, dy, dx) for dy, dx in shifts(config.max_shift)]
    for _ in tqdm(
        range(config.elastic_copies), desc="elastic copies", disable=not progress or not config.elastic_copies
    ):
        chunks = [
            elastic(images[i : i + ELASTIC_CHUNK], elastic_rng, config.elastic_alpha, config.elastic_sigma)
            for i in range(0, n, ELASTIC_CHUNK)
        ]
        blocks.append(np.concatenate(chunks))
    order = shuffle_rng.permutation(n * len(blocks))
    # write each block straight to its shuffled positions: one pass, no second full-size copy
    out_images = np.empty((n * len(blocks),) + images.shape[1:], dtype=images.dtype)
    for b, block in enumerate(blocks):
        out_images[order[b * n : (b + 1) * n]] = block
    out_labels = np.empty(n * len(blocks), dtype=labels.dtype)
    out_labels[order] = np.tile(labels, len(blocks))
    return out_images, out_labels


def expand(*, config: ExpandConfig, train_path: Path, out_dir: Path, progress: bool = True) -> dict:
    """Read the prepared training set, write the expanded one to ``out_dir/train.npz``."""
    source_images, source_labels = load_split(Path(train_path))  # checked: uint8 28x28 images, digit labels
    images, labels = expand_arrays(source_images.reshape(-1, 28, 28), source_labels, config, progress=progress)
    save_npz(Path(out_dir) / "train.npz", images=images, labels=labels)
    summary = {"count": int(len(labels)), "source_count": int(len(source_labels)), "config": asdict(config)}
    write_json(Path(out_dir) / "summary.json", summary)
    return summary
