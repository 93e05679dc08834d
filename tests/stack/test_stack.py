"""The team stack of deploy/stack.py, tested against the RUNNING services (tests/stack/run.sh starts
and stops them). Skipped unless STACK_ENV_FILE names an env file written by `deploy/stack.py up`
(tests/stack/conftest.py).

Every request goes to 127.0.0.1 only (asserted on each URL)."""

import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from servers import REPO, creds, stack_command, stack_http

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"


# ------------------------------------------------------------------ basic auth
def test_no_credentials_is_401(env):
    assert stack_http(env, "GET", SEARCH).status_code == 401


def test_wrong_password_is_401(env):
    user, _ = creds(env, "pipeline")
    assert stack_http(env, "GET", SEARCH, auth=(user, "not-the-password")).status_code == 401


def test_default_admin_password_is_401(env):
    assert stack_http(env, "GET", SEARCH, auth=("admin", "password1234")).status_code == 401
    assert stack_http(env, "GET", SEARCH, auth=(env["STACK_ADMIN_USERNAME"], "password1234")).status_code == 401


def test_admin_can_read_users(env):
    r = stack_http(
        env,
        "GET",
        "/api/2.0/mlflow/users/get",
        auth=creds(env, "admin"),
        params={"username": env["MLFLOW_TRACKING_USERNAME"]},
    )
    assert r.status_code == 200
    assert r.json()["user"]["is_admin"] is False


def test_pipeline_and_reader_are_not_admins(env):
    for who in ("pipeline", "reader"):
        r = stack_http(
            env,
            "POST",
            "/api/2.0/mlflow/users/create",
            auth=creds(env, who),
            json={"username": f"intruder-{uuid.uuid4().hex[:6]}", "password": uuid.uuid4().hex},
        )
        assert r.status_code == 403, who


@pytest.fixture(scope="module")
def pipeline_run(pipeline_client):
    """An experiment and a run made by the pipeline user through the MLflow client."""
    exp_id = pipeline_client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    return pipeline_client, exp_id, pipeline_client.create_run(exp_id).info.run_id


def test_reader_can_read_but_not_write(env, pipeline_run):
    _, exp_id, run_id = pipeline_run
    reader = creds(env, "reader")
    assert stack_http(env, "GET", SEARCH, auth=reader).status_code == 200
    assert (
        stack_http(
            env, "GET", "/api/2.0/mlflow/experiments/get", auth=reader, params={"experiment_id": exp_id}
        ).status_code
        == 200
    )
    assert stack_http(env, "GET", "/api/2.0/mlflow/runs/get", auth=reader, params={"run_id": run_id}).status_code == 200
    # writes into the pipeline's experiment and run: 403
    assert (
        stack_http(env, "POST", "/api/2.0/mlflow/runs/create", auth=reader, json={"experiment_id": exp_id}).status_code
        == 403
    )
    assert (
        stack_http(
            env,
            "POST",
            "/api/2.0/mlflow/runs/log-metric",
            auth=reader,
            json={"run_id": run_id, "key": "x", "value": 1.0, "timestamp": 0},
        ).status_code
        == 403
    )
    assert (
        stack_http(
            env, "POST", "/api/2.0/mlflow/experiments/delete", auth=reader, json={"experiment_id": exp_id}
        ).status_code
        == 403
    )
    # and in the Default experiment, which nobody owns
    assert (
        stack_http(env, "POST", "/api/2.0/mlflow/runs/create", auth=reader, json={"experiment_id": "0"}).status_code
        == 403
    )


def test_pipeline_logs_metric_and_artifact_into_rgw(env, pipeline_run, s3, tmp_path):
    client, exp_id, run_id = pipeline_run
    client.log_metric(run_id, "accuracy", 0.9921, step=3)
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several MB: a real upload, not one tiny part
    src = tmp_path / "weights.bin"
    src.write_bytes(payload)
    client.log_artifact(run_id, str(src), artifact_path="model")
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert run.data.metrics["accuracy"] == pytest.approx(0.9921)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: no S3 keys on the client

    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env["STACK_ARTIFACT_BUCKET"])
        for o in page.get("Contents", [])
    ]
    mine = [k for k in keys if run_id in k and k.endswith("model/weights.bin")]
    assert len(mine) == 1, keys
    assert s3.get_object(Bucket=env["STACK_ARTIFACT_BUCKET"], Key=mine[0])["Body"].read() == payload

    # back through the MLflow server, as the pipeline user ...
    out = client.download_artifacts(run_id, "model/weights.bin", str(tmp_path / "down"))
    assert Path(out).read_bytes() == payload
    # ... and as the reader over HTTP (READ suffices to download)
    r = stack_http(
        env,
        "GET",
        f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/model/weights.bin",
        auth=creds(env, "reader"),
    )
    assert r.status_code == 200 and r.content == payload
    # the reader cannot upload into the pipeline's run
    r = stack_http(
        env,
        "PUT",
        f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/evil.txt",
        auth=creds(env, "reader"),
        data=b"x",
    )
    assert r.status_code == 403


# ------------------------------------------------------------------ DVC remote
def _run(cmd, cwd, env):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{cmd}: {p.stdout}\n{p.stderr}"
    return p.stdout


def test_dvc_push_pull_through_rgw(env, env_file, secrets, tmp_path):
    # no AWS_* in the environment: the keys must come from .dvc/config.local
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(
        STACK_ENV_FILE=env_file,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@localhost",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@localhost",
        DVC_NO_ANALYTICS="1",
    )
    a = tmp_path / "a"
    a.mkdir()
    _run(["git", "init", "-q"], a, base)
    _run(["dvc", "init", "-q"], a, base)
    data = a / "data"
    data.mkdir()
    for i in range(5):
        (data / f"part{i}.bin").write_bytes(os.urandom(200_000 + i))
    _run(["dvc", "add", "-q", "data"], a, base)
    _run(stack_command("dvc-remote", a), a, base)
    config = (a / ".dvc" / "config").read_text()
    local = (a / ".dvc" / "config.local").read_text()
    assert env["DVC_REMOTE_URL"] in config and env["AWS_ENDPOINT_URL"] in config
    assert not any(s in config for s in secrets)
    assert env["AWS_ACCESS_KEY_ID"] in local and env["AWS_SECRET_ACCESS_KEY"] in local
    _run(["git", "add", "-A"], a, base)
    assert ".dvc/config.local" not in _run(["git", "ls-files", "--cached"], a, base)  # DVC git-ignores it
    _run(["git", "commit", "-qm", "data"], a, base)
    _run(["dvc", "push", "-q"], a, base)

    b = tmp_path / "b"
    _run(["git", "clone", "-q", str(a), str(b)], tmp_path, base)
    assert not (b / "data").exists()
    _run(stack_command("dvc-remote", b), b, base)
    _run(["dvc", "pull", "-q"], b, base)
    for f in sorted(data.iterdir()):
        assert hashlib.sha256((b / "data" / f.name).read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest()
    shutil.rmtree(tmp_path)


# ------------------------------------------------------------------ secrets stay secret
def _stack_logs(env):
    state = Path(env["STACK_DIR"])
    return [
        p
        for p in state.rglob("*")
        if p.is_file() and (p.suffix in (".log", ".out") or "log" in p.name) and "secrets" not in p.parts
    ]


def test_no_secret_in_logs(env, secrets, pipeline_run):
    logs = _stack_logs(env)
    names = {p.name for p in logs}
    assert {"mlflow.log", "postgres.log", "ceph-client.rgw.a.log", "ceph-mon.a.log", "ceph-osd.0.log"} <= names
    for p in logs:
        text = p.read_bytes()
        for s in secrets:
            assert s.encode() not in text, f"a credential appears in {p}"


def test_no_secret_in_git_files(secrets):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        p = REPO / name
        if p.is_file():
            text = p.read_bytes()
            for s in secrets:
                assert s.encode() not in text, f"a credential appears in {name}"


def test_no_secret_on_any_command_line(secrets):
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            for s in secrets:
                assert s.encode() not in cmdline, f"a credential is on the command line of pid {proc.name}"


def test_env_file_is_private(env_file):
    assert (Path(env_file).stat().st_mode & 0o777) == 0o600


# ------------------------------------------------------------------ one component fails, the rest stays
def _group(pgid):
    """The live processes of a process group."""
    members = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if proc.name.isdigit() and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(proc.name))
    return members


ALL_UP = (0, dict.fromkeys(("postgres", "ceph-mon", "ceph-osd", "radosgw", "mlflow"), "up"))


def _status(env):
    p = subprocess.run(
        stack_command("status"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STACK_DIR": env["STACK_DIR"]},
    )
    return p.returncode, {line.split()[0]: line.split()[1] for line in p.stdout.splitlines()}


def test_a_failed_mlflow_restart_leaves_postgres_and_rgw_up(env, env_file, s3, tmp_path):
    """`restart mlflow` whose start fails at a known point: the `mlflow` first on PATH exits at once.
    One line on stderr names mlflow, the old server is gone, PostgreSQL and RGW still answer; a plain
    `restart mlflow` brings the server back."""
    import psycopg2
    import requests

    state = Path(env["STACK_DIR"])
    old = int((state / "run" / "mlflow.pid").read_text())
    fake = tmp_path / "bin" / "mlflow"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fake mlflow: exits at once' >&2\nexit 3\n")
    fake.chmod(0o755)
    stack_env = {**os.environ, "STACK_DIR": env["STACK_DIR"], "STACK_ENV_FILE": str(env_file)}
    failing = {**stack_env, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        p = subprocess.run(stack_command("restart", "mlflow"), env=failing, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, p.stdout + p.stderr
        log = state / "logs" / "mlflow.log"
        assert p.stderr.splitlines() == [f"stack: mlflow FAILED (exited during start); see {log}"]
        assert "fake mlflow: exits at once" in log.read_text()  # the failure landed where the test put it
        assert _group(old) == []  # the old server and its workers
        rc, states = _status(env)
        assert rc == 1
        assert states == {"postgres": "up", "ceph-mon": "up", "ceph-osd": "up", "radosgw": "up", "mlflow": "down"}
        # PostgreSQL answers a query of the optuna role, RGW lists the buckets with the stack's keys
        with psycopg2.connect(env["OPTUNA_STORAGE"].replace("postgresql+psycopg2://", "postgresql://")) as db:
            with db.cursor() as cursor:
                cursor.execute("SELECT current_user")
                assert cursor.fetchone() == ("optuna",)
        names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
        assert {env["STACK_ARTIFACT_BUCKET"], env["STACK_DVC_BUCKET"]} <= names
        with pytest.raises(requests.ConnectionError):
            stack_http(env, "GET", "/health")
    finally:
        again = subprocess.run(
            stack_command("restart", "mlflow"), env=stack_env, capture_output=True, text=True, timeout=300
        )
    assert again.returncode == 0, again.stdout + again.stderr
    assert stack_http(env, "GET", SEARCH, auth=creds(env, "pipeline")).status_code == 200
    assert _status(env) == ALL_UP


def test_status_reports_all_up(env):
    assert _status(env) == ALL_UP
