"""``python -m pipeline evaluate``: score the trained model on the test set (:mod:`pipeline.evaluation.evaluate`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import cli
from pipeline.core.config import from_section, load_params
from pipeline.evaluation import evaluate
from pipeline.tracking import TrackingConfig


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser("evaluate", evaluate.__doc__)
    parser.add_argument("--model", type=Path, default=Path("data/model"), help="trained model directory")
    parser.add_argument("--test", type=Path, default=Path("data/prepared/test.npz"), help="test set")
    parser.add_argument("--out", type=Path, default=Path("data/evaluate"), help="directory for plots and predictions")
    parser.add_argument("--metrics", type=Path, default=Path("data/metrics/evaluate.json"), help="metrics file")
    parser.add_argument(
        "--run-file",
        type=Path,
        default=Path("data/metrics/mlflow_run.json"),
        help="the train stage's record of the model's MLflow run, which evaluate continues",
    )

    def run(args):
        params = load_params(args.params)
        metrics = evaluate.evaluate(
            config=from_section(evaluate.EvaluateConfig, params, "evaluate", source=args.params),
            tracking_config=from_section(TrackingConfig, params, "tracking", source=args.params),
            model_dir=args.model,
            test_path=args.test,
            out_dir=args.out,
            metrics_path=args.metrics,
            run_file=args.run_file,
        )
        print(f"test accuracy {100 * metrics['test_accuracy']:.2f}% ({metrics['test_errors']} errors)")

    return cli.run(run, parser, argv)
