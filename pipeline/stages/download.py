"""``python -m pipeline download``: fetch and verify the four MNIST files (:mod:`pipeline.data.download`)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core import cli
from pipeline.core.config import load_config
from pipeline.data import download


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser("download", download.__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path("data/raw"), help="directory for the .gz files (default: data/raw)"
    )

    def run(args):
        config = load_config(download.DownloadConfig, "download", args.params)
        download.download(config=config, out_dir=args.out, env_mirror=os.environ.get("MNIST_MIRROR"))

    return cli.run(run, parser, argv)
