"""The pipeline against the RUNNING team stack (tests/stack/run.sh starts and stops it): a wrong
password, a DVC experiment landing in PostgreSQL and RGW, DVC push/pull, experiments shared with
`dvc exp push`/`pull`, queued experiments, and a training that survives a restart of the MLflow
server or of PostgreSQL, restarted while the training is paused after an epoch
(pipeline/core/pause.py). Every request goes to 127.0.0.1 only."""

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from project import ROOT, configure, dvc_env, make_project, sh, synthetic_checksums
from servers import creds, pid_of, release, restart, stack_command, stack_http, wait_for_pause
from synthetic import TINY_NET, write_mnist, write_prepared


def client_env(env, **extra):
    """The environment of a pipeline user: this one without any stack variable, plus MLflow's three."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "STACK_"))}
    base.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
    base.update(PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", **extra)
    return base


def runs_of(env, experiment):
    """The runs of ``experiment``, read over REST as the reader user."""
    who = creds(env, "reader")
    r = stack_http(
        env, "GET", "/api/2.0/mlflow/experiments/get-by-name", auth=who, params={"experiment_name": experiment}
    )
    if r.status_code == 404:
        return []
    assert r.status_code == 200, r.text
    exp_id = r.json()["experiment"]["experiment_id"]
    r = stack_http(env, "POST", "/api/2.0/mlflow/runs/search", auth=who, json={"experiment_ids": [exp_id]})
    assert r.status_code == 200, r.text
    return r.json().get("runs", [])


def metric_steps(env, run_id, key):
    r = stack_http(
        env,
        "GET",
        "/api/2.0/mlflow/metrics/get-history",
        auth=creds(env, "reader"),
        params={"run_id": run_id, "metric_key": key, "max_results": 1000},
    )
    assert r.status_code == 200, r.text
    return sorted(m.get("step", 0) for m in r.json().get("metrics", []))


def assert_no_secret(secrets, text, where):
    for s in secrets:
        assert s not in text, f"a credential appears in {where}"


# ------------------------------------------------------------------ a wrong password
def test_a_wrong_password_stops_the_train_stage_before_training(env, secrets, tmp_path):
    write_prepared(tmp_path / "prepared")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    configure(tmp_path, train={"architecture": TINY_NET, "epochs": 1})
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--prepared", "prepared", "--no-progress"],
        cwd=tmp_path,
        env=client_env(env, MLFLOW_TRACKING_PASSWORD="wrong-" + uuid.uuid4().hex),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stdout + p.stderr
    uri = env["MLFLOW_TRACKING_URI"]
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: MLflow server {uri} refused the login of MLFLOW_TRACKING_USERNAME='pipeline' (401): "
        "check MLFLOW_TRACKING_PASSWORD"
    )
    assert not (tmp_path / "data").exists()  # nothing trained, no checkpoint
    assert_no_secret(secrets, p.stdout + p.stderr, "the stage's output")


# ------------------------------------------------------------------ faults in the middle of a training
PAUSE_AT, EPOCHS = 2, 4


@pytest.mark.parametrize("component", ["mlflow", "postgres"])
def test_a_training_survives_a_restart(env, env_file, tmp_path, component):
    experiment = f"stack-fault-{component}-{uuid.uuid4().hex[:8]}"
    write_prepared(tmp_path / "prepared")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    configure(
        tmp_path,
        train={"architecture": TINY_NET, "epochs": EPOCHS, "eta": 0.5, "lmbda": 0.0, "steps_per_call": 20},
        tracking={"experiment": experiment},
    )
    pause = tmp_path / "pause"
    pause.mkdir()
    log = (tmp_path / "train.log").open("w")
    train = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--prepared", "prepared", "--no-progress"],
        cwd=tmp_path,
        env=client_env(env, PIPELINE_PAUSE_AT_EPOCH=str(PAUSE_AT), PIPELINE_PAUSE_DIR=str(pause)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        (paused,) = wait_for_pause(pause, lambda: train.poll() is None)
        assert paused == {"epoch": PAUSE_AT, "pid": train.pid}
        (run,) = runs_of(env, experiment)
        run_id = run["info"]["run_id"]
        assert metric_steps(env, run_id, "validation_accuracy") == list(range(1, PAUSE_AT + 1))
        before = pid_of(env, component)
        restarted_s = restart(component, env, env_file)
        assert pid_of(env, component) != before, f"{component} kept its process"
        assert train.poll() is None  # still paused: the restart fell between epochs PAUSE_AT and PAUSE_AT + 1
        assert metric_steps(env, run_id, "validation_accuracy") == list(range(1, PAUSE_AT + 1))  # none lost
        release(pause)
        rc = train.wait(timeout=300)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(timeout=30)
        log.close()
    output = (tmp_path / "train.log").read_text()
    assert rc == 0, output
    (run,) = runs_of(env, experiment)
    assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
    assert metric_steps(env, run_id, "validation_accuracy") == list(range(1, EPOCHS + 1)), output
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["epochs_run"] == EPOCHS and metrics["final_best_epoch"] >= 1, metrics
    print(
        f"{component} restarted in {restarted_s:.1f} s while the training was paused after epoch {PAUSE_AT}; "
        f"run {run_id} FINISHED with validation_accuracy at epochs 1..{EPOCHS}, each once"
    )
    print("\n".join(line for line in output.splitlines() if "retrying" in line or "kept to resend" in line)[:3000])


# ------------------------------------------------------------------ dvc exp run, push, pull
GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@localhost")
DVC = (sys.executable, "-m", "dvc")


def team_project(env, env_file, tmp, prefix):
    """A new git + DVC project in ``tmp`` (tiny synthetic MNIST mirror, its baseline committed) that
    logs to the stack's server under a fresh experiment: (project, experiment, the stages' env)."""
    project = make_project(tmp)
    write_mnist(tmp / "mirror", n_train=200, n_test=40)
    experiment = f"{prefix}-{uuid.uuid4().hex[:8]}"
    configure(
        project,
        download={"sha256": synthetic_checksums(tmp / "mirror")},
        prepare={"train_size": 150, "validation_size": 50},
        train={"architecture": TINY_NET, "epochs": 3, "eta": 0.5, "lmbda": 0.0, "steps_per_call": 15},
        evaluate={"gallery_size": 4},
        tracking={"experiment": experiment},
    )
    run_env = client_env(env, **{k: v for k, v in dvc_env(tmp / "mirror").items() if k in ("PATH", "MNIST_MIRROR")})
    run_env.pop("PYTHONPATH")  # the stages run the project's own copy of the pipeline
    # the team's DVC remote in the baseline: `dvc exp push` reads it from the experiment's commit
    sh(*stack_command("dvc-remote", project), cwd=project, env=stack_env(run_env, env_file))
    sh("git", "add", "-A", cwd=project)
    sh(*GIT, "commit", "-qm", "baseline", cwd=project)
    return project, experiment, run_env


def stack_env(run_env, env_file):
    """The environment of the stack's `dvc-remote`: a user's, plus where the env file is."""
    return {**run_env, "STACK_ENV_FILE": env_file}


@pytest.fixture(scope="module")
def experiment_project(env, env_file, secrets, tmp_path_factory):
    """A new git + DVC project whose `dvc exp run -S train.epochs=1` logged to the stack."""
    project, experiment, run_env = team_project(env, env_file, tmp_path_factory.mktemp("team"), "stack-e2e")
    p = subprocess.run(
        [*DVC, "exp", "run", "-S", "train.epochs=1"],
        cwd=project,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert_no_secret(secrets, p.stdout + p.stderr, "the stages' output")
    return project, experiment, run_env, GIT


def test_dvc_exp_run_lands_a_finished_run_with_its_model_in_rgw(env, experiment_project, pipeline_client, s3, tmp_path):
    project, experiment, _, _ = experiment_project
    (run,) = runs_of(env, experiment)
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert 0 <= metrics["test_accuracy"] <= 1
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.epochs"] == "1"
    local = (project / "data" / "model" / "model.npz").read_bytes()
    # through the server, as the pipeline user
    downloaded = pipeline_client.download_artifacts(run_id, "model_files/model.npz", str(tmp_path))
    assert Path(downloaded).read_bytes() == local
    # and as an object in the RGW artifact bucket
    bucket = env["STACK_ARTIFACT_BUCKET"]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", []) if run_id in o["Key"]]
    (key,) = [k for k in keys if k.endswith("model_files/model.npz")]
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == local


def tree_hashes(directory):
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def test_dvc_push_then_a_clone_pulls_identical_outputs(env, env_file, secrets, experiment_project):
    project, _, run_env, git = experiment_project  # its baseline has the team remote (team_project)
    sh("git", "add", "-A", cwd=project)
    sh(*git, "commit", "-qm", "experiment", cwd=project)
    sh(sys.executable, "-m", "dvc", "push", "-q", cwd=project, env=run_env)
    clone = project.parent / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=project.parent)
    assert not (clone / "data" / "model").exists()
    sh(*stack_command("dvc-remote", clone), cwd=clone, env=stack_env(run_env, env_file))
    sh(sys.executable, "-m", "dvc", "pull", "-q", cwd=clone, env=run_env)
    for out in ("data/prepared", "data/model"):
        assert tree_hashes(clone / out) == tree_hashes(project / out) != {}, out
    tracked = sh("git", "ls-files", "-z", cwd=project).stdout.split("\0")
    for name in filter(None, tracked):
        assert_no_secret(secrets, (project / name).read_text(errors="replace"), name)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def exp_shown(cwd, run_env):
    """{experiment name: its metrics files' data} from `dvc exp show --json -A` (all commits)."""
    shown = json.loads(sh(*DVC, "exp", "show", "--json", "-A", cwd=cwd, env=run_env).stdout)
    return {
        e["name"]: rev["data"]["metrics"]
        for baseline in shown
        for e in (baseline.get("experiments") or [])
        for rev in e["revs"]
        if e.get("name")
    }


# ------------------------------------------------------------------ dvc exp push / pull through a shared git repository
def test_share_an_experiment_with_exp_push_and_exp_pull(env, env_file, secrets, experiment_project, tmp_path):
    project, experiment, run_env, _ = experiment_project
    (run,) = runs_of(env, experiment)
    name = {t["key"]: t["value"] for t in run["data"]["tags"]}["dvc.exp_name"]
    assert name in sh(*DVC, "exp", "ls", "-A", "--name-only", cwd=project, env=run_env).stdout.split()
    # the team's git repository: a bare one on this disk; the DVC remote (in the baseline): RGW's bucket
    origin = tmp_path / "origin.git"
    sh("git", "init", "-q", "--bare", str(origin), cwd=tmp_path)
    sh("git", "remote", "add", "origin", str(origin), cwd=project)
    sh("git", "push", "-q", "origin", "HEAD", cwd=project)
    pushed = sh(*DVC, "exp", "push", "origin", name, cwd=project, env=run_env)
    assert_no_secret(secrets, pushed.stdout + pushed.stderr, "`dvc exp push`'s output")
    assert sh("git", "ls-remote", str(origin), f"refs/exps/*/{name}", cwd=tmp_path).stdout.strip()

    # B: a fresh clone of the team's repository, with the team's DVC remote
    clone = tmp_path / "b"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    sh(*stack_command("dvc-remote", clone), cwd=clone, env=stack_env(run_env, env_file))
    assert not (clone / "data" / "model").exists()
    pulled = sh(*DVC, "exp", "pull", "origin", name, cwd=clone, env=run_env)
    assert_no_secret(secrets, pulled.stdout + pulled.stderr, "`dvc exp pull`'s output")
    metrics = exp_shown(clone, run_env)[name]
    assert metrics == exp_shown(project, run_env)[name]
    assert 0 <= metrics["data/metrics/evaluate.json"]["data"]["test_accuracy"] <= 1
    sh(*DVC, "exp", "apply", name, cwd=clone, env=run_env)
    model = "data/model/model.npz"
    assert sha256(clone / model) == sha256(project / model)
    print(f"experiment {name}: pushed from A, pulled and applied in B, {model} identical")


# ------------------------------------------------------------------ queued experiments log to the server
def test_queued_experiments_log_finished_runs_to_the_server(env, env_file, secrets, tmp_path):
    project, experiment, run_env = team_project(env, env_file, tmp_path, "stack-queue")
    etas = ("0.3", "0.2")
    for eta in etas:
        sh(*DVC, "exp", "run", "--queue", "-S", f"train.eta={eta}", "-S", "train.epochs=1", cwd=project, env=run_env)
    # the worker inherits this environment (the server's URI and the pipeline user's login); it
    # outlives `dvc queue start`, so no pipe to it (that would keep this call waiting)
    subprocess.run(
        [*DVC, "queue", "start"],
        cwd=project,
        env=run_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=120,
    )
    try:
        deadline = time.monotonic() + 600  # a bound on a hang (CI runs this beside pytest)
        while time.monotonic() < deadline:
            status = sh(*DVC, "queue", "status", cwd=project, env=run_env).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(3)
    finally:
        sh(*DVC, "queue", "stop", "--kill", cwd=project, env=run_env, check=False)  # a task still running too
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    logs = [sh(*DVC, "queue", "logs", t, cwd=project, env=run_env, check=False).stdout for t in failed]
    assert_no_secret(secrets, status + "\n".join(logs), "the queue's status and logs")
    assert status.count("Success") == 2, status + "\n".join(logs)

    names = set(sh(*DVC, "exp", "ls", "-A", "--name-only", cwd=project, env=run_env).stdout.split())
    logged = {}  # eta: the DVC experiment's name, for each run on the server
    for run in runs_of(env, experiment):
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert run["info"]["status"] == "FINISHED" and params["train.epochs"] == "1", run["info"]
        assert 0 <= {m["key"]: m["value"] for m in run["data"]["metrics"]}["test_accuracy"] <= 1
        logged[params["train.eta"]] = {t["key"]: t["value"] for t in run["data"]["tags"]}["dvc.exp_name"]
    assert sorted(logged) == sorted(etas) and set(logged.values()) == names and len(names) == 2, (logged, names)
    print(f"queued experiments: FINISHED runs on the server, train.eta: DVC experiment {logged}")
