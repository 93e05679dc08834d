"""The table's trainings: one (row, seed) trained as a child run of the table's MLflow run and scored
on the test set; one at a time in this process, or side by side as Ray tasks (``--jobs N`` on this
machine, ``--ray ADDRESS`` on a cluster: :mod:`pipeline.cluster`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from pipeline import tracking
from pipeline.cluster.driver import RESULT_FILE, Driver, Place, Training, in_process, run_trainings
from pipeline.cluster.node import TASK_TAG, node_tags
from pipeline.core.config import PipelineError
from pipeline.core.files import save_npz, write_json
from pipeline.data.expand import ExpandConfig
from pipeline.data.splits import load_split
from pipeline.nn.config import TrainConfig, TrainPaths
from pipeline.nn.model_io import load_model
from pipeline.table.datasets import Data
from pipeline.table.report import pct
from pipeline.table.results import PROBABILITIES_FILE
from pipeline.table.rows import BY_KEY
from pipeline.tracking.tracked import TrackedTraining, train_tracked

if TYPE_CHECKING:
    from pipeline.table.config import TableConfig

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

    def training(self) -> Training:
        """The job for :func:`pipeline.cluster.driver.run_trainings`, with the data files it reads."""
        folder = "prepared" if self.config.dataset == "prepared" else "expanded"
        inputs = {
            "prepared/validation.npz": self.data.prepared / "validation.npz",
            "test.npz": self.data.test,
            f"{folder}/train.npz": self.data.train_path(self.config.dataset),
        }
        return Training(f"row {self.row} seed {self.seed}", f"table-{self.key}", self.seed_dir, inputs, self)


@dataclass(frozen=True)
class JobContext:
    """What every job of one table call shares."""

    table: TableConfig
    code: str  # the training code's version (cache.code_version), stamped on each result
    parent_id: str | None  # the table's MLflow run


def train_jobs(todo: list[Job], context: JobContext, cache_dir: Path) -> Iterator[tuple[Job, dict]]:
    """Train every job, one at a time in this process or side by side on Ray (``table.cluster``);
    yields (job, result) as each finishes. ``cache_dir``: XLA's compilation cache, for the jax engine."""
    table = context.table
    driver = Driver(
        train=functools.partial(run_job, context),
        cluster=table.cluster,
        tracking=table.tracking,
        compile_cache=cache_dir if table.engine == "jax" else None,
    )
    trainings = [job.training() for job in todo]
    quiet = not table.progress or in_process(trainings, table.cluster)  # one at a time: each has its own bar
    with tqdm(total=len(todo), desc="trainings", disable=quiet) as bar:
        for training, result in run_trainings(trainings, driver):
            job = training.task
            accuracy = pct(result["test_accuracy"])
            log.info("row %s, seed %d: done on %s, test accuracy %s", job.row, job.seed, result["node"], accuracy)
            bar.update()
            yield job, result


def run_job(context: JobContext, job: Job, place: Place) -> dict:
    """One job where the driver put it: in this machine's folders, or in its folder on a node."""
    log.info("row %s (%s), seed %d of %d", job.row, BY_KEY[job.row].description, job.seed, job.of)
    table = dataclasses.replace(context.table, progress=False) if place.worker else context.table
    if place.node is not None:
        node = place.node
        data = Data(node.data / "prepared", node.data / "expanded", node.data / "test.npz")
        job = dataclasses.replace(job, seed_dir=node.folder, data=data)
    return train_one(
        job, table, code=context.code, parent_id=context.parent_id, on_checkpoint=place.on_checkpoint, task=place.task
    )


def _test_set(path: Path) -> dict:
    images, labels = load_split(path)
    return {"images": images, "labels": labels}


def train_one(
    job: Job,
    table: TableConfig,
    *,
    code: str,
    parent_id: str | None,
    on_checkpoint: Callable[[], None] | None = None,
    task: str | None = None,
) -> dict:
    """Train (or resume) one network, score it on the test set, write its result.json last.
    ``task``: the cluster's name of the training (its checkpoint folder in the shared storage)."""
    start = time.perf_counter()
    tags = {**node_tags(), **({TASK_TAG: task} if task else {})}
    training = dataclasses.replace(_tracked_training(job, table, parent_id, tags), on_checkpoint=on_checkpoint)
    config, scores, test = job.config, {}, _test_set(job.data.test)

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
        "node": tags.get("ray.node_ip", "this machine"),
        "code": code,
    }
    write_json(job.seed_dir / RESULT_FILE, result)
    return result


def _tracked_training(job: Job, table: TableConfig, parent_id: str | None, node: dict[str, str]) -> TrackedTraining:
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
        **node,
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
