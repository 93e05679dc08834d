"""A fresh git + DVC repository holding the pipeline, as a new user's clone would, for end-to-end tests."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sha256_of_gzip(path: Path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


def sh(*args, cwd, env=None, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0 or not check, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def make_project(tmp_path: Path) -> Path:
    """A new git repository holding the pipeline's tracked files, as a fresh clone would."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    sh("git", "init", "-q", cwd=project)
    return project


def dvc_env(mirror: Path) -> dict:
    # the project's own store, <project>/mlflow.db, as a user's clone has: not the test's (tests/conftest.py)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["MNIST_MIRROR"] = str(mirror)
    # the stages run `python`: make it this interpreter, whatever PATH says
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def configure(project: Path, **sections) -> None:
    """Update sections of the project's params.yaml (keys merge into the existing section)."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def synthetic_checksums(mirror_dir: Path) -> dict[str, str]:
    """download.sha256 for the synthetic files in ``mirror_dir``."""
    return {path.name.removesuffix(".gz"): sha256_of_gzip(path) for path in Path(mirror_dir).glob("*.gz")}
