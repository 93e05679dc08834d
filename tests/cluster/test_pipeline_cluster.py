"""The pipeline on a real two-node Ray cluster (tests/cluster/run.sh: two network namespaces, the
team stack on their bridge): the quick table and an Optuna sweep run on both nodes and match a run
on one machine; a second sweep call adds trials to the same PostgreSQL study; a worker node killed
in the middle of a sweep (its training paused after an epoch by pipeline/core/pause.py) costs
nothing: its training resumes on the other node from that epoch's checkpoint in the S3 store, to
the same numbers, and no MLflow run stays RUNNING."""

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

from servers import failure, release, wait_for_pause

PAUSE_AT, EPOCHS = 2, 3
# two trials, one on each node (1 Ray CPU each), both paused after epoch PAUSE_AT
SWEEP = ["-S", "train.architecture=shallow", "-S", "train.eta=0.1,0.03", "-S", f"train.epochs={EPOCHS}"]
SEARCH = ["-S", "train.architecture=shallow", "-S", "train.eta=tag(log, interval(0.01, 1))", "-S", "train.epochs=2"]


@pytest.fixture(scope="session")
def project(cluster) -> Path:
    """A DVC repository as a team member has it: params.yaml, the data sets, the team's remote."""
    sizes = {  # the quick table's sizes (it trains on the first 2,000 images)
        "prepared/train": 2000,
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
    assert done.returncode == 0, failure(done.stderr, 3000)


def experiment_runs(stack_env: dict, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    os.environ.update(
        {k: stack_env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    )  # the test's own reads of the server
    client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


def validation_steps(stack_env: dict, run) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "validation_accuracy"))


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
    assert done.returncode == 0, failure(done.stderr, 4000)
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
    assert done.returncode == 0, failure(done.stderr, 4000)
    done = pipeline(cluster, project, "sweep", *search, "--trials", "5", "--seed", "2", experiment="search")
    assert done.returncode == 0, failure(done.stderr, 4000)

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
    pause = project / "pause-kill"  # one file system: both namespaces see it
    pause.mkdir()
    sweep = [*SWEEP, "--name", "kill", "--no-progress", "--prepared", "data/prepared"]
    driver = cluster.popen_in_head(
        driver_argv(cluster, project, "sweep", *sweep, "--out", "kill-ray", "--ray", "auto", experiment="kill"),
        env={"PYTHONPATH": str(REPO), "PIPELINE_PAUSE_AT_EPOCH": str(PAUSE_AT), "PIPELINE_PAUSE_DIR": str(pause)},
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            paused = wait_for_pause(pause, lambda: driver.poll() is None, count=2, limit_s=400)
        except AssertionError as e:
            if driver.poll() is None:
                raise
            raise AssertionError(f"{e}; the driver said: {failure(driver.communicate()[0], 4000)}") from e
        assert sorted(cluster.node_of(p["pid"]) for p in paused) == ["head", "worker"], paused
        (killed_run,) = [
            r for r in experiment_runs(stack_env, "kill") if r.data.tags.get("ray.node_ip") == cluster.worker_ip
        ]
        assert killed_run.info.status == "RUNNING" and validation_steps(stack_env, killed_run) == list(
            range(1, PAUSE_AT + 1)
        )
        noticed = cluster.kill_worker()
        release(pause)
        output, _ = driver.communicate(timeout=600)
    finally:
        release(pause)  # a failure above must not leave trainings holding the nodes' CPUs
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
    assert driver.returncode == 0, failure(output, 4000)
    print(f"worker killed after epoch {PAUSE_AT} of run {killed_run.info.run_id}; the head noticed in {noticed:.0f} s")

    runs = experiment_runs(stack_env, "kill")
    assert "RUNNING" not in {r.info.status for r in runs} and {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    resumed = next(r for r in runs if r.info.run_id == killed_run.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["ray.node_ip"] == cluster.ip("head")
    assert validation_steps(stack_env, resumed) == list(range(1, EPOCHS + 1))  # every epoch once: none lost, none twice
    key = resumed.data.tags["sweep.trial"]
    metrics = json.loads((project / "kill-ray" / "trials" / key / "metrics" / "train_timings.json").read_text())
    assert metrics["resumed_from_epoch"] == PAUSE_AT

    # the same numbers as one uninterrupted training of each point on one machine
    local = ["sweep", "--params", params_for(project, "kill-local"), *sweep, "--out", "kill-local"]
    on_one_machine(project, project / "kill-local", *local)
    ray = json.loads((project / "kill-ray" / "sweep.json").read_text())["trials"]
    local = json.loads((project / "kill-local" / "sweep.json").read_text())["trials"]
    assert [(t["key"], t["validation_accuracy"], t["best_epoch"]) for t in ray] == [
        (t["key"], t["validation_accuracy"], t["best_epoch"]) for t in local
    ]
