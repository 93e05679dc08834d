"""A team member's checkout for the cluster's drivers: params.yaml, synthetic data sets, and the
team's DVC remote (the stack's `dvc-remote`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from servers import REPO, stack_command  # tests/ is on sys.path under pytest, and in measure_quick_table.py
from table_quick import write_set


def make_project(cluster, root: Path, sizes: dict[str, int]) -> Path:
    """``root`` as a git + DVC repository with ``data/<name>.npz`` of ``sizes[name]`` digits each."""
    root.mkdir(parents=True)
    for seed, (name, n) in enumerate(sizes.items(), start=1):
        write_set(root / "data" / f"{name}.npz", n, seed)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = {**os.environ, "STACK_ENV_FILE": str(cluster.stack_env_file), "DVC_NO_ANALYTICS": "1"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, env=env, check=True, timeout=120)
    subprocess.run(stack_command("dvc-remote", root), env=env, check=True, timeout=120)
    return root


def params_for(project: Path, experiment: str) -> str:
    """A params file whose runs go to their own MLflow experiment."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["experiment"] = experiment
    path = project / f"params-{experiment}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path.name


def driver_argv(cluster, project: Path, stage: str, *args: str, experiment: str) -> list:
    python = cluster.venv / "bin" / "python"
    return [python, "-m", "pipeline", stage, "--params", params_for(project, experiment), *args]


def pipeline(cluster, project: Path, stage: str, *args: str, experiment: str, timeout: float = 900):
    """``python -m pipeline STAGE ARGS`` as a driver in the head's namespace, logging to the team's server."""
    argv = driver_argv(cluster, project, stage, *args, experiment=experiment)
    return cluster.run_in_head(argv, env={"PYTHONPATH": str(REPO)}, cwd=project, timeout=timeout)
