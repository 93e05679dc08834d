"""``python -m pipeline prepare``: the book's 50,000 / 10,000 / 10,000 split (:mod:`pipeline.data.prepare`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import cli
from pipeline.core.config import load_config
from pipeline.data import prepare


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser("prepare", prepare.__doc__)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="directory with the four IDX .gz files")
    parser.add_argument("--out", type=Path, default=Path("data/prepared"), help="output directory")

    def run(args):
        config = load_config(prepare.PrepareConfig, "prepare", args.params)
        summary = prepare.prepare(config=config, raw_dir=args.raw, out_dir=args.out)
        for name, info in summary.items():
            print(f"{name:>10}: {info['count']:>6} images, per digit {info['label_counts']}")

    return cli.run(run, parser, argv)
