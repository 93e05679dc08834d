"""What every stage's command line shares: the parser, ``--params``, logging and error reporting."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pipeline.core.config import DEFAULT_PARAMS, PipelineError


def stage_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser for ``python -m pipeline NAME`` whose help is the stage module's docstring."""
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params", default=DEFAULT_PARAMS, metavar="FILE", help=f"params file to read (default: {DEFAULT_PARAMS})"
    )
    return parser


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``main``; a PipelineError becomes one clear line and exit status 1."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        main(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
