"""``python -m pipeline expand``: the book's shifted training set (:mod:`pipeline.data.expand`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import cli
from pipeline.core.config import load_config
from pipeline.data import expand


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser("expand", expand.__doc__)
    parser.add_argument("--train", type=Path, default=Path("data/prepared/train.npz"), help="prepared training set")
    parser.add_argument("--out", type=Path, default=Path("data/expanded"), help="output directory")

    def run(args):
        config = load_config(expand.ExpandConfig, "expand", args.params)
        summary = expand.expand(config=config, train_path=args.train, out_dir=args.out)
        print(f"expanded {summary['source_count']} training images to {summary['count']}")

    return cli.run(run, parser, argv)
