"""Where MLflow runs go, however they were started (``dvc repro``, ``dvc exp run``, by hand), and a check
that the store can be used before any training starts.

Where runs go: ``$MLFLOW_TRACKING_URI`` if set (a server, or any store MLflow knows); otherwise a
SQLite file ``mlflow.db`` at the root of the repository, by absolute path, with artifacts beside
it in ``mlartifacts/``. "The root" is ``$DVC_ROOT`` when DVC runs the stage -- DVC points it at
the user's repository even when ``dvc exp run --queue`` or ``--temp`` executes the stage in a
temporary copy under ``.dvc/tmp/exps`` -- so queued runs are not lost when the copy is deleted.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.tracking.run import TrackingError, retry_seconds

__all__ = [
    "ARTIFACTS_DIR",
    "DB_NAME",
    "ENV_URI",
    "SQLITE_TIMEOUT_S",
    "artifact_location",
    "check_login",
    "check_reachable",
    "project_root",
    "sqlite_database",
    "tracking_uri",
    "uri_source",
]

ENV_URI = "MLFLOW_TRACKING_URI"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# SQLite waits this long for a lock held by another writer (two queue workers) before failing
SQLITE_TIMEOUT_S = 60


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
    source = uri_source(uri)
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


def uri_source(uri: str) -> str:
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
