"""The MLflow tracking server (--app-name basic-auth, artifacts proxied to RGW), its users, and the env file.

The server reaches PostgreSQL through a 0600 PGPASSFILE (its URIs carry no password); the admin password
and the S3 keys reach it in its environment (readable by root and its owner), never on its command line."""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from stack_ceph import ARTIFACT_BUCKET, DVC_BUCKET, s3_env
from stack_core import DIRECT, BadInput, Stack, StackError, http_ok, pid_of, say, secret, spawn, wait_for

ADMIN_USER, PIPELINE_USER, READER_USER = "stack-admin", "pipeline", "reader"

AUTH_INI = """\
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://mlflow@{host}:{port}/mlflow_auth
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def mlflow_command() -> str:
    """`mlflow` on PATH, else the one beside this Python (a venv used without activating it)."""
    found = shutil.which("mlflow") or shutil.which("mlflow", path=str(Path(sys.executable).parent))
    if not found:
        raise BadInput("mlflow: not found on PATH (activate the venv; deploy/stack.py install)")
    return found


def server_env(st: Stack) -> dict[str, str]:
    pg = f"{st.host}:{st.ports['PG_PORT']}"
    return {
        **os.environ,
        **s3_env(st),
        "PGPASSFILE": str(st.secrets / "pgpass"),
        "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://mlflow@{pg}/mlflow",
        "MLFLOW_AUTH_CONFIG_PATH": str(st.mldir / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret(st, "mlflow_admin"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(st, "flask_secret"),
        # the job runner: about 245 MB more, unused here
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def start_mlflow(st: Stack) -> None:
    if pid_of(st, "mlflow"):
        say("mlflow already running")
        return
    mlflow = mlflow_command()
    auth = AUTH_INI.format(host=st.host, port=st.ports["PG_PORT"], admin=ADMIN_USER)
    (st.mldir / "basic_auth.ini").write_text(auth)
    port = st.ports["MLFLOW_PORT"]
    cmd = [mlflow, "server", "--app-name", "basic-auth", "--host", st.host, "--port", str(port)]
    cmd += ["--workers", str(st.workers), "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/mlartifacts"]
    if st.host != "127.0.0.1":  # MLflow's security middleware admits only loopback Host headers unless told
        cmd += ["--allowed-hosts", f"{st.host}:{port},{st.host}", "--cors-allowed-origins", f"http://{st.host}:{port}"]
    spawn(st, "mlflow", st.log("mlflow"), cmd, env=server_env(st), cwd=st.mldir)
    url = f"http://{st.host}:{port}"
    wait_for(st, "mlflow", 180, lambda: http_ok(url + "/health"))
    create_users(st, url)
    say(f"mlflow up on {url} (pid {pid_of(st, 'mlflow')})")


def create_users(st: Stack, url: str) -> None:
    """The pipeline and reader users (idempotent: 400 means it exists), created by the stack admin."""
    login = f"{ADMIN_USER}:{secret(st, 'mlflow_admin')}".encode()
    headers = {"Authorization": "Basic " + base64.b64encode(login).decode(), "Content-Type": "application/json"}
    log = st.logs / "mlflow-users.log"
    for user, name in ((PIPELINE_USER, "mlflow_pipeline"), (READER_USER, "mlflow_reader")):
        body = json.dumps({"username": user, "password": secret(st, name)}).encode()
        request = urllib.request.Request(url + "/api/2.0/mlflow/users/create", data=body, headers=headers)
        try:
            with DIRECT.open(request, timeout=30) as answer:
                status = answer.status
        except urllib.error.HTTPError as e:
            status = e.code
        except OSError as e:
            status = type(e).__name__
        with open(log, "a") as f:
            print("create user", user, status, file=f)
        if status not in (200, 400):
            raise StackError("mlflow", f"creating the MLflow user {user} failed: {status}", log)


def env_values(st: Stack) -> dict[str, str]:
    """What the env file exports (`. deploy/.env`)."""
    s3, pg = s3_env(st), f"{st.host}:{st.ports['PG_PORT']}"
    return {
        "MLFLOW_TRACKING_URI": f"http://{st.host}:{st.ports['MLFLOW_PORT']}",
        "MLFLOW_TRACKING_USERNAME": PIPELINE_USER,
        "MLFLOW_TRACKING_PASSWORD": secret(st, "mlflow_pipeline"),
        "STACK_READER_USERNAME": READER_USER,
        "STACK_READER_PASSWORD": secret(st, "mlflow_reader"),
        "STACK_ADMIN_USERNAME": ADMIN_USER,
        "STACK_ADMIN_PASSWORD": secret(st, "mlflow_admin"),
        **s3,
        "STACK_ARTIFACT_BUCKET": ARTIFACT_BUCKET,
        "STACK_DVC_BUCKET": DVC_BUCKET,
        "DVC_REMOTE_URL": f"s3://{DVC_BUCKET}/dvc",
        "OPTUNA_STORAGE": f"postgresql+psycopg2://optuna:{secret(st, 'pg_optuna')}@{pg}/optuna",
        "STACK_DIR": str(st.dir),
    }


def write_env(st: Stack) -> None:
    """The env file, mode 0600 from its creation, replaced in one rename."""
    lines = ["# written by deploy/stack.py up -- secrets: never commit, never print"]
    lines += [f"export {k}='{v}'" for k, v in env_values(st).items()]
    st.env_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = st.env_file.with_name(f"{st.env_file.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, st.env_file)


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an env file: `export NAME='value'` lines, as `up` writes them or a person by hand."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise BadInput(f"{path}:{number}: {e}") from None
        words = words[1:] if words[:1] == ["export"] else words
        if len(words) != 1 or "=" not in words[0]:
            raise BadInput(f"{path}:{number}: not NAME=value")
        name, value = words[0].split("=", 1)
        values[name] = value
    return values
