"""The data format every stage after ``prepare`` reads: ``.npz`` files of uint8 ``images`` (N, 28, 28)
and ``labels`` (N,), checked on load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.config import PipelineError
from pipeline.core.files import load_npz
from pipeline.data.idx import not_digits


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 784) and labels uint8 (N,) from a data-format .npz."""
    if not path.is_file():
        raise PipelineError(f"{path} not found (run the prepare/expand stages first: dvc repro)")
    arrays = load_npz(path)
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is None or labels is None:
        raise PipelineError(f"{path}: expected arrays 'images' and 'labels', found {sorted(arrays)}")
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise PipelineError(f"{path}: images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise PipelineError(f"{path}: one label per image, shape ({len(images)},), got shape {labels.shape}")
    # uint8 below, so a -1 or a 3.7 would silently become a 255 or a 3
    if labels.dtype.kind not in "iu":
        raise PipelineError(f"{path}: labels must be integer digits 0-9, got dtype {labels.dtype}")
    if why := not_digits(labels):
        raise PipelineError(f"{path}: {why}")
    return images.reshape(len(images), 784), labels.astype(np.uint8, copy=False)
