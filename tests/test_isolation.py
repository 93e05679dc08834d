"""The suite cannot touch the user's MLflow store or litter the repository root (tests/conftest.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.tracking import TrackingConfig, sqlite_database, tracked_run, tracking_uri

ROOT = Path(__file__).resolve().parents[1]


def test_a_test_without_a_store_of_its_own_logs_to_a_temporary_one(tmp_path):
    uri = tracking_uri()
    assert str(ROOT) not in uri, f"a test would log to the repository's own store: {uri}"
    store = sqlite_database(uri)
    before = set(os.listdir(ROOT))
    with tracked_run(TrackingConfig(experiment="isolation")) as run:
        run.log_metrics({"m": 1.0})
        (tmp_path / "note.txt").write_text("x")
        run.log_artifact(tmp_path / "note.txt")
    # the run went to the test's own store...
    assert MlflowClient(tracking_uri=f"sqlite:///{store}").get_run(run.run_id).data.metrics == {"m": 1.0}
    new = set(os.listdir(ROOT)) - before
    assert not new, f"new at the repository root: {new}"  # ...and its artifacts beside it, not at the root
    assert (store.parent / "mlartifacts").is_dir()
    assert "DVC_ROOT" not in os.environ


def test_a_test_that_sets_its_own_store_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'own.db'}")
    with tracked_run(TrackingConfig(experiment="own")):
        pass
    assert (tmp_path / "own.db").is_file()


def test_a_suite_that_leaves_files_at_the_root_fails_naming_them(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    for name in ("conftest.py", "fixtures_store.py"):
        shutil.copy(ROOT / "tests" / name, repo / "tests" / name)
    (repo / "tests" / "test_litter.py").write_text(
        "from pathlib import Path\n"
        "def test_litter():\n"
        "    (Path(__file__).resolve().parents[1] / 'stray.db').write_text('x')\n"
        "    (Path(__file__).resolve().parents[1] / 'dvc_plots').mkdir()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, result.stdout
    assert "left new entries at the repository root" in result.stdout and "dvc_plots, stray.db" in result.stdout
    # the same suite without the litter passes
    (repo / "stray.db").unlink()
    (repo / "dvc_plots").rmdir()
    (repo / "tests" / "test_litter.py").write_text("def test_clean():\n    pass\n")
    clean = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert clean.returncode == 0, clean.stdout
