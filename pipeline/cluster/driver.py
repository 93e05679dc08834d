"""One driver for many trainings: the table's (row, seed) networks and the sweep's trials alike.

:func:`run_trainings` trains each of a list of trainings one at a time in this process (``--jobs 1``),
or as Ray tasks (:mod:`pipeline.cluster.tasks`): on this machine (``--jobs N``, the workers reading
the driver's own folders and sharing its XLA compilation cache) or on a cluster (``--ray ADDRESS``:
each training's data sent to the shared storage once, its outputs written back to its folder here,
its checkpoint in the storage deleted once they are, and the MLflow runs a dead node left RUNNING
ended). At most ``--max-concurrent`` trainings are in flight, else as many as the cluster fits.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.cluster.config import ClusterConfig
from pipeline.cluster.node import TASK_TAG, NodeWork, Shipment, on_node, write_outputs
from pipeline.cluster.storage import DataRef, SharedStorage
from pipeline.cluster.tasks import ray_session, run_tasks, shared_storage
from pipeline.nn.compile_cache import jax_compilation_cache
from pipeline.tracking import TrackingConfig

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"  # written last in a training's folder: a folder holding it is finished


@dataclass(frozen=True)
class Training:
    """One training to run: a table's (row, seed) or a sweep's trial."""

    name: str  # in logs, and Ray's name of its task
    key: str  # its folder in the shared storage (checkpoints/<key>/) and the TASK_TAG of its runs
    folder: Path  # its outputs on this machine, RESULT_FILE last
    inputs: Mapping[str, Path]  # the data files it reads, by their name under a node's data folder
    task: Any  # what the driver's ``train`` is called with (picklable: it travels to the node)


@dataclass(frozen=True)
class Place:
    """Where a training runs: ``node`` on a node of a cluster (its folder there), else in this
    machine's folders; ``worker`` in a Ray worker process (no progress bars) or in the driver."""

    node: NodeWork | None = None
    worker: bool = False

    @property
    def on_checkpoint(self) -> Callable[[], None] | None:
        """Keeps each epoch's checkpoint in the shared storage, where another node resumes it."""
        return self.node.save_checkpoints if self.node else None

    @property
    def task(self) -> str | None:
        """The training's key in the shared storage, tagged on its MLflow run (TASK_TAG)."""
        return self.node.shipment.key if self.node else None


@dataclass(frozen=True)
class Driver:
    """How to run a group of trainings. ``train(task, place)`` trains one and returns its result (a
    dict, with ``run_id`` when it has an MLflow run), having written RESULT_FILE last in its folder
    (``place.node.folder`` on a cluster's node)."""

    train: Callable[[Any, Place], dict]
    cluster: ClusterConfig
    tracking: TrackingConfig
    compile_cache: Path | None = None  # XLA's persistent cache for this machine's trainings; None: none


def in_process(trainings: Iterable[Training], cluster: ClusterConfig) -> bool:
    """Whether the trainings run one at a time in this process: ``--jobs 1``, or fewer than two
    known in advance (no Ray to start for one)."""
    few = isinstance(trainings, Sequence) and len(trainings) < 2
    return cluster.local and (cluster.jobs == 1 or few)


def run_trainings(trainings: Iterable[Training], driver: Driver) -> Iterator[tuple[Training, dict]]:
    """Train each of ``trainings``; yields (training, its result) as each finishes, its outputs in
    its folder. ``trainings`` is read lazily, one when a place is free, so a search can choose the
    next from the results so far."""
    if not in_process(trainings, driver.cluster):
        yield from _on_ray(trainings, driver)
        return
    for training in trainings:
        # opened around each training only: a call with nothing to train does not even import JAX
        with jax_compilation_cache(driver.compile_cache) if driver.compile_cache else contextlib.nullcontext():
            result = driver.train(training.task, Place())
        yield training, result


def _on_ray(trainings: Iterable[Training], driver: Driver) -> Iterator[tuple[Training, dict]]:
    cluster = driver.cluster
    storage = None if cluster.local else shared_storage(cluster, driver.tracking)
    sent: dict[Path, DataRef] = {}
    calls = (
        (training.name, (driver.train, training, _shipment(training, storage, sent) if storage else None))
        for training in trainings
    )
    with ray_session(cluster, _worker_env(driver)):
        for (_, training, shipment), (result, files) in run_tasks(_in_worker, calls, cluster):
            if shipment is not None:
                write_outputs(training.folder, files, last=RESULT_FILE)
                storage.delete(shipment.checkpoint_key)
                _end_orphan_runs(driver.tracking, shipment.key, result)
            yield training, result


def _shipment(training: Training, storage: SharedStorage, sent: dict[Path, DataRef]) -> Shipment:
    """The training's data, each file sent to the storage once for all trainings (by content)."""
    return Shipment(storage, training.key, storage.publish_each(training.inputs, sent))


def _worker_env(driver: Driver) -> dict[str, str]:
    """This machine's workers share the driver's compilation cache, as one at a time does (a node of a
    cluster keeps its own: :func:`pipeline.cluster.node.on_node`); $JAX_COMPILATION_CACHE_DIR, when
    set, is left in charge (the workers inherit it)."""
    if not driver.cluster.local or driver.compile_cache is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": str(driver.compile_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _end_orphan_runs(config: TrackingConfig, key: str, result: dict) -> None:
    """Runs of the training that a dead node left RUNNING, but the one its result names; a result
    without a run (tracking off, a diverged trial) names none to keep, so none is ended."""
    if result.get("run_id"):
        tracking.end_orphan_runs(config, {TASK_TAG: key}, keep=result["run_id"])


def _in_worker(train: Callable[[Any, Place], dict], training: Training, shipment: Shipment | None):
    """A Ray task: ``train`` on whichever node Ray chose; returns (result, the files it wrote when the
    node is not this machine)."""
    # force: a worker process Ray reuses for the next training logs under that one's name
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s %(name)s [{training.name}]: %(message)s", force=True)
    if shipment is None:  # this machine: the driver's own folders (and compilation cache, from the env)
        return train(training.task, Place(worker=True)), {}
    with on_node(shipment) as node:
        return train(training.task, Place(node=node, worker=True)), node.outputs()
