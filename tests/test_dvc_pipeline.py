"""End to end: the real `dvc repro` of the data stages in a fresh git repository.

Runs with small synthetic IDX files as the local mirror, and with the real MNIST from
../shared/data/mnist where it exists (a clean clone in CI has it beside the repository).
"""

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from synthetic import REAL_MNIST, write_mnist

from pipeline.files import load_npz

ROOT = Path(__file__).resolve().parents[1]
# digits 0-9 in the real MNIST (shared/data/mnist/README.md)
REAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
REAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def sha256_of_gzip(path: Path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


def sh(*args, cwd, env=None):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def make_project(tmp_path: Path) -> Path:
    """A new git repository holding the pipeline's tracked files, as a fresh clone would."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    sh("git", "init", "-q", cwd=project)
    return project


def dvc_env(mirror: Path) -> dict:
    env = dict(os.environ, MNIST_MIRROR=str(mirror))
    # the stages run `python`: make it this interpreter, whatever PATH says
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture(params=["real", "synthetic"])
def mirror(request, tmp_path):
    """The real MNIST where ../shared has it; small synthetic files always (a fresh machine has only those)."""
    if request.param == "real":
        if not REAL_MNIST.is_dir():
            pytest.skip(f"no real MNIST at {REAL_MNIST}")
        return REAL_MNIST, True
    write_mnist(tmp_path / "mirror", n_train=200, n_test=40)
    return tmp_path / "mirror", False


def test_dvc_repro_data_stages(tmp_path, mirror):
    mirror_dir, real = mirror
    project = make_project(tmp_path)
    env = dvc_env(mirror_dir)
    if not real:
        # synthetic files have their own checksums, and fewer images than the book's split
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["prepare"] = {"train_size": 150, "validation_size": 50}
        params["download"]["sha256"] = {path.name.removesuffix(".gz"): sha256_of_gzip(path) for path in mirror_dir.iterdir()}
        (project / "params.yaml").write_text(yaml.safe_dump(params))

    sh(sys.executable, "-m", "dvc", "repro", "expand", cwd=project, env=env)

    train = load_npz(project / "data/prepared/train.npz")
    validation = load_npz(project / "data/prepared/validation.npz")
    test = load_npz(project / "data/prepared/test.npz")
    expanded = load_npz(project / "data/expanded/train.npz")
    if real:
        assert (len(train["labels"]), len(validation["labels"]), len(test["labels"])) == (50_000, 10_000, 10_000)
        both = np.bincount(np.concatenate([train["labels"], validation["labels"]]), minlength=10)
        assert both.tolist() == REAL_TRAIN_COUNTS
        assert np.bincount(test["labels"], minlength=10).tolist() == REAL_TEST_COUNTS
        assert len(expanded["labels"]) == 250_000
    else:
        assert (len(train["labels"]), len(validation["labels"]), len(test["labels"])) == (150, 50, 40)
        assert len(expanded["labels"]) == 750
    assert np.bincount(expanded["labels"], minlength=10).tolist() == (5 * np.bincount(train["labels"], minlength=10)).tolist()

    # a second repro has nothing to do, and the lock file records every stage
    again = sh(sys.executable, "-m", "dvc", "repro", "expand", cwd=project, env=env)
    assert "didn't change, skipping" in again.stdout
    lock = (project / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in ("download", "prepare", "expand"))
