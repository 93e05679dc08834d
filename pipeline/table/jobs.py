"""The table's trainings: one (row, seed) trained as a child run of the table's MLflow run and scored
on the test set; one at a time in this process, or side by side as Ray tasks (``--jobs N`` on this
machine, ``--ray ADDRESS`` on a cluster: :mod:`pipeline.cluster`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from pipeline import tracking
from pipeline.cluster.node import TASK_TAG, Shipment, node_tags, on_node, write_outputs
from pipeline.cluster.storage import DataRef, SharedStorage
from pipeline.cluster.tasks import ray_session, run_tasks, shared_storage
from pipeline.core.config import PipelineError
from pipeline.core.files import save_npz, write_json
from pipeline.data.expand import ExpandConfig
from pipeline.data.splits import load_split
from pipeline.nn.config import TrainConfig, TrainPaths
from pipeline.nn.model_io import load_model
from pipeline.table.datasets import Data
from pipeline.table.report import pct
from pipeline.table.results import PROBABILITIES_FILE, RESULT_FILE
from pipeline.table.rows import BY_KEY
from pipeline.tracking.tracked import TrackedTraining, train_tracked

if TYPE_CHECKING:
    from pipeline.table.runner import TableConfig

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
    todo: list[Job], table: TableConfig, *, test: dict, code: str, parent_id: str | None, cache_dir: Path
) -> Iterator:
    """Train every job, one at a time in this process or side by side on Ray (``table.cluster``);
    yields (job, result) as each finishes."""
    if table.cluster.local and (table.cluster.jobs == 1 or len(todo) <= 1):
        for job in todo:
            log.info("row %s (%s), seed %d of %d", job.row, BY_KEY[job.row].description, job.seed, job.of)
            yield job, train_one(job, table, test=test, code=code, parent_id=parent_id)
        return
    if todo:
        yield from _train_on_ray(todo, table, code=code, parent_id=parent_id, cache_dir=cache_dir)


def _train_on_ray(
    todo: list[Job], table: TableConfig, *, code: str, parent_id: str | None, cache_dir: Path
) -> Iterator:
    cluster = table.cluster
    if cluster.local:  # the processes share this machine's compilation cache, as one at a time does
        storage = None
        env = {"JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    else:
        storage, env = shared_storage(cluster, table.tracking), {}
    shipments = _shipments(todo, storage) if storage else [None] * len(todo)
    node_table = dataclasses.replace(table, progress=False)
    calls = [
        (f"row {job.row} seed {job.seed}", (job, node_table, code, parent_id, shipment))
        for job, shipment in zip(todo, shipments)
    ]
    with ray_session(cluster, env), tqdm(total=len(todo), desc="trainings", disable=not table.progress) as bar:
        for (job, *_, shipment), (result, files) in run_tasks(train_on_node, calls, cluster):
            if files:
                write_outputs(job.seed_dir, files, last=RESULT_FILE)
                storage.delete(shipment.checkpoint_key)
                tracking.end_orphan_runs(table.tracking, {TASK_TAG: shipment.key}, keep=result["run_id"])
            accuracy = pct(result["test_accuracy"])
            log.info("row %s, seed %d: done on %s, test accuracy %s", job.row, job.seed, result["node"], accuracy)
            bar.update()
            yield job, result


def _shipments(todo: list[Job], storage: SharedStorage) -> list[Shipment]:
    """Each job's data sets, sent to the shared storage once (by content), and its checkpoint folder."""
    sent: dict[Path, DataRef] = {}
    shipments = []
    for job in todo:
        folder = "prepared" if job.config.dataset == "prepared" else "expanded"
        files = {
            "prepared/validation.npz": job.data.prepared / "validation.npz",
            "test.npz": job.data.test,
            f"{folder}/train.npz": job.data.train_path(job.config.dataset),
        }
        shipments.append(Shipment(storage, f"table-{job.key}", storage.publish_each(files, sent)))
    return shipments


def train_on_node(job: Job, table: TableConfig, code: str, parent_id: str | None, shipment: Shipment | None):
    """A Ray task: ``train_one`` on whichever node Ray chose; returns (result, the files written when
    the node is not this machine)."""
    label = f"row {job.row} seed {job.seed}"
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s %(name)s [{label}]: %(message)s")
    if shipment is None:  # this machine: the driver's own folders (and compilation cache, from the env)
        return train_one(job, table, test=_test_set(job.data.test), code=code, parent_id=parent_id), {}
    with on_node(shipment) as node:
        data = Data(node.data / "prepared", node.data / "expanded", node.data / "test.npz")
        here = dataclasses.replace(job, seed_dir=node.folder, data=data)
        result = train_one(
            here,
            table,
            test=_test_set(data.test),
            code=code,
            parent_id=parent_id,
            on_checkpoint=node.save_checkpoints,
            task=shipment.key,
        )
        return result, node.outputs()


def _test_set(path: Path) -> dict:
    images, labels = load_split(path)
    return {"images": images, "labels": labels}


def train_one(
    job: Job,
    table: TableConfig,
    *,
    test: dict,
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
