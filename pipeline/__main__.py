"""``python -m pipeline STAGE [options]``: run one stage of the pipeline (``dvc repro`` runs them all)."""

from __future__ import annotations

import importlib
import sys

from pipeline.core.config import PipelineError

# stage name -> (module, one-line summary); modules are imported only when their stage runs.
STAGES = {
    "download": ("pipeline.stages.download", "fetch the four MNIST files from the mirrors, verifying their sha256"),
    "prepare": (
        "pipeline.stages.prepare",
        "parse the IDX files and split 50,000 train / 10,000 validation / 10,000 test",
    ),
    "expand": ("pipeline.stages.expand", "expand the training set with the book's one-pixel shifts (250,000 images)"),
    "train": ("pipeline.stages.train", "train a network from params.yaml with mini-batch SGD"),
    "evaluate": ("pipeline.stages.evaluate", "evaluate a trained model on the test set"),
    "ensemble": (
        "pipeline.stages.ensemble",
        "combine saved models by plurality vote and averaged probabilities (not a dvc stage)",
    ),
    "table": (
        "pipeline.stages.table",
        "rerun the book's chapter 6 results table and ensemble (not a dvc stage; resumable)",
    ),
    "sweep": (
        "pipeline.stages.sweep",
        "train over params.yaml values: a grid, or an Optuna search; on Ray with --jobs/--ray (resumable)",
    ),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [
        "usage: python -m pipeline STAGE [--help] [options]",
        "",
        "Nielsen's network3.py (Neural Networks and Deep Learning, chapter 6) as a DVC pipeline.",
        "`dvc repro` runs every stage in order; each also runs on its own:",
        "",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in STAGES.items()]
    lines += ["", "`python -m pipeline STAGE --help` describes a stage's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"error: unknown stage {name!r}; stages: {', '.join(STAGES)}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(STAGES[name][0])
    except PipelineError as e:  # the environment lacks an engine: say so in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
