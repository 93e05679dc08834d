"""Evaluate the trained model on the test set, and add the results to the training's MLflow run.

Writes test accuracy and per-class accuracy (``data/metrics/evaluate.json``, for ``dvc metrics show``),
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

from pipeline import cli, tracking
from pipeline.config import PipelineError, from_section, load_params, require
from pipeline.expand import shift, shifts
from pipeline.files import load_npz, write_bytes, write_json
from pipeline.model_io import Model, load_model
from pipeline.plots import confusion_matrix, plot_confusion, plot_gallery


MAX_TEST_TIME_SHIFTS = 13  # as expand.max_shift: a 28x28 digit shifted 14 pixels is mostly gone


@dataclass(frozen=True)
class EvaluateConfig:
    gallery_size: int = 50  # misclassified digits shown, at most
    test_time_shifts: int = 0  # beyond the book: also answer from copies shifted by 1..k pixels; 0 is off

    def __post_init__(self):
        require(self.gallery_size >= 0, "evaluate.gallery_size", self.gallery_size, "must be >= 0")
        require(0 <= self.test_time_shifts <= MAX_TEST_TIME_SHIFTS, "evaluate.test_time_shifts",
                self.test_time_shifts, f"must be 0..{MAX_TEST_TIME_SHIFTS} pixels")


def shifted_probabilities(model: Model, images: np.ndarray, test_time_shifts: int) -> np.ndarray:
    """``model``'s class probabilities, float32 (N, 10), averaged over each image and its 4k copies
    moved by 1..k pixels down, up, right and left (k = ``test_time_shifts``; 0: the plain prediction).

    The expanded set trains the networks on every digit shifted by a pixel, so each copy is a fair
    view of it, and the mean evens out what one view gets wrong (on the real MNIST, k = 1
    raised the test accuracy of nine of ten batch-normalized networks: README)."""
    if not 0 <= test_time_shifts <= MAX_TEST_TIME_SHIFTS:
        raise PipelineError(f"Got test_time_shifts={test_time_shifts!r}: must be 0..{MAX_TEST_TIME_SHIFTS} pixels")
    images = np.asarray(images)
    square = images.reshape(len(images), 28, 28) if images.ndim == 2 and images.shape[1:] == (784,) else images
    total = model.predict_proba(images).astype(np.float64)  # (N, 10)
    for dy, dx in shifts(test_time_shifts):
        total += model.predict_proba(shift(square, dy, dx))
    return (total / (1 + 4 * test_time_shifts)).astype(np.float32)


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
) -> dict:
    """Score the model in ``model_dir`` on ``test_path``; returns the metrics written."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tracking_config = tracking_config or tracking.TrackingConfig(enabled=False)
    test = load_npz(test_path)
    images, actual = test["images"], test["labels"]
    run_id = tracking.load_run_reference(model_dir)

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
        plot_gallery(images[shown], actual[shown], predicted[shown], out_dir / "misclassified.png",
                     f"{len(shown)} of the {len(wrong)} misclassified test digits (true \u2192 predicted)")
        write_json(metrics_path, metrics)

        if run is not None:
            # tags, not params: evaluate re-runs alone on the same run when only its settings change,
            # and MLflow refuses to change a param's value
            run.set_tags({f"evaluate.{k}": v for k, v in asdict(config).items()})
            run.log_metrics({"test_accuracy": metrics["test_accuracy"], "test_errors": metrics["test_errors"]})
            run.log_metrics({f"test_accuracy_digit_{d}": a for d, a in metrics["per_class_accuracy"].items()})
            for name in ("confusion.png", "misclassified.png", "predictions.csv", "confusion.json"):
                run.log_artifact(out_dir / name, "evaluation")
            run.log_artifact(metrics_path, "evaluation")
    return metrics


def main(argv=None) -> int:
    parser = cli.stage_parser("evaluate", __doc__)
    parser.add_argument("--model", type=Path, default=Path("data/model"), help="trained model directory")
    parser.add_argument("--test", type=Path, default=Path("data/prepared/test.npz"), help="test set")
    parser.add_argument("--out", type=Path, default=Path("data/evaluate"), help="directory for plots and predictions")
    parser.add_argument("--metrics", type=Path, default=Path("data/metrics/evaluate.json"), help="metrics file")

    def run(args):
        params = load_params(args.params)
        config = from_section(EvaluateConfig, params, "evaluate", source=args.params)
        tracking_config = from_section(tracking.TrackingConfig, params, "tracking", source=args.params)
        metrics = evaluate(config=config, model_dir=args.model, test_path=args.test, out_dir=args.out,
                           metrics_path=args.metrics, tracking_config=tracking_config)
        print(f"test accuracy {100 * metrics['test_accuracy']:.2f}% ({metrics['test_errors']} errors)")

    return cli.run(run, parser, argv)
