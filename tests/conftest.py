"""Test isolation: no test writes to the user's MLflow store or leaves anything at the repository root.

Running ``pytest`` inside a checkout that holds the user's own ``mlflow.db`` must not add runs to it:

- ``tracking_store`` (autouse) points every test at a fresh temporary store through
  ``MLFLOW_TRACKING_URI`` and clears ``DVC_ROOT``; a test that wants another store sets (or
  deletes) the variable itself, with ``monkeypatch``, which is undone after it;
- ``repository_root_untouched`` (autouse, once per session) does the same for fixtures wider than
  a test, and fails the session, naming the entries, when anything new appeared at the root; it also
  gives the session its own temporary directory ($TMPDIR) and pipeline cache folder ($NNDL_CACHE_DIR).

Only the standard library and pytest here: tests/test_isolation.py runs this file in a fresh
directory standing for a repository.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests send traffic to 127.0.0.1 only. MLflow 3 starts its usage telemetry when it is imported (before
# any fixture runs) unless this is set; it is off under CI=true anyway, not in a developer's plain pytest.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

# Two XLA CPU devices whatever the machine's cores (pipeline.nn.data_parallel; the pipeline's default
# is one per core), so that every test trains on the devices CI has and the results do not vary.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()

ROOT = Path(__file__).resolve().parents[1]
# a migrated store copied into each test's, and XLA's compilation cache for the session: tests/fixtures_store.py
pytest_plugins = ["fixtures_store"]
# made by pytest itself, before any test runs, when the cache plugin is on (and gitignored)
RUNNER_FILES = {".pytest_cache"}


def _root_entries() -> set[str]:
    return set(os.listdir(ROOT)) - RUNNER_FILES


@pytest.fixture(scope="session", autouse=True)
def repository_root_untouched(tmp_path_factory):
    before = _root_entries()
    # a local Ray instance (--jobs N) keeps its session files here, not in /tmp/ray; short, for its sockets
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # what the libraries write to the temporary directory and leave there (MLflow's database lock files,
    # PyTensor's generated sources, torch's compile cache) goes to the session's, in this process and
    # in every process it starts; and the pipeline's cache folder is the session's, not ~/.cache
    session_tmp = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('session-store') / 'mlflow.db'}")
        mp.delenv("DVC_ROOT", raising=False)
        mp.setenv("RAY_TMPDIR", ray_tmp)
        mp.setenv("DVC_NO_ANALYTICS", "1")  # dvc's usage reports would go to the internet
        mp.setenv("TMPDIR", str(session_tmp))
        mp.setattr(tempfile, "tempdir", str(session_tmp))
        mp.setenv("NNDL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield
    shutil.rmtree(ray_tmp, ignore_errors=True)
    new = sorted(_root_entries() - before)
    if new:
        pytest.fail(f"the tests left new entries at the repository root {ROOT}: {', '.join(new)}", pytrace=False)


@pytest.fixture(autouse=True)
def tracking_store(tmp_path_factory, monkeypatch):
    """A temporary SQLite store for this test (created only if the test logs a run)."""
    store = tmp_path_factory.mktemp("store") / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return store
