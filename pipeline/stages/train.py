"""``python -m pipeline train``: train the network of params.yaml, tracked by MLflow
(:mod:`pipeline.nn.fit`, :mod:`pipeline.tracking.tracked`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import cli
from pipeline.core.config import load_params
from pipeline.nn import fit
from pipeline.nn.architecture import PRESETS
from pipeline.tracking.tracked import stage_training, train_tracked


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser("train", fit.__doc__)
    parser.epilog = f"train.architecture presets (the book's networks): {', '.join(PRESETS)}"
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="prepared data directory")
    parser.add_argument("--expanded", type=Path, default=Path("data/expanded"), help="expanded data directory")
    parser.add_argument("--model", type=Path, default=Path("data/model"), help="output directory for the model")
    parser.add_argument("--checkpoints", type=Path, default=Path("data/checkpoints/train"), help="checkpoint directory")
    parser.add_argument(
        "--metrics", type=Path, default=Path("data/metrics"), help="directory for train.json and train_epochs.csv"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args):
        job = stage_training(
            params=load_params(args.params),
            source=str(args.params),
            prepared_dir=args.prepared,
            expanded_dir=args.expanded,
            model_dir=args.model,
            checkpoint_dir=args.checkpoints,
            metrics_dir=args.metrics,
            progress=not args.no_progress,
        )
        summary = train_tracked(job)
        print(
            f"best validation accuracy {100 * summary['best_validation_accuracy']:.2f}% at epoch "
            f"{summary['best_epoch']} of {summary['epochs_run']} ({summary['stopped']}); "
            f"{summary['images_per_second']} images/s"
        )

    return cli.run(run, parser, argv)
