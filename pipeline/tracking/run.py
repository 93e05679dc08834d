"""One MLflow run as the pipeline logs to it: every call retried while the store is locked (SQLite)
or away (a server or database restarting), for a bounded time, and per-epoch metrics that could not
be sent kept and sent again, so that a run never silently misses an epoch."""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.core.config import PipelineError
from pipeline.core.files import load_npz, sha256_file

log = logging.getLogger(__name__)

LOCK_RETRIES = 8


class TrackingError(PipelineError):
    """The tracking store cannot be reached or written."""


def retry_locked(call: Callable[[], Any]) -> Any:
    """Run ``call``, retrying with jittered backoff while SQLite says another process holds the lock."""
    for attempt in range(LOCK_RETRIES):
        try:
            return call()
        except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
            if "database is locked" not in str(e) or attempt == LOCK_RETRIES - 1:
                raise
            delay = 0.2 * 2**attempt * (1 + random.random())
            log.warning("MLflow store is locked by another process; retrying in %.1f s", delay)
            time.sleep(delay)


# what a server restart looks like from the client: refused/reset connections, timeouts, 5xx (MLflow's
# own urllib3 retries end in "Max retries exceeded" / "too many 500 error responses"), a locked SQLite file
_TRANSIENT = re.compile(
    r"database is locked|connection (refused|reset|aborted)|max retries exceeded|timed? ?out|"
    r"remote end closed|(error code|too many) 5\d\d|server closed the connection|temporarily unavailable",
    re.IGNORECASE,
)


# the store refusing rows that another copy of the same batch wrote first: MLflow's HTTP client resends a
# request that timed out (POSTs too), and the copy still running at the server checked the run for params
# before its twin committed them (PostgreSQL's message, then SQLite's)
_DUPLICATE = re.compile(r"duplicate key value violates unique constraint|UNIQUE constraint failed", re.IGNORECASE)


def is_transient(error: Exception) -> bool:
    """True for failures that a retry a little later can cure; False for 4xx answers and bugs."""
    return isinstance(error, (ConnectionError, TimeoutError)) or bool(
        _TRANSIENT.search(f"{type(error).__name__} {error}")
    )


def retry_seconds(default: float = 180.0) -> float:
    """How long one tracking call keeps retrying transient failures ($PIPELINE_TRACKING_RETRY_S)."""
    text = os.environ.get("PIPELINE_TRACKING_RETRY_S")
    if text is None:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # NaN too
        raise TrackingError(f"Got PIPELINE_TRACKING_RETRY_S={text!r}: expected a number of seconds, 0 or more")
    return seconds


def retry_transient(call: Callable[[], Any], seconds: float | None = None) -> Any:
    """Run ``call``, retrying transient failures with jittered exponential backoff for at most ``seconds``:
    waits of 0.5, 1, 2, 4, 8, then 10 s, each up to half longer at random, and none that would end past
    ``seconds``."""
    deadline = time.monotonic() + (retry_seconds() if seconds is None else seconds)
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as e:
            wait = delay * (1 + random.random() / 2)  # jittered: a cluster's workers do not all retry at once
            if not is_transient(e) or time.monotonic() + wait > deadline:
                raise
            log.warning("MLflow call failed (%s); retrying in %.1f s", str(e).splitlines()[0][:200], wait)
            time.sleep(wait)
            delay = min(2 * delay, 10.0)


class Run:
    """One MLflow run, logged through a client. Every call is retried on transient failures (a locked
    SQLite file, a server or database restarting) for a bounded time. Per-epoch metrics that still
    cannot be sent are kept in ``pending`` and sent with the next metrics and by :meth:`flush` before
    the run is closed, so a training never waits long for a server that is down, and never loses an epoch."""

    EPOCH_RETRY_S = 20.0  # an epoch's metrics wait at most this long before they are buffered

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.pending: list = []  # mlflow.entities.Metric not yet accepted by the store

    def _call(self, call: Callable[[], Any], seconds: float | None = None) -> Any:
        return retry_transient(call, seconds)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._call(lambda chunk=items[i : i + 100]: self._log_once("params", chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, buffer: bool = False) -> None:
        """Log ``metrics`` (and whatever is pending). With ``buffer``, a store that stays unreachable
        past EPOCH_RETRY_S keeps them pending instead of failing the training."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # fixed at the first attempt: a resent batch is the same rows
        self.pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        try:
            self.flush(self.EPOCH_RETRY_S if buffer else None)
        except Exception as e:
            if not (buffer and is_transient(e)):
                raise
            steps = sorted({m.step for m in self.pending})
            log.warning("MLflow unreachable; metrics of steps %s kept to resend: %s", steps, str(e)[:200])

    def flush(self, seconds: float | None = None) -> None:
        """Send every pending metric (at most 1000 per batch, MLflow's limit), oldest first."""
        while self.pending:
            batch = self.pending[:1000]
            self._call(lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch), seconds)
            del self.pending[: len(batch)]

    def logged_steps(self, metric: str) -> set[int]:
        """The steps at which ``metric`` was already logged (a resumed run fills in only the gaps)."""
        return {m.step for m in self._call(lambda: self.client.get_metric_history(self.run_id, metric))}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(lambda: self._log_once("tags", items))

    def _log_once(self, kind: str, entities: list) -> None:
        """``log_batch`` of ``entities``, the run's ``kind`` ("params" or "tags"). A refusal as a
        duplicate is success when the run holds exactly these values: another copy of this batch wrote
        them. Any other value stays an error (MLflow params are immutable)."""
        try:
            self.client.log_batch(self.run_id, **{kind: entities})
        except Exception as e:
            if not _DUPLICATE.search(str(e)):
                raise
            stored = getattr(self.client.get_run(self.run_id).data, kind)
            if any(stored.get(x.key) != x.value for x in entities):
                raise
            log.info(
                "MLflow run %s: its %d %s were written by another copy of the batch", self.run_id, len(entities), kind
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifacts(self.run_id, str(directory), artifact_path))

    def close(self, status: str | None) -> None:
        """Deliver what is pending, then end the run with ``status`` (None: leave it open); a metric
        that cannot be delivered is an error naming the run."""
        try:
            self.flush()
        except Exception as e:
            steps = sorted({m.step for m in self.pending})
            raise TrackingError(
                f"MLflow run {self.run_id}: the metrics of steps {steps} could not be delivered ({e}); "
                f"the run is incomplete"
            ) from e
        if status is not None:
            self._call(lambda: self.client.set_terminated(self.run_id, status=status))

    def log_dataset(self, path: Path, name: str, context: str) -> None:
        """Record a data-format .npz as an MLflow dataset input, with the sha256 of the file as digest."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        arrays = load_npz(path)
        with warnings.catch_warnings():
            # MLflow registers its local artifact store for both "" and "file" URIs, so a file:// source
            # matches two identical dataset-source classes and it warns on every run; either is right
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_numpy(
                arrays["images"],
                targets=arrays["labels"],
                source=Path(path).resolve().as_uri(),
                name=name,
                digest=sha256_file(path)[:32],
            )
        entity = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])
        self._call(lambda: self._log_input(entity))

    def _log_input(self, entity) -> None:
        """``log_inputs`` of one dataset, once more if refused as a duplicate: the server looks up the
        experiment's datasets before it adds a new one, so two runs logging the same dataset at once
        can both add it, and the second is refused. The refused write was rolled back whole; the
        second try finds the dataset and only links this run to it."""
        try:
            self.client.log_inputs(self.run_id, datasets=[entity])
        except Exception as e:
            if not _DUPLICATE.search(str(e)):
                raise
            log.info(
                "MLflow run %s: dataset %s was added by another run at once; linking to it",
                self.run_id,
                entity.dataset.name,
            )
            self.client.log_inputs(self.run_id, datasets=[entity])


def epoch_logger(run: Run, continuing: bool) -> Callable[[int, dict], None]:
    """The train worker's ``on_epoch`` callback: logs each epoch's metrics with the epoch as step.

    A continued run logs only the epochs it lacks: a kill between the checkpoint and the MLflow
    call leaves that epoch unlogged, and the resumed training replays it."""
    logged = run.logged_steps("validation_accuracy") if continuing else set()

    def log_epoch(epoch: int, metrics: dict) -> None:
        if epoch not in logged:
            values = {k: v for k, v in metrics.items() if k not in ("epoch", "resumed")}
            run.log_metrics(values, step=epoch, buffer=True)

    return log_epoch
