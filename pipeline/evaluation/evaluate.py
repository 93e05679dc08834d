"""Evaluate the trained model on the test set, and add the results to the training's MLflow run.

Writes the test accuracy (``data/metrics/evaluate.json``, for ``dvc metrics show``), the accuracy
per digit (``data/evaluate/per_class_accuracy.json``),
one row per test image with its true and predicted digit (``data/evaluate/predictions.csv``, drawn by
``dvc plots show`` as a confusion matrix), the confusion matrix as a picture, and a gallery of the
misclassified test digits with their true and predicted labels, as the book shows its errors.

Beyond the book, ``evaluate.test_time_shifts`` k > 0 lets the network answer each test image by the
mean of its probabilities over the image and its 4k copies shifted by 1..k pixels, the copies the
expanded set trains on (:func:`shifted_probabilities`); it costs 4k + 1 predictions per image.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.core.config import require
from pipeline.core.files import write_bytes, write_json
from pipeline.data.expand import require_shift
from pipeline.data.splits import load_split
from pipeline.evaluation.plots import confusion_matrix, plot_confusion, plot_gallery
from pipeline.evaluation.shifts import shifted_probabilities
from pipeline.nn.model_io import load_model
from pipeline.tracking import registry

# the one column evaluate.json adds to `dvc exp show` (see pipeline.nn.outputs); the errors are the
# run's metric test_errors and the rows of predictions.csv that differ
METRICS_FILE_KEYS = ("test_accuracy",)


@dataclass(frozen=True)
class EvaluateConfig:
    gallery_size: int = 50  # misclassified digits shown, at most
    test_time_shifts: int = 0  # beyond the book: also answer from copies shifted by 1..k pixels; 0 is off

    def __post_init__(self):
        require(self.gallery_size >= 0, "evaluate.gallery_size", self.gallery_size, "must be >= 0")
        require_shift("evaluate.test_time_shifts", self.test_time_shifts)


def predictions_csv(actual: np.ndarray, predicted: np.ndarray) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows(zip(actual.tolist(), predicted.tolist()))
    return text.getvalue().encode()


def evaluate(
    *,
    config: EvaluateConfig,
    model_dir: Path,
    test_path: Path,
    out_dir: Path,
    metrics_path: Path,
    tracking_config: tracking.TrackingConfig | None = None,
    run_file: Path | None = None,
) -> dict:
    """Score the model in ``model_dir`` on ``test_path``; returns the metrics written.

    ``run_file``: the train stage's record of the model's MLflow run (``data/metrics/mlflow_run.json``),
    which evaluate continues; without it, evaluate opens a run of its own."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tracking_config = tracking_config or tracking.TrackingConfig(enabled=False)
    flat, actual = load_split(Path(test_path))  # checked: uint8 28x28 images, one digit 0-9 per image
    images = flat.reshape(-1, 28, 28)
    run_id = tracking.load_run_reference(run_file)

    with tracking.tracked_run(tracking_config, resume_run_id=run_id, run_name="evaluate") as run:
        model = load_model(model_dir)
        predicted = shifted_probabilities(model, images, config.test_time_shifts).argmax(axis=1)
        counts = confusion_matrix(actual, predicted)
        per_class = counts.diagonal() / np.maximum(counts.sum(axis=1), 1)
        wrong = np.flatnonzero(predicted != actual)
        metrics = {
            "test_accuracy": float(np.mean(predicted == actual)),
            "test_errors": int(len(wrong)),
            "test_time_shifts": config.test_time_shifts,
            "test_images": int(len(actual)),
            "per_class_accuracy": {str(digit): float(acc) for digit, acc in enumerate(per_class)},
        }

        write_bytes(out_dir / "predictions.csv", predictions_csv(actual, predicted))
        write_json(out_dir / "confusion.json", counts.tolist())
        title = f"test accuracy {100 * metrics['test_accuracy']:.2f}% ({len(wrong)} of {len(actual)} wrong)"
        plot_confusion(counts, out_dir / "confusion.png", title)
        shown = wrong[: config.gallery_size]
        plot_gallery(
            images[shown],
            actual[shown],
            predicted[shown],
            out_dir / "misclassified.png",
            f"{len(shown)} of the {len(wrong)} misclassified test digits (true \u2192 predicted)",
        )
        # evaluate.json: a few numbers (dvc metrics show, dvc exp show); the per-digit accuracy beside the plots
        write_json(metrics_path, {k: v for k, v in metrics.items() if k in METRICS_FILE_KEYS})
        write_json(out_dir / "per_class_accuracy.json", metrics["per_class_accuracy"])

        if run is not None:
            # tags, not params: evaluate re-runs alone on the same run when only its settings change,
            # and MLflow refuses to change a param's value
            run.set_tags({f"evaluate.{k}": v for k, v in asdict(config).items()})
            run.log_metrics({"test_accuracy": metrics["test_accuracy"], "test_errors": metrics["test_errors"]})
            run.log_metrics({f"test_accuracy_digit_{d}": a for d, a in metrics["per_class_accuracy"].items()})
            for name in (
                "confusion.png",
                "misclassified.png",
                "predictions.csv",
                "confusion.json",
                "per_class_accuracy.json",
            ):
                run.log_artifact(out_dir / name, "evaluation")
            run.log_artifact(metrics_path, "evaluation")
            if tracking_config.registered_model_name:
                registry.register(run, tracking_config.registered_model_name, metrics["test_accuracy"])
    return metrics
