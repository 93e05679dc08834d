"""MLflow tracking for every run, however it was started (``dvc repro``, ``dvc exp run``, by hand).

Where runs go: ``$MLFLOW_TRACKING_URI`` if set (a server, or any store MLflow knows); otherwise a
SQLite file ``mlflow.db`` at the root of the repository, by absolute path, with artifacts beside
it in ``mlartifacts/``. "The root" is ``$DVC_ROOT`` when DVC runs the stage -- DVC points it at
the user's repository even when ``dvc exp run --queue`` or ``--temp`` executes the stage in a
temporary copy under ``.dvc/tmp/exps`` -- so queued runs are not lost when the copy is deleted.

One MLflow run per training: the train stage opens it and logs params, tags, per-epoch metrics and
the model; the evaluate stage reopens the same run (its id is saved beside the metrics, in
``mlflow_run.json``) and adds the test metrics and plots. Whatever ends a stage early -- an error,
NaN, Ctrl-C, SIGTERM -- marks the run FAILED with the reason as a tag, so nothing is left "running".
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import require
from pipeline.core.files import write_json
from pipeline.tracking.run import Run, TrackingError, retry_locked, retry_seconds, retry_transient

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# beside the metrics, not in the model directory (its DVC hash depends on the weights alone): the run
# evaluate continues; beside checkpoints: the run a resume continues
RUN_FILE = "mlflow_run.json"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, all empty), with it
# on the table of training runs
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# SQLite waits this long for a lock held by another writer (two queue workers) before failing
SQLITE_TIMEOUT_S = 60


@dataclass(frozen=True)
class TrackingConfig:
    """The ``tracking`` section of params.yaml."""

    experiment: str = "nndl-chapter6"
    enabled: bool = True
    # the Model Registry's model that evaluate adds a version to: None is "<experiment>-model", "" is none
    registered_model: str | None = None
    system_metrics: bool = True  # CPU, memory, disk, network (GPU with nvidia-ml-py) while a training runs

    def __post_init__(self):
        require(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "must not be empty")
        if self.registered_model is not None:
            name = self.registered_model
            require(name == name.strip(), "tracking.registered_model", name, "must not start or end with spaces")
            require("'" not in name and "/" not in name, "tracking.registered_model", name, "must not hold ' or /")

    @property
    def registered_model_name(self) -> str | None:
        """The registered model's name, or None when registering is off."""
        if self.registered_model is None:
            return f"{self.experiment}-model"
        return self.registered_model or None


def project_root() -> Path:
    """The user's repository: $DVC_ROOT under DVC, else the nearest parent with a .dvc directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for directory in (here, *here.parents):
        if (directory / ".dvc").is_dir():
            return directory
    return here


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, or the repository's SQLite store by absolute path."""
    uri = os.environ.get(ENV_URI, "").strip()
    if uri:
        return uri
    return f"sqlite:///{project_root() / DB_NAME}?timeout={SQLITE_TIMEOUT_S}"


def sqlite_database(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI (its ``?timeout=`` and other options left out)."""
    return Path(uri.removeprefix("sqlite:///").split("?")[0])


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a local store; a server decides for itself."""
    if uri.startswith("sqlite:///"):  # mlartifacts/ beside the database file, wherever that is
        return (sqlite_database(uri).parent / ARTIFACTS_DIR).as_uri()
    if uri.startswith("file:") or "://" not in uri:
        return (project_root() / ARTIFACTS_DIR).as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail early, naming the URI, when the store cannot be used: before any training starts."""
    source = _uri_source(uri)
    retry_seconds()  # a bad $PIPELINE_TRACKING_RETRY_S fails here, not at the first retry
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server unreachable ({source}): {reason}. Start it "
                f"(`mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --port 5000`), fix the URI, "
                f"or unset {ENV_URI} to use the repository's SQLite store"
            ) from None
        check_login(uri, timeout)
    elif uri.startswith("sqlite:///"):
        directory = sqlite_database(uri).parent
        if not directory.is_dir() or not os.access(directory, os.W_OK):
            raise TrackingError(
                f"MLflow store {source}: directory {str(directory)!r} does not exist or is not writable"
            )


def _uri_source(uri: str) -> str:
    return f"{ENV_URI}={uri!r}" if os.environ.get(ENV_URI) else f"the default store {uri!r}"


def check_login(uri: str, timeout: float = 5.0) -> None:
    """One authenticated read, as MLflow's client sends it (basic auth from MLFLOW_TRACKING_USERNAME and
    _PASSWORD): a server with logins answers 401 to a wrong password. The password is never shown."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    if user is not None:
        login = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(login).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        if e.code != 401:
            return  # anything else (an old server, a proxy) is left to the client's own calls
        who = f"the login of MLFLOW_TRACKING_USERNAME={user!r}" if user is not None else "a request without login"
        hint = "check MLFLOW_TRACKING_PASSWORD" if user is not None else "set MLFLOW_TRACKING_USERNAME and _PASSWORD"
        raise TrackingError(f"MLflow server {uri} refused {who} (401): {hint}") from None
    except (urllib.error.URLError, OSError, ValueError):
        return  # /health answered a moment ago: a blip is left to the client's retries


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'eta': 0.1}} -> {'train.eta': '0.1'}; lists become JSON (MLflow params are strings)."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """Git commit and dirtiness of the working copy; DVC experiment name and baseline when set."""
    tags = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


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
                f"MLflow store {_uri_source(uri)}: {' '.join(e.message.split())} "
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


def remember_run(checkpoint_dir: Path, run: Run, fingerprint: str) -> None:
    """Note which run trains from this checkpoint directory, so a resumed training continues it."""
    write_json(
        Path(checkpoint_dir) / RUN_FILE,
        {"run_id": run.run_id, "fingerprint": fingerprint, "tracking_uri": tracking_uri()},
    )


def resumable_run(checkpoint_dir: Path, fingerprint: str) -> str | None:
    """The run to continue: the one that trained the checkpoint with these very params, in this store."""
    saved = read_run_file(Path(checkpoint_dir) / RUN_FILE)
    if saved is None:
        return None
    same = saved.get("fingerprint") == fingerprint and saved.get("tracking_uri") == tracking_uri()
    return saved.get("run_id") if same else None


def save_run_reference(path: Path, run: Run | None) -> None:
    """Record in ``path`` which run a model belongs to (the evaluate stage continues that run).

    A file apart from the model directory: a run id inside it would give two trainings with the same
    weights different DVC hashes, and re-run every stage after them."""
    if run is not None:
        write_json(Path(path), {"run_id": run.run_id, "tracking_uri": tracking_uri()})


def load_run_reference(path: Path | None) -> str | None:
    """The run id in ``path`` (the train stage's ``mlflow_run.json``); None when there is no such file."""
    saved = read_run_file(path) if path is not None else None
    return saved.get("run_id") if saved is not None else None


def read_run_file(path: Path) -> dict[str, Any] | None:
    """A run file (``mlflow_run.json``) as a dict whose run_id, if any, is an id; None when there is none."""
    if not Path(path).is_file():
        return None
    redo = "delete it, or rerun the train stage, which writes it"
    try:
        saved = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON
        raise TrackingError(f"{path}: not valid JSON ({type(e).__name__}: {e}); {redo}") from None
    if not isinstance(saved, dict):
        raise TrackingError(f"{path}: expected an object with a run_id, got {type(saved).__name__}; {redo}")
    run_id = saved.get("run_id")
    # it goes into the store's queries and URLs: letters, digits, - and _ only, as MLflow's own ids
    if run_id is not None and not (isinstance(run_id, str) and re.fullmatch(r"[\w-]{1,128}", run_id)):
        raise TrackingError(f"{path}: run_id={run_id!r} is not an MLflow run id; {redo}")
    return saved


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
