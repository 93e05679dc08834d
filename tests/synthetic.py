"""Small synthetic MNIST-format data, so tests run on a fresh machine without the real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.idx import write_idx
from pipeline.data.prepare import SOURCES

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def digit_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 uint8 images a network can learn: a bright 4x4 block whose position encodes the digit."""
    images = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = 4 + 6 * (label // 4), 4 + 6 * (label % 4)
        images[i, row : row + 4, col : col + 4] = 255
    return images


def write_mnist(directory: Path, n_train: int = 120, n_test: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four gzip IDX files under ``directory``; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, count in (("train", n_train), ("test", n_test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = digit_images(labels, rng)
        images_file, labels_file = SOURCES[name]
        write_idx(Path(directory) / images_file, images)
        write_idx(Path(directory) / labels_file, labels)
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = images, labels
    return arrays


def write_prepared(directory: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``train``/``validation``/``test`` .npz files in the prepared-data format, learnable in one epoch."""
    sizes = sizes or {"train": 600, "validation": 200, "test": 200}
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, count in sizes.items():
        labels = rng.integers(0, 10, count).astype(np.uint8)
        np.savez(directory / f"{name}.npz", images=digit_images(labels, rng), labels=labels)
    return directory


# a network that compiles and trains in seconds
TINY_NET = [
    {"type": "fully_connected", "n_in": 784, "n_out": 30, "activation": "sigmoid"},
    {"type": "softmax", "n_in": 30, "n_out": 10},
]


def stage_training_in(params: dict, prepared: Path, out: Path):
    """The train stage's training of ``params`` on the prepared set in ``prepared``, its model,
    checkpoints and metrics under ``out`` (``model/``, ``checkpoints/``, ``metrics/``), no progress bars
    (a ``pipeline.tracking.tracked.TrackedTraining``)."""
    from pipeline.tracking.tracked import stage_training  # here: a test of the data alone needs no MLflow

    return stage_training(
        params=params,
        prepared_dir=prepared,
        expanded_dir=None,
        model_dir=out / "model",
        checkpoint_dir=out / "checkpoints",
        metrics_dir=out / "metrics",
        progress=False,
    )


def stage_evaluation_in(root: Path, config, tracking_config=None) -> dict:
    """The evaluate stage on the model and prepared test set under ``root`` (``model/``,
    ``prepared/test.npz``), as the stage writes them: ``evaluate/``, ``metrics/evaluate.json``, and the
    run in ``metrics/mlflow_run.json`` when ``tracking_config`` (a ``TrackingConfig``) is given."""
    from pipeline.evaluation.evaluate import evaluate  # here: a test of the data alone needs no MLflow

    run = {"run_file": root / "metrics/mlflow_run.json", "tracking_config": tracking_config} if tracking_config else {}
    return evaluate(
        config=config,
        model_dir=root / "model",
        test_path=root / "prepared/test.npz",
        out_dir=root / "evaluate",
        metrics_path=root / "metrics/evaluate.json",
        **run,
    )
