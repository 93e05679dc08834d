"""One trial of a sweep: params.yaml with the trial's values, trained as the train stage trains it
(the same params, per-epoch metrics and model in MLflow), as a child run of the sweep's run; in this
process, or as a Ray task on any node (:mod:`pipeline.cluster`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster.driver import RESULT_FILE, Place, Training
from pipeline.cluster.node import TASK_TAG, node_tags
from pipeline.core.files import write_json
from pipeline.nn.config import TrainConfig
from pipeline.nn.fit import TrainingDiverged
from pipeline.tracking.tracked import TrackedTraining, stage_training, train_tracked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    """One point of the sweep, with what its training reads and where it writes."""

    sweep: str  # the sweep's name
    key: str  # SearchSpace.point_key: the trial's folder, OUT/trials/<key>
    point: Mapping[str, Any]  # the swept values, by dotted key
    params: Mapping[str, Any]  # params.yaml with the trial's values
    source: str  # the params file, for messages
    folder: Path
    prepared: Path
    expanded: Path
    number: int | None = None  # the Optuna trial's number

    @property
    def name(self) -> str:
        return f"{self.sweep} trial {self.key}" if self.number is None else f"{self.sweep} trial {self.number}"

    @property
    def dataset(self) -> str:
        return self.params["train"].get("dataset", TrainConfig.dataset)

    def training(self) -> Training:
        """The trial for :func:`pipeline.cluster.driver.run_trainings`, with the data files it reads."""
        train = self.prepared if self.dataset == "prepared" else self.expanded
        inputs = {
            f"{self.dataset}/train.npz": train / "train.npz",
            "prepared/validation.npz": self.prepared / "validation.npz",
        }
        return Training(self.name, f"sweep-{self.sweep}-{self.key}", self.folder, inputs, self)


def finished(trial: Trial) -> dict | None:
    """The trial's result on disk, from an earlier call, or None."""
    path = trial.folder / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def train_trial(parent_id: str | None, trial: Trial, place: Place) -> dict:
    """Train ``trial`` where the driver put it (:class:`pipeline.cluster.driver.Place`): in this
    machine's folders, or in its folder on a node of a cluster; its result, RESULT_FILE written last."""
    if place.node is not None:
        node = place.node
        trial = dataclasses.replace(
            trial, folder=node.folder, prepared=node.data / "prepared", expanded=node.data / "expanded"
        )
    return _train(trial, parent_id, on_checkpoint=place.on_checkpoint, task=place.task)


def _train(
    trial: Trial, parent_id: str | None, on_checkpoint: Callable[[], None] | None = None, task: str | None = None
) -> dict:
    """The training; a diverged cost is the trial's result (it would diverge again), not an error."""
    start = time.perf_counter()
    training = _tracked_training(trial, parent_id, on_checkpoint, task)
    result = {"key": trial.key, "number": trial.number, "point": dict(trial.point), **node_tags()}
    try:
        summary = train_tracked(training)
    except TrainingDiverged as e:
        result.update(failed=str(e), seconds=round(time.perf_counter() - start, 1))
    else:
        result.update(
            validation_accuracy=summary["best_validation_accuracy"],
            best_epoch=summary["best_epoch"],
            epochs_run=summary["epochs_run"],
            stopped=summary["stopped"],
            run_id=summary["run_id"],
            seconds=round(time.perf_counter() - start, 1),
        )
    write_json(trial.folder / RESULT_FILE, result)
    return result


def _tracked_training(
    trial: Trial, parent_id: str | None, on_checkpoint: Callable[[], None] | None, task: str | None
) -> TrackedTraining:
    training = stage_training(
        params=dict(trial.params),
        source=trial.source,
        prepared_dir=trial.prepared,
        expanded_dir=trial.expanded,
        model_dir=trial.folder / "model",
        checkpoint_dir=trial.folder / "checkpoints",
        metrics_dir=trial.folder / "metrics",
        progress=False,
    )
    tags = {**training.tags, "stage": "sweep", "sweep": trial.sweep, "sweep.trial": trial.key, **node_tags()}
    if trial.number is not None:
        tags["sweep.optuna_trial"] = trial.number
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    if task:
        tags[TASK_TAG] = task
    return dataclasses.replace(
        training,
        run_name=trial.name.replace(" trial ", "-trial"),
        tags=tags,
        params={**training.params, "sweep.name": trial.sweep},
        on_checkpoint=on_checkpoint,
    )
