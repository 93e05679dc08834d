"""End to end: the real `dvc repro` in a fresh git repository: the data stages, and the whole pipeline.

The data stages alone run on the real MNIST from ../shared/data/mnist where it exists (a clean clone
in CI has it beside the repository); the whole pipeline, data stages included, on small synthetic
IDX files as the local mirror (a fresh machine has only those).
"""

import json
import py_compile
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.files import load_npz

from project import configure, dvc_env, make_project, sh, synthetic_checksums
from synthetic import REAL_MNIST, TINY_NET, write_mnist

# digits 0-9 in the real MNIST (shared/data/mnist/README.md)
REAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
REAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


ROOT = Path(__file__).resolve().parents[1]


def check_data_stages(project: Path, sizes: tuple[int, int, int], expanded_size: int) -> None:
    """The prepared split has ``sizes`` (train, validation, test) images; the expanded set is each
    training image and its 4 one-pixel shifts, ``expanded_size`` in all, the labels five times over."""
    train = load_npz(project / "data/prepared/train.npz")
    validation = load_npz(project / "data/prepared/validation.npz")
    test = load_npz(project / "data/prepared/test.npz")
    expanded = load_npz(project / "data/expanded/train.npz")
    assert (len(train["labels"]), len(validation["labels"]), len(test["labels"])) == sizes
    assert len(expanded["labels"]) == expanded_size
    assert (
        np.bincount(expanded["labels"], minlength=10).tolist()
        == (5 * np.bincount(train["labels"], minlength=10)).tolist()
    )


def check_nothing_to_redo(project: Path, env: dict, *target: str) -> None:
    """A second repro has nothing to do, and the lock file records every stage."""
    again = sh(sys.executable, "-m", "dvc", "repro", *target, cwd=project, env=env)
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout, again.stdout
    lock = (project / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in ("download", "prepare", "expand"))


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"no real MNIST at {REAL_MNIST}")
def test_dvc_repro_data_stages_on_the_real_mnist(tmp_path):
    # on synthetic files: test_train_depends_only_on_the_training_set_it_names, the whole pipeline
    project = make_project(tmp_path)
    env = dvc_env(REAL_MNIST)
    sh(sys.executable, "-m", "dvc", "repro", "expand", cwd=project, env=env)
    check_data_stages(project, (50_000, 10_000, 10_000), 250_000)
    prepared = project / "data/prepared"
    labels = {name: load_npz(prepared / f"{name}.npz")["labels"] for name in ("train", "validation", "test")}
    both = np.bincount(np.concatenate([labels["train"], labels["validation"]]), minlength=10)
    assert both.tolist() == REAL_TRAIN_COUNTS
    assert np.bincount(labels["test"], minlength=10).tolist() == REAL_TEST_COUNTS
    check_nothing_to_redo(project, env, "expand")


def _imported_modules(path: Path) -> set[str]:
    """The pipeline modules ``path`` imports anywhere in it (imports inside functions too), and those
    it names by file (``"pyfunc_model.py"``, which MLflow runs by path)."""
    import ast

    package = ".".join(path.parent.relative_to(ROOT).parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            if (path.parent / node.value).is_file():
                found.add(f"{package}.{node.value[:-3]}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # a module imported from a package
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pipeline."))
    return found


def import_closure(module: str) -> set[str]:
    """The files of every pipeline module ``module`` imports, directly or not, relative to the root."""
    todo, closure = [module], set()
    while todo:
        module = todo.pop()
        path = ROOT / (module.replace(".", "/") + ".py")
        if module in closure or not path.is_file():  # a package, or a name imported from a module
            continue
        closure.add(module)
        todo.extend(_imported_modules(path))
    return {module.replace(".", "/") + ".py" for module in closure}


def test_every_stage_depends_on_the_library_folders_it_runs():
    # so that editing any module a stage imports re-runs that stage: its entry module and whole folders
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        needed = import_closure(f"pipeline.stages.{name}") - {"pipeline/__init__.py"}
        needed = {path for path in needed if not path.endswith("/__init__.py")}
        deps = {d for d in stage["deps"] if d.startswith("pipeline/")}
        uncovered = {path for path in needed if not any(path == d or path.startswith(d + "/") for d in deps)}
        assert not uncovered, f"stage {name}: dvc.yaml's deps lack {sorted(uncovered)}"
        unused = {d for d in deps if not any(path == d or path.startswith(d + "/") for path in needed)}
        assert not unused, f"stage {name}: dvc.yaml's deps name what it never imports: {sorted(unused)}"
        assert f"pipeline/stages/{name}.py" in deps


def test_python_bytecode_caches_leave_the_stages_dependencies_unchanged(tmp_path):
    # a user who ran the tests or any stage has __pycache__ folders under pipeline/: the committed
    # dvc.lock must still match, or dvc repro runs every stage again and rewrites the lock
    project = make_project(tmp_path)
    shutil.copy(ROOT / "dvc.lock", project / "dvc.lock")
    env = dvc_env(tmp_path / "no-mirror")
    before = sh(sys.executable, "-m", "dvc", "status", "download", cwd=project, env=env).stdout
    py_compile.compile(
        str(project / "pipeline/core/files.py"), cfile=str(project / "pipeline/core/__pycache__/files.pyc")
    )
    (project / "pipeline/data/__pycache__").mkdir()
    (project / "pipeline/data/__pycache__/x.cpython-311.pyc").write_bytes(b"bytecode")
    after = sh(sys.executable, "-m", "dvc", "status", "download", cwd=project, env=env).stdout
    assert "pipeline/" not in before, f"dvc.lock does not match pipeline/ (run dvc repro and commit it):\n{before}"
    assert after == before


def test_train_depends_only_on_the_training_set_it_names(tmp_path):
    """`dvc repro` end to end; then a new expansion retrains no network of the prepared set, and
    switching train.dataset to the expanded set retrains on it."""
    project = make_project(tmp_path)
    write_mnist(tmp_path / "mirror", n_train=120, n_test=30)
    configure(
        project,
        download={"sha256": synthetic_checksums(tmp_path / "mirror")},
        prepare={"train_size": 90, "validation_size": 30},
        train={
            "architecture": TINY_NET,
            "epochs": 1,
            "eta": 0.5,
            "lmbda": 0.0,
            "steps_per_call": 9,
            "dataset": "prepared",
        },
        tracking={"enabled": False},
        evaluate={"gallery_size": 2},
    )
    env = dvc_env(tmp_path / "mirror")
    dvc = (sys.executable, "-m", "dvc")
    sh(*dvc, "repro", cwd=project, env=env)
    check_data_stages(project, (90, 30, 30), 450)
    check_nothing_to_redo(project, env)
    assert "data/prepared/train.npz" in (project / "dvc.lock").read_text().split("\n  train:")[1]

    # every stage run again leaves git status clean: DVC records what the data and params determine
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "repro", cwd=project)
    assert "Running stage 'train'" in sh(*dvc, "repro", "--force", cwd=project, env=env).stdout
    assert sh("git", "status", "--porcelain", cwd=project).stdout == ""
    assert (project / "data/metrics/train_timings.json").is_file()  # the timings: written, ignored by git

    configure(project, expand={"elastic_copies": 1})
    out = sh(*dvc, "repro", cwd=project, env=env).stdout
    assert "Running stage 'expand'" in out and "Running stage 'train'" not in out, out

    configure(project, train={"dataset": "expanded"})
    out = sh(*dvc, "repro", cwd=project, env=env).stdout
    assert "Running stage 'train'" in out, out
    lock = (project / "dvc.lock").read_text().split("\n  train:")[1].split("\n  evaluate:")[0]
    assert "data/expanded/train.npz" in lock and "data/prepared/train.npz" not in lock
    assert (
        json.loads((project / "data/metrics/train_info.json").read_text())["train_images"] == 90 * 6
    )  # 1 + 4 shifts + 1 elastic
