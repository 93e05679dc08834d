"""``python -m pipeline ensemble``: combine saved models by vote and by average
(:mod:`pipeline.evaluation.ensemble`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import cli
from pipeline.core.config import from_section, load_params
from pipeline.evaluation import ensemble
from pipeline.nn.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser("ensemble", ensemble.__doc__)
    parser.add_argument(
        "models",
        nargs="+",
        type=Path,
        metavar="MODEL_DIR",
        help="saved model directories (model.npz + architecture.json), two or more",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/prepared/test.npz"),
        help="labelled images to score (default: data/prepared/test.npz)",
    )
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--gallery",
        type=Path,
        metavar="PNG",
        help=f"draw the images the vote gets wrong (the first {ensemble.GALLERY_SIZE}) into this PNG",
    )
    parser.add_argument(
        "--test-time-shifts",
        type=int,
        default=0,
        metavar="K",
        help="beyond the book: each network answers by the mean of its probabilities over the "
        "image and its copies shifted by 1..K pixels (default 0: the image alone)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args):
        train_settings = from_section(TrainConfig, load_params(args.params), "train", source=args.params)
        result = ensemble.ensemble_models(
            model_dirs=args.models,
            data_path=args.data,
            out_path=args.out,
            gallery_path=args.gallery,
            engine=train_settings.engine,
            device=train_settings.device,
            test_time_shifts=args.test_time_shifts,
            progress=not args.no_progress,
        )
        print(ensemble.report(result))

    return cli.run(run, parser, argv)
