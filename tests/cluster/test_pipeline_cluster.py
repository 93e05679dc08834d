"""The pipeline on a real two-node Ray cluster (tests/cluster/run.sh: two network namespaces, the
team stack on their bridge): the quick table and an Optuna sweep run on both nodes and match a run
on one machine; a second sweep call adds trials to the same PostgreSQL study; a worker node killed
in the middle of a sweep costs nothing: its training resumes on the other node from its last
epoch's checkpoint in the S3 store, to the same numbers, and no MLflow run stays RUNNING."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from team_project import REPO, driver_argv, make_project, params_for, pipeline

SWEEP = ["-S", "train.architecture=conv2_relu", "-S", "train.eta=0.1,0.03", "-S", "train.epochs=4"]
SEARCH = ["-S", "train.architecture=shallow", "-S", "train.eta=tag(log, interval(0.01, 1))", "-S", "train.epochs=2"]


@pytest.fixture(scope="session")
def project(cluster) -> Path:
    """A DVC repository as a team member has it: params.yaml, the data sets, the team's remote."""
    sizes = {  # a conv net's epoch on 4,000 images takes seconds: time to kill a node in the middle
        "prepared/train": 4000,
        "prepared/validation": 500,
        "prepared/test": 500,
        "expanded/train": 2000,
    }
    return make_project(cluster, cluster.node_dir("head") / "work" / "project", sizes)


def on_one_machine(project: Path, out: Path, *args: str):
    """The same command in this process's machine alone: one training at a time, a local store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out}.db", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]


def experiment_runs(stack_env: dict, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    os.environ.update(
        {k: stack_env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    )  # the test's own reads of the server
    client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


def without_times(value):
    """results.json without wall times: the numbers a table is made of."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in ("seconds", "code")}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def test_the_quick_table_runs_on_both_nodes_and_matches_one_machine(cluster, project, stack_env):
    table = ["--quick", "--rows", "1,3", "--repeats", "1", "--prepared", "data/prepared"]
    table += ["--expanded", "data/expanded", "--no-progress"]
    start = time.monotonic()
    done = pipeline(cluster, project, "table", *table, "--out", "table-ray", "--ray", "auto", experiment="table")
    assert done.returncode == 0, done.stderr[-4000:]
    cluster_seconds = time.monotonic() - start
    start = time.monotonic()
    on_one_machine(
        project,
        project / "table-local",
        "table",
        "--params",
        params_for(project, "table-local"),
        *table,
        "--out",
        "table-local",
    )
    print(f"quick table rows 1,3: 2 nodes {cluster_seconds:.0f} s, one machine {time.monotonic() - start:.0f} s")

    ray = json.loads((project / "table-ray" / "results.json").read_text())
    local = json.loads((project / "table-local" / "results.json").read_text())
    assert without_times(ray["lines"]) == without_times(local["lines"])
    mask = re.compile(r"\d+(\.\d+)? (s|min|h)\b")
    assert mask.sub("T", (project / "table-ray" / "report.md").read_text()) == mask.sub(
        "T", (project / "table-local" / "report.md").read_text()
    )
    runs = experiment_runs(stack_env, "table")
    children = [r for r in runs if "row" in r.data.tags]
    assert len(children) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["ray.node_ip"] for r in children} == {cluster.ip("head"), cluster.ip("worker")}
    hits, read = cluster.files_with_secrets()
    assert read > 0 and hits == [], f"Ray's files hold a secret: {hits}"
    for node in ("head", "worker"):
        assert cluster.foreign_connections(node) == []


def test_an_optuna_sweep_runs_on_both_nodes_and_a_second_call_adds_to_its_study(cluster, project, stack_env):
    import optuna

    search = [*SEARCH, "--search", "optuna", "--name", "search", "--no-progress", "--ray", "auto"]
    done = pipeline(cluster, project, "sweep", *search, "--trials", "4", "--seed", "1", experiment="search")
    assert done.returncode == 0, done.stderr[-4000:]
    done = pipeline(cluster, project, "sweep", *search, "--trials", "5", "--seed", "2", experiment="search")
    assert done.returncode == 0, done.stderr[-4000:]

    study = optuna.load_study(study_name="search", storage=stack_env["OPTUNA_STORAGE"])
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    runs = experiment_runs(stack_env, "search")
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["sweep.optuna_trial"]) for r in children) == list(range(5))
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["ray.node_ip"] for r in children} == {cluster.ip("head"), cluster.ip("worker")}
    assert parent.data.metrics["best_validation_accuracy"] == study.best_value


def test_a_worker_killed_mid_sweep_loses_nothing(cluster, project, stack_env):
    sweep = [*SWEEP, "--name", "kill", "--no-progress", "--prepared", "data/prepared"]
    driver = cluster.popen_in_head(
        driver_argv(cluster, project, "sweep", *sweep, "--out", "kill-ray", "--ray", "auto", experiment="kill"),
        env={"PYTHONPATH": str(REPO)},
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        killed_run = _wait_for_epoch_on(cluster, stack_env, "kill", cluster.ip("worker"), epoch=2, timeout=400)
        noticed = cluster.kill_worker()
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
    assert driver.returncode == 0, output[-4000:]
    print(f"worker killed after epoch 2 of run {killed_run}; the head noticed in {noticed:.0f} s")

    runs = experiment_runs(stack_env, "kill")
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"} and "RUNNING" not in {r.info.status for r in runs}
    resumed = next(r for r in runs if r.info.run_id == killed_run)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["ray.node_ip"] == cluster.ip("head")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    steps = [m.step for m in client.get_metric_history(killed_run, "validation_accuracy")]
    assert sorted(steps) == list(range(1, 5)), steps  # every epoch once: none lost, none twice
    key = resumed.data.tags["sweep.trial"]
    metrics = json.loads((project / "kill-ray" / "trials" / key / "metrics" / "train_info.json").read_text())
    assert metrics["resumed_from_epoch"] >= 2

    # the same numbers as one uninterrupted training of each point on one machine
    local = ["sweep", "--params", params_for(project, "kill-local"), *sweep, "--out", "kill-local"]
    on_one_machine(project, project / "kill-local", *local)
    ray = json.loads((project / "kill-ray" / "sweep.json").read_text())["trials"]
    local = json.loads((project / "kill-local" / "sweep.json").read_text())["trials"]
    assert [(t["key"], t["validation_accuracy"], t["best_epoch"]) for t in ray] == [
        (t["key"], t["validation_accuracy"], t["best_epoch"]) for t in local
    ]


def _wait_for_epoch_on(cluster, stack_env, experiment: str, node_ip: str, epoch: int, timeout: float) -> str:
    """The run training on ``node_ip`` once it has logged ``epoch`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in experiment_runs(stack_env, experiment):
            if run.data.tags.get("ray.node_ip") == node_ip and run.info.status == "RUNNING":
                if run.data.metrics.get("validation_accuracy") is not None and _last_step(stack_env, run) >= epoch:
                    return run.info.run_id
        time.sleep(1)
    raise AssertionError(f"no run on {node_ip} reached epoch {epoch} in {timeout} s")


def _last_step(stack_env, run) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    return max((m.step for m in client.get_metric_history(run.info.run_id, "validation_accuracy")), default=0)
