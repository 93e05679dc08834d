"""Benchmark the table's ``--jobs``: N trainings at once as tasks of a local Ray instance (a GPU shared
``1/N`` each, with ``--device gpu``), against one at a time.

Trains ``--networks`` seeds of a table row's network and settings (default row 8: two conv layers,
FC 1000 twice, dropout) for ``--epochs`` epochs on a synthetic set of ``--images`` images (10,000
validation images scored every epoch, as in the table), first one at a time (``--jobs 1``), then
``--jobs`` at once, with the table's own code: the same worker processes, compilation cache and
GPU memory setting. Each mode starts with an empty compilation cache, as a fresh table does, and
compiling counts, as it does there. Prints the wall time of both and the speed-up. The settings
come from ``--params`` (``train.engine``, ``train.device``) unless ``--device`` is given.

    python -m pipeline.benchmarks.jobs                          # row 8, 4 networks, 2 epochs, 250,000 images
    python -m pipeline.benchmarks.jobs --device gpu --jobs 4    # what --jobs buys on a GPU
    python -m pipeline.benchmarks.jobs --row 3 --networks 2 --jobs 2 --images 50000

On the project's 2-core CPU one training already keeps both cores busy, so expect about 1x there.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cluster.config import ClusterConfig
from pipeline.core.config import PipelineError, from_section, load_params
from pipeline.core.files import save_npz
from pipeline.nn.backend import Backend
from pipeline.nn.config import TrainConfig
from pipeline.table.config import TableConfig
from pipeline.table.datasets import Data
from pipeline.table.jobs import Job, JobContext, train_jobs
from pipeline.table.rows import BY_KEY, ROWS, Row, train_config


def synthetic_set(path: Path, n: int, rng: np.random.Generator) -> None:
    """``n`` learnable 28x28 images: a fixed random pattern per digit plus noise, uint8."""
    patterns = np.random.default_rng(0).integers(0, 256, (10, 28, 28))  # the same patterns in every set
    labels = rng.integers(0, 10, n).astype(np.uint8)
    noise = rng.integers(0, 96, (n, 28, 28))
    images = np.clip(0.6 * patterns[labels] + noise, 0, 255).astype(np.uint8)  # (n, 28, 28)
    save_npz(path, images=images, labels=labels)


def make_data(root: Path, images: int) -> Data:
    rng = np.random.default_rng(1)
    for name, n in (
        ("prepared/train", images),
        ("prepared/validation", 10_000),
        ("prepared/test", 10_000),
        ("expanded/train", images),
    ):
        synthetic_set(root / f"{name}.npz", n, rng)
    return Data(root / "prepared", root / "expanded", root / "prepared" / "test.npz")


def _cluster(jobs: int, device: str) -> ClusterConfig:
    """``jobs`` at once; on a GPU each asks Ray for its share of the one GPU (0.25 for four)."""
    return ClusterConfig(jobs=jobs, gpus_per_training=round(1 / jobs, 4) if device == "gpu" and jobs > 1 else 0.0)


def run_mode(
    row: Row, *, networks: int, jobs: int, epochs: int, data: Data, out: Path, engine: str, device: str
) -> float:
    """Wall seconds to train ``networks`` seeds of ``row``, ``jobs`` at a time, from an empty cache."""
    todo = []
    for seed in range(1, networks + 1):
        config = train_config(row, seed, quick=False, engine=engine, device=device, steps_per_call=500)
        config = dataclasses.replace(config, epochs=epochs)
        todo.append(Job(row.key, seed, networks, config, f"benchmark-{seed}", out / f"seed{seed}", data))
    table = TableConfig(keys=(row.key,), engine=engine, device=device, cluster=_cluster(jobs, device), progress=False)
    context = JobContext(table, code="benchmark", parent_id=None)
    start = time.perf_counter()  # the driver opens the cache, in this process or for its workers
    finished = list(train_jobs(todo, context, cache_dir=out / ".jax-cache"))
    seconds = time.perf_counter() - start
    if len(finished) != networks:
        raise PipelineError(f"--jobs {jobs}: {len(finished)} of {networks} trainings finished")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.jobs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--row", default="8", help="the table row whose network and settings are trained (default 8)")
    parser.add_argument("--networks", type=int, default=4, help="seeds trained in each mode (default 4)")
    parser.add_argument("--jobs", type=int, default=None, help="trainings at once (default: --networks)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per training (default 2)")
    parser.add_argument("--images", type=int, default=250_000, help="training images (default 250,000, row 8's)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: train.device of --params")
    parser.add_argument("--params", default="params.yaml", help="params file for train.engine and train.device")
    args = parser.parse_args(argv)
    jobs = args.networks if args.jobs is None else args.jobs
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        if args.row not in BY_KEY or BY_KEY[args.row].is_ensemble:
            raise PipelineError(
                f"Got --row {args.row!r}: not a training row of the table "
                f"({', '.join(r.key for r in ROWS if not r.is_ensemble)})"
            )
        for name, value, least in (
            ("--networks", args.networks, 1),
            ("--jobs", jobs, 2),
            ("--epochs", args.epochs, 1),
            ("--images", args.images, 10),
        ):
            if value < least:
                raise PipelineError(f"Got {name} {value}: must be at least {least}")
        settings = from_section(TrainConfig, load_params(args.params), "train", source=args.params)
        engine, device = settings.engine, args.device or settings.device
        Backend(engine, device)  # a missing GPU or engine is named now, before the data and the workers
        row = BY_KEY[args.row]
        with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
            tmp = Path(tmp)
            data = make_data(tmp / "data", args.images)
            print(
                f"row {row.key} ({row.description}): {args.networks} networks x {args.epochs} epochs on "
                f"{args.images:,} synthetic images, {engine} on {device}",
                flush=True,
            )
            one = run_mode(
                row,
                networks=args.networks,
                jobs=1,
                epochs=args.epochs,
                data=data,
                out=tmp / "one",
                engine=engine,
                device=device,
            )
            print(f"  one at a time (--jobs 1): {one:9.1f} s", flush=True)
            many = run_mode(
                row,
                networks=args.networks,
                jobs=jobs,
                epochs=args.epochs,
                data=data,
                out=tmp / "many",
                engine=engine,
                device=device,
            )
            print(f"  {jobs} at once (--jobs {jobs}):   {many:9.1f} s")
            print(f"  speed-up: {one / many:.2f}x")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
