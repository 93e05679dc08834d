"""Opening, reopening and ending MLflow runs.

One MLflow run per training: the train stage opens it and logs params, tags, per-epoch metrics and
the model; the evaluate stage reopens the same run (its id is saved beside the metrics, in
``mlflow_run.json``) and adds the test metrics and plots. Whatever ends a stage early -- an error,
NaN, Ctrl-C, SIGTERM -- marks the run FAILED with the reason as a tag, so nothing is left "running".
A run whose node died is found by its tags and marked KILLED (``end_orphan_runs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.tracking.config import TrackingConfig
from pipeline.tracking.location import (
    ENV_URI,
    SQLITE_TIMEOUT_S,
    artifact_location,
    check_reachable,
    sqlite_database,
    tracking_uri,
    uri_source,
)
from pipeline.tracking.run import Run, TrackingError, retry_locked, retry_transient
from pipeline.tracking.tags import source_tags

__all__ = ["EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "end_orphan_runs", "find_run", "tracked_run"]

log = logging.getLogger(__name__)

# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, all empty), with it
# on the table of training runs
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _client(uri: str):
    """A client whose store exists: the first process to touch a new SQLite file creates its schema
    while holding a file lock, since two workers migrating one new database at once collide."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        # MLflow's client retries each HTTP request for up to ~4 minutes by default: shorter here, so
        # that Run's own retries (bounded by PIPELINE_TRACKING_RETRY_S) and its buffer decide
        for name, value in (("MAX_RETRIES", "3"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "30")):
            os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{name}", value)
        try:
            return MlflowClient(tracking_uri=uri)
        except MlflowException as e:  # a scheme MLflow has no store for, or a bare path (its retired file store)
            raise TrackingError(
                f"MLflow store {uri_source(uri)}: {' '.join(e.message.split())} "
                f"(use sqlite:///path/to/mlflow.db or http://host:port, or unset {ENV_URI})"
            ) from None
    from filelock import FileLock

    with FileLock(f"{sqlite_database(uri)}.lock", timeout=SQLITE_TIMEOUT_S):
        client = MlflowClient(tracking_uri=uri)
        retry_locked(lambda: client.search_experiments(max_results=1))
    return client


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment ``name``, created if missing, tagged so that MLflow's UI opens it on its runs."""
    experiment = retry_locked(lambda: client.get_experiment_by_name(name))
    if experiment is None:
        try:
            return retry_locked(
                lambda: client.create_experiment(
                    name, artifact_location=artifact_location(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            )
        except Exception as e:  # another worker created it between our two calls
            if "already exists" not in str(e).lower() and "unique constraint" not in str(e).lower():
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by hand, or by an older pipeline
        retry_locked(lambda: client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND))
    return experiment.experiment_id


class _Terminated(BaseException):
    """SIGTERM (``dvc queue kill``, a scheduler) raised in the main thread so the run is closed."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum, frame):
        raise _Terminated(f"terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def tracked_run(
    config: TrackingConfig,
    *,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    finish: bool = True,
) -> Iterator[Run | None]:
    """Open (or reopen) a run; mark it FINISHED on success when ``finish``, FAILED on any exception.

    Yields None when ``config.enabled`` is false. The store is checked before anything else, so an
    unreachable server fails the stage before training starts.
    """
    if not config.enabled:
        yield None
        return
    uri = tracking_uri()
    check_reachable(uri)
    client = _client(uri)
    run_id = None
    if resume_run_id:
        try:
            run_id = retry_locked(lambda: client.get_run(resume_run_id)).info.run_id
            retry_locked(lambda: client.update_run(run_id, status="RUNNING"))
        except Exception as e:
            log.warning("MLflow run %s not found in %s (%s); starting a new run", resume_run_id, uri, e)
            run_id = None
    if run_id is None:
        experiment_id = _experiment_id(client, config.experiment, uri)
        all_tags = {key: str(value) for key, value in {**source_tags(), **(tags or {})}.items()}  # REST: strings
        run_id = retry_locked(lambda: client.create_run(experiment_id, run_name=run_name, tags=all_tags)).info.run_id
    elif tags:
        Run(client, run_id).set_tags({**source_tags(), **tags})
    run = Run(client, run_id)
    try:
        with _sigterm_raises():
            yield run
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        for call in (  # each tried for a short while only: the error itself must not wait
            lambda: run.flush(Run.EPOCH_RETRY_S),
            lambda: retry_transient(lambda: client.set_tag(run_id, "failure_reason", reason[:5000]), 10),
            lambda: retry_transient(lambda: client.set_terminated(run_id, status="FAILED"), Run.EPOCH_RETRY_S),
        ):
            with contextlib.suppress(Exception):
                call()
        if isinstance(e, _Terminated):
            raise KeyboardInterrupt(str(e)) from None
        raise
    run.close("FINISHED" if finish else None)


def find_run(config: TrackingConfig, tags: Mapping[str, str]) -> str | None:
    """The newest run of the experiment carrying all ``tags``: a sweep's parent run, which every
    driver of the sweep, on any machine, continues."""
    if not config.enabled:
        return None
    client = _client(tracking_uri())
    experiment = retry_locked(lambda: client.get_experiment_by_name(config.experiment))
    if experiment is None:
        return None
    query = _tags_query(tags)
    runs = retry_transient(
        lambda: client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"])
    )
    return runs[0].info.run_id if runs else None


def end_orphan_runs(config: TrackingConfig, tags: Mapping[str, str], keep: str | None) -> list[str]:
    """Mark KILLED the runs still RUNNING with ``tags`` but ``keep``: those of a training whose node
    died before it could note its run in the shared storage, so the retry opened another."""
    if not config.enabled:
        return []
    client = _client(tracking_uri())
    experiment = retry_locked(lambda: client.get_experiment_by_name(config.experiment))
    query = _tags_query(tags) + " and attributes.status = 'RUNNING'"
    orphans = [
        run.info.run_id
        for run in retry_transient(lambda: client.search_runs([experiment.experiment_id], query))
        if run.info.run_id != keep
    ]
    for run_id in orphans:
        retry_transient(lambda run_id=run_id: client.set_terminated(run_id, status="KILLED"))
        log.info("MLflow run %s: its node died; marked KILLED (run %s went on)", run_id, keep)
    return orphans


def _tags_query(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
