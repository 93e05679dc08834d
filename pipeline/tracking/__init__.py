"""MLflow tracking: the config, where runs go, opening and ending runs, the files that name a run, runs
whose calls are retried.

The names below are the package's API (``from pipeline import tracking``, then ``tracking.tracked_run``).
The training inside a run, the registry and serving are modules of their own, which import MLflow's
heavier parts: ``pipeline.tracking.tracked``, ``pipeline.tracking.registry``, ``pipeline.tracking.serving``.
"""

from pipeline.tracking.config import TrackingConfig
from pipeline.tracking.lifecycle import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, end_orphan_runs, find_run, tracked_run
from pipeline.tracking.location import (
    ARTIFACTS_DIR,
    DB_NAME,
    ENV_URI,
    SQLITE_TIMEOUT_S,
    artifact_location,
    check_login,
    check_reachable,
    project_root,
    sqlite_database,
    tracking_uri,
)
from pipeline.tracking.run import Run, TrackingError, epoch_logger, retry_locked, retry_transient
from pipeline.tracking.run_files import (
    RUN_FILE,
    load_run_reference,
    read_run_file,
    remember_run,
    resumable_run,
    save_run_reference,
)
from pipeline.tracking.tags import flatten, source_tags

__all__ = [
    "ARTIFACTS_DIR",
    "DB_NAME",
    "ENV_URI",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "RUN_FILE",
    "Run",
    "SQLITE_TIMEOUT_S",
    "TrackingConfig",
    "TrackingError",
    "artifact_location",
    "check_login",
    "check_reachable",
    "end_orphan_runs",
    "epoch_logger",
    "find_run",
    "flatten",
    "load_run_reference",
    "project_root",
    "read_run_file",
    "remember_run",
    "resumable_run",
    "retry_locked",
    "retry_transient",
    "save_run_reference",
    "source_tags",
    "sqlite_database",
    "tracked_run",
    "tracking_uri",
]
