"""One tracked, resumable training: :func:`pipeline.nn.fit.train` inside an MLflow run.

Used by the train stage and by every (row, seed) of the table. The steps, in order: find the run a
killed training left (its id is kept beside the checkpoints with a key of everything that defines
the run), open or reopen it, log its params once (MLflow params are immutable), log each epoch's
metrics (a reopened run only the epochs it lacks), train, then log the final metrics, the metrics
files and the model. Whatever ends the training early marks the run FAILED (``tracked_run``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import from_section
from pipeline.core.pause import PausePoint
from pipeline.nn.checkpoint import fingerprint
from pipeline.nn.config import TrainConfig, TrainPaths
from pipeline.nn.fit import train
from pipeline.nn.outputs import EPOCHS_FILE, INFO_FILE, SUMMARY_FILE, TIMINGS_FILE
from pipeline.tracking import serving
from pipeline.tracking.config import TrackingConfig
from pipeline.tracking.lifecycle import tracked_run
from pipeline.tracking.location import tracking_uri
from pipeline.tracking.run import Run, epoch_logger
from pipeline.tracking.run_files import RUN_FILE, remember_run, resumable_run, save_run_reference
from pipeline.tracking.tags import flatten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackedTraining:
    """A training and the MLflow run that records it."""

    config: TrainConfig
    paths: TrainPaths
    tracking: TrackingConfig
    run_name: str
    run_key: str  # a run left by a killed training is continued only by a training with the same key
    tags: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)  # logged once, when the run is new
    log_datasets: bool = False  # the training and validation sets as MLflow dataset inputs
    log_pyfunc: bool = False  # the model in MLflow's pyfunc format too, for `mlflow models serve`
    progress: bool = True
    # called when the checkpoint folder changed (the run remembered, an epoch's checkpoint written):
    # a cluster node copies it to shared storage there
    on_checkpoint: Callable[[], None] | None = None


def train_tracked(job: TrackedTraining, after: Callable[[Run | None, dict], None] | None = None) -> dict:
    """Train ``job`` inside its run; returns the training's summary with ``run_id``.

    ``after(run, summary)`` runs inside the run once the model is written (the table scores the test
    set there); ``run`` is None when tracking is off."""
    job.paths.require_data()
    pause = PausePoint.from_env()  # checked before anything starts, not at the pause's epoch
    resume_id = resumable_run(job.paths.checkpoints, job.run_key)
    with tracked_run(job.tracking, run_name=job.run_name, resume_run_id=resume_id, tags=job.tags) as run:
        on_epoch = monitor = None
        if run is not None:
            remember_run(job.paths.checkpoints, run, job.run_key)
            continuing = run.run_id == resume_id
            if not continuing:
                _log_inputs(run, job)
            on_epoch = epoch_logger(run, continuing)
            monitor = system_metrics(run, job.tracking, continuing)
        if job.on_checkpoint is not None:
            job.on_checkpoint()
            on_epoch = _then_checkpoint(on_epoch, job.on_checkpoint)
        if pause is not None:
            on_epoch = _then_pause(on_epoch, pause)
        try:
            summary = train(job.config, job.paths, progress=job.progress, on_epoch=on_epoch)
        finally:  # a diverged run still wrote its best model and metrics: keep them with the run
            if monitor is not None:
                stop_system_metrics(monitor)
            if run is not None:
                for path in (job.paths.metrics / name for name in (SUMMARY_FILE, INFO_FILE, EPOCHS_FILE, TIMINGS_FILE)):
                    if path.is_file():
                        run.log_artifact(path, "metrics")
        if run is not None:
            _log_outputs(run, job, summary)
        if after is not None:
            after(run, summary)
    return {**summary, "run_id": run.run_id if run else None}


def _then_checkpoint(on_epoch, on_checkpoint):
    def both(epoch: int, metrics: dict) -> None:
        # the checkpoint first: a node that dies before logging the epoch leaves it to the next node,
        # which logs it as restored; the other way round the epoch would be trained and logged twice
        if not metrics["resumed"]:
            on_checkpoint()
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    return both


def _then_pause(on_epoch, pause: PausePoint):
    def both(epoch: int, metrics: dict) -> None:
        # last: the epoch is then in the checkpoint (and the shared storage) and on the tracking server
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if not metrics["resumed"]:
            pause.after_epoch(epoch)

    return both


def system_metrics(run: Run, tracking: TrackingConfig, continuing: bool):
    """MLflow's system metrics monitor for ``run`` (``system/cpu_utilization_percentage``, ...), started;
    None when ``tracking.system_metrics`` is off or the monitor cannot start (psutil missing)."""
    if not tracking.system_metrics:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # a continued run goes on from the last step it logged; every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s
        monitor = SystemMetricsMonitor(run.run_id, resume_logging=continuing, tracking_uri=tracking_uri())
    except Exception as e:  # ImportError: psutil
        log.warning("MLflow system metrics off: %s", e)
        return None
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop ``monitor``, logging the samples of its last, unfinished interval too: MLflow's ``finish``
    drops them, so a training shorter than one interval (10 s) would log no system metrics at all."""
    monitor.finish()
    try:
        tail = monitor.aggregate_metrics()
        if tail:
            monitor.publish_metrics(tail)
            monitor.mlflow_logger.flush()
    except Exception as e:  # the run's training is done: its system metrics are not worth failing it for
        log.warning("MLflow system metrics of the last %s s not logged: %s", monitor.sampling_interval, e)


def _log_inputs(run: Run, job: TrackedTraining) -> None:
    run.log_params(job.params)
    if job.log_datasets:
        run.log_dataset(job.paths.train, f"mnist-{job.config.dataset}-train", "training")
        run.log_dataset(job.paths.validation, "mnist-validation", "validation")


def _log_outputs(run: Run, job: TrackedTraining, summary: dict) -> None:
    save_run_reference(job.paths.metrics / RUN_FILE, run)
    run.log_metrics(
        {
            "final_best_validation_accuracy": summary["best_validation_accuracy"],
            "final_best_epoch": summary["best_epoch"],
            "epochs_run": summary["epochs_run"],
            "peak_rss_mb": summary["peak_rss_mb"],
        }
    )
    run.log_artifacts(job.paths.model, "model_files")
    if job.log_pyfunc:
        serving.log_pyfunc(run, job.paths.model)


def stage_training(
    *,
    params: dict,
    source: str = "params.yaml",
    prepared_dir: Path,
    expanded_dir: Path | None,
    model_dir: Path,
    checkpoint_dir: Path,
    metrics_dir: Path,
    progress: bool = True,
) -> TrackedTraining:
    """The train stage's training from a params.yaml: every value of it as a param (but the evaluate
    section's, which evaluate records as tags), the resolved architecture, the datasets and the
    pyfunc model."""
    config = from_section(TrainConfig, params, "train", source=source)
    paths = TrainPaths.of(
        config,
        prepared=prepared_dir,
        expanded=expanded_dir,
        model=model_dir,
        checkpoints=checkpoint_dir,
        metrics=metrics_dir,
    )
    paths.require_data()
    flat = flatten({section: values for section, values in params.items() if section != "evaluate"})
    # continue an interrupted run only when nothing in params.yaml changed (MLflow params are immutable)
    run_key = hashlib.sha256(
        (fingerprint(config, paths.train, paths.validation) + json.dumps(flat, sort_keys=True)).encode()
    ).hexdigest()
    preset = config.architecture if isinstance(config.architecture, str) else "custom"
    return TrackedTraining(
        config=config,
        paths=paths,
        tracking=from_section(TrackingConfig, params, "tracking", source=source),
        run_name=os.environ.get("DVC_EXP_NAME") or f"{preset}-{config.epochs}ep",
        run_key=run_key,
        tags={
            "engine": config.engine,
            "device": config.device,
            "preset": preset,
            "dataset": config.dataset,
            "stage": "train",
        },
        params={**flat, "architecture.resolved": json.dumps(config.layers())},
        log_datasets=True,
        log_pyfunc=True,
        progress=progress,
    )
