"""Parse the MNIST IDX files and split them as the book does.

The 60,000 MNIST training images are split into the first ``train_size`` (the book: 50,000) for
training and the last ``validation_size`` (10,000) for validation; the 10,000 test images stay the
test set. Each split is written as ``<split>.npz`` with ``images`` (uint8, N x 28 x 28) and
``labels`` (uint8, N), plus ``summary.json`` with the counts per split and per digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import ConfigError, PipelineError, require
from pipeline.core.files import save_npz, write_json
from pipeline.data.idx import read_pair

# (images file, labels file) of each MNIST set, as the download stage names them
SOURCES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class PrepareConfig:
    train_size: int = 50_000
    validation_size: int = 10_000

    def __post_init__(self):
        require(self.train_size > 0, "prepare.train_size", self.train_size, "must be positive")
        require(self.validation_size > 0, "prepare.validation_size", self.validation_size, "must be positive")


def split(images: np.ndarray, labels: np.ndarray, config: PrepareConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first ``train_size`` images train, the last ``validation_size`` validate; no overlap."""
    n = len(images)
    if config.train_size + config.validation_size > n:
        raise ConfigError(
            f"Got prepare.train_size={config.train_size} + prepare.validation_size={config.validation_size} "
            f"= {config.train_size + config.validation_size}: more than the {n} training images"
        )
    return {
        "train": (images[: config.train_size], labels[: config.train_size]),
        "validation": (images[n - config.validation_size :], labels[n - config.validation_size :]),
    }


def prepare(*, config: PrepareConfig, raw_dir: Path, out_dir: Path) -> dict:
    """Read the IDX files in ``raw_dir``, write ``train``/``validation``/``test`` .npz to ``out_dir``."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    missing = [name for pair in SOURCES.values() for name in pair if not (raw_dir / name).is_file()]
    if missing:
        raise PipelineError(f"{raw_dir}: missing {', '.join(missing)} (run `python -m pipeline download` first)")
    train_images, train_labels = read_pair(*(raw_dir / name for name in SOURCES["train"]))
    splits = split(train_images, train_labels, config)
    splits["test"] = read_pair(*(raw_dir / name for name in SOURCES["test"]))

    summary = {}
    for name, (images, labels) in splits.items():
        save_npz(out_dir / f"{name}.npz", images=images, labels=labels)
        summary[name] = {
            "count": int(len(labels)),
            "label_counts": np.bincount(labels, minlength=10).tolist(),
        }
    write_json(out_dir / "summary.json", summary)
    return summary
