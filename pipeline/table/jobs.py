"""The table's trainings: one (row, seed) trained as a child run of the table's MLflow run and scored
on the test set, one at a time or ``--jobs`` at once, each in its own process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.config import PipelineError
from pipeline.core.files import save_npz, write_json
from pipeline.data.expand import ExpandConfig
from pipeline.data.splits import load_split
from pipeline.nn.config import TrainConfig, TrainPaths
from pipeline.nn.model_io import load_model
from pipeline.table.cache import PROBABILITIES_FILE, RESULT_FILE, jax_compilation_cache
from pipeline.table.data import Data
from pipeline.table.report import pct
from pipeline.table.rows import BY_KEY
from pipeline.tracking import store as tracking
from pipeline.tracking.training import TrackedTraining, train_tracked

if TYPE_CHECKING:
    from pipeline.table.runner import TableRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One (row, seed) to train."""

    row: str
    seed: int
    of: int  # the row's seed count, for the log
    config: TrainConfig
    key: str
    seed_dir: Path
    data: Data  # the row's data (see row_data)


def train_jobs(
    todo: list[Job], table: TableRun, *, test: dict, code: str, parent_id: str | None, cache_dir: Path
) -> Iterator:
    """Train every job, ``table.jobs`` at a time; yields (job, result) as each finishes."""
    if table.jobs == 1 or len(todo) <= 1:
        for job in todo:
            log.info("row %s (%s), seed %d of %d", job.row, BY_KEY[job.row].description, job.seed, job.of)
            yield job, train_one(job, table, test=test, code=code, parent_id=parent_id)
        return
    # Each JAX process would otherwise take 75% of the GPU's memory at its start, and the second one fail.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # spawn: a fork would copy this process's JAX runtime and its threads, which JAX does not support
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(table.jobs, len(todo)), mp_context=context) as pool:
        running = {}
        for job in todo:
            log.info("row %s (%s), seed %d of %d: started", job.row, BY_KEY[job.row].description, job.seed, job.of)
            running[pool.submit(_train_in_process, job, table, code=code, parent_id=parent_id, cache_dir=cache_dir)] = (
                job
            )
        try:
            for future in concurrent.futures.as_completed(running):
                job = running[future]
                result = future.result()
                log.info("row %s, seed %d: done, test accuracy %s", job.row, job.seed, pct(result["test_accuracy"]))
                yield job, result
        except BaseException:
            for future in running:  # the trainings not started yet; those running finish their epoch's checkpoint
                future.cancel()
            raise


def _train_in_process(job: Job, table: TableRun, *, code: str, parent_id: str | None, cache_dir: Path) -> dict:
    """``train_one`` in a worker process of ``--jobs``: its own logging, test set and compilation cache."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(levelname)s %(name)s [row {job.row} seed {job.seed}]: %(message)s",
    )
    test_images, test_labels = load_split(job.data.test)
    cache = jax_compilation_cache(cache_dir) if job.config.engine == "jax" else contextlib.nullcontext()
    with cache:
        return train_one(
            job,
            dataclasses.replace(table, progress=False),
            test={"images": test_images, "labels": test_labels},
            code=code,
            parent_id=parent_id,
        )


def train_one(job: Job, table: TableRun, *, test: dict, code: str, parent_id: str | None) -> dict:
    """Train (or resume) one network, score it on the test set, write its result.json last."""
    start = time.perf_counter()
    training = _tracked_training(job, table, parent_id)
    config, scores = job.config, {}

    def score_test_set(run, summary):
        model = load_model(training.paths.model, engine=config.engine, device=config.device)
        probabilities = model.predict_proba(test["images"])
        scores["test_accuracy"] = float(np.mean(probabilities.argmax(axis=1) == test["labels"]))
        save_npz(job.seed_dir / PROBABILITIES_FILE, probabilities=probabilities)
        if run is not None:
            run.log_metrics({"test_accuracy": scores["test_accuracy"]})

    try:
        summary = train_tracked(training, after=score_test_set)
    except PipelineError as e:
        raise PipelineError(f"row {job.row}, seed {job.seed}: {e}") from None
    result = {
        "row": job.row,
        "seed": job.seed,
        "key": job.key,
        "settings": dataclasses.asdict(config),
        "best_validation_accuracy": summary["best_validation_accuracy"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "stopped": summary["stopped"],
        "test_accuracy": scores["test_accuracy"],
        # a resumed training adds its earlier epochs' time: the figure is the whole training's
        "seconds": round(time.perf_counter() - start + _earlier_seconds(summary), 1),
        "train_seconds": summary["seconds"],
        "engine": summary["engine"],
        "device": summary["device"],
        "run_id": summary["run_id"],
        "code": code,
    }
    write_json(job.seed_dir / RESULT_FILE, result)
    return result


def _tracked_training(job: Job, table: TableRun, parent_id: str | None) -> TrackedTraining:
    """A (row, seed)'s training, a child run of the table's run (tags row and seed)."""
    row, config = BY_KEY[job.row], job.config
    preset = row.preset if isinstance(row.preset, str) else "custom"  # a row's own list of layers
    tags = {
        "table": "chapter6",
        "row": row.key,
        "seed": job.seed,
        "preset": preset,
        "dataset": config.dataset,
        "engine": config.engine,
        "device": config.device,
        "quick": table.quick,
        "stage": "table",
    }
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id  # MLflow shows the run nested under the table's run
    params = {
        **tracking.flatten({"train": dataclasses.asdict(config)}),
        "table.row": row.key,
        "table.seed": job.seed,
        "table.quick": table.quick,
    }
    if row.expand:  # the row's own training set
        params.update(tracking.flatten({"expand": dataclasses.asdict(ExpandConfig(**row.expand))}))
    paths = TrainPaths.of(
        config,
        prepared=job.data.prepared,
        expanded=job.data.expanded,
        model=job.seed_dir / "model",
        checkpoints=job.seed_dir / "checkpoints",
        metrics=job.seed_dir / "metrics",
    )
    return TrackedTraining(
        config=config,
        paths=paths,
        tracking=table.tracking,
        run_name=f"row{row.key}-seed{job.seed}",
        run_key=job.key,
        tags=tags,
        params=params,
        progress=table.progress,
    )


def _earlier_seconds(summary: dict) -> float:
    return sum(r["seconds"] for r in summary["history"][: summary["resumed_from_epoch"]])
