#!/usr/bin/env python3
"""A team's shared services on ONE machine, all bound to 127.0.0.1 (or STACK_HOST):

  PostgreSQL 15   MLflow's tracking store, MLflow's user store, an `optuna` database
  Ceph RGW        S3 API (ceph-mon + one memstore ceph-osd + radosgw, cephx auth) with two
                  buckets: MLflow's artifacts and the DVC remote
  mlflow server   tracking server with --app-name basic-auth, proxying artifacts to RGW
                  (clients need only MLFLOW_TRACKING_URI + user/password)

Run it with the project's virtual environment's python (`python deploy/stack.py VERB`, or
`deploy/stack.py VERB` with the venv active); `deploy/stack.py VERB --help` explains each verb.

Environment (all optional)
  STACK_DIR          state: data, logs, PIDs, secrets      (default: deploy/.stack, git-ignored)
  STACK_ENV_FILE     env file written by `up`, mode 0600    (default: deploy/.env, git-ignored)
  STACK_PG_PORT      PostgreSQL                             (default 5433)
  STACK_MON_PORT     ceph-mon (msgr v2)                     (default 3300)
  STACK_RGW_PORT     RADOS Gateway (S3)                     (default 7480)
  STACK_MLFLOW_PORT  MLflow tracking server and UI          (default 5000)
  STACK_HOST         PostgreSQL, RGW, MLflow listen here; the env file's URLs name it (default 127.0.0.1)
  STACK_MLFLOW_WORKERS  uvicorn workers                     (default 2)
  STACK_MEMSTORE_BYTES  memstore OSD capacity               (default 4 GiB; data lives in RAM)
  STACK_PG_BIN       PostgreSQL's programs                  (default /usr/lib/postgresql/15/bin)
  The ports and STACK_HOST are recorded in the state directory at the first `up`; later commands use those.

The env file (`. deploy/.env`) exports: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD
(the `pipeline` user), STACK_READER_USERNAME/PASSWORD (read-only), STACK_ADMIN_USERNAME/PASSWORD,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL,
AWS_DEFAULT_REGION, AWS_REQUEST_CHECKSUM_CALCULATION/AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
(RGW 16 rejects the newer botocore default checksums), DVC_REMOTE_URL, STACK_ARTIFACT_BUCKET,
STACK_DVC_BUCKET, OPTUNA_STORAGE (postgresql+psycopg2://optuna:...@127.0.0.1:PORT/optuna), STACK_DIR.

Secrets: generated at the first `up` (secrets.token_urlsafe; the S3 keys by radosgw-admin), kept in
$STACK_DIR/secrets (0700) and the env file (0600); never printed, never on a command line:
PostgreSQL passwords are sent as SCRAM verifiers on psql's stdin, MLflow reaches PostgreSQL through a
0600 PGPASSFILE (the URIs carry no password), the MLflow admin password and the S3 keys reach the
mlflow server in its environment (readable by root and its owner), the DVC keys are written through
dvc's Python entry point.

Pointing at a team's EXISTING servers instead (nothing in the project assumes this stack):
  on the server host, with a managed PostgreSQL and AWS S3 (or any S3 API):
    export MLFLOW_BACKEND_STORE_URI='postgresql+psycopg2://mlflow@db.example:5432/mlflow'
    export PGPASSFILE=~/.pgpass            # db.example:5432:*:mlflow:PASSWORD, mode 0600
    export MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini   # [mlflow] default_permission = READ,
          # database_uri = postgresql+psycopg2://mlflow@db.example:5432/mlflow_auth,
          # admin_username = ..., authorization_function = mlflow.server.auth:authenticate_request_basic_auth
    export MLFLOW_AUTH_ADMIN_PASSWORD=...  MLFLOW_FLASK_SERVER_SECRET_KEY=...
    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_DEFAULT_REGION=...
    # (and MLFLOW_S3_ENDPOINT_URL=https://... for a non-AWS S3 API)
    mlflow server --app-name basic-auth --host 127.0.0.1 --port 5000 \\
        --artifacts-destination s3://TEAM-BUCKET/mlartifacts     # behind a TLS reverse proxy;
        # binding another address than loopback needs --allowed-hosts
  on each client: write the same variables as the env file by hand:
    MLFLOW_TRACKING_URI=https://mlflow.example, MLFLOW_TRACKING_USERNAME/PASSWORD,
    DVC_REMOTE_URL=s3://TEAM-BUCKET/dvc, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and
    AWS_ENDPOINT_URL only for a non-AWS S3), OPTUNA_STORAGE=postgresql+psycopg2://...,
  then `deploy/stack.py dvc-remote` works the same (it skips endpointurl when AWS_ENDPOINT_URL is unset).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from stack_ceph import start_ceph
from stack_core import (
    COMPONENTS,
    SECRET_NAMES,
    BadInput,
    Stack,
    StackError,
    env_file_path,
    pid_of,
    prepare,
    say,
    secret,
    settings,
)
from stack_core import stop as stop_component
from stack_install import install
from stack_mlflow import mlflow_command, read_env_file, start_mlflow, write_env
from stack_postgres import start_postgres

# PostgreSQL's "fast" shutdown is SIGINT; its SIGTERM would wait for the clients to leave
STOP_SIGNAL = {"postgres": signal.SIGINT}
STARTS = {"postgres": start_postgres, "mlflow": start_mlflow}


def stop(st: Stack, component: str) -> None:
    stop_component(st, component, STOP_SIGNAL.get(component, signal.SIGTERM))


def up(st: Stack) -> int:
    """Start what is not running; on a failure, stop the whole stack (as a failed first start leaves it)."""
    prepare(st)
    if all(pid_of(st, c) for c in COMPONENTS) and st.env_file.is_file():
        say(f"already up (env file: {st.env_file})")
        return 0
    for name in SECRET_NAMES:  # all secrets exist before anything reads them
        secret(st, name)
    t0 = time.monotonic()
    try:
        start_postgres(st)
        start_ceph(st)
        start_mlflow(st)
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        with contextlib.redirect_stdout(io.StringIO()):
            down(st)
        return 1
    write_env(st)
    say(f"all up in {time.monotonic() - t0:.0f} s; env file: {st.env_file} (mode 0600)")
    return 0


def down(st: Stack) -> int:
    """Stop every component by its recorded PID, the clients before the servers they use."""
    prepare(st)
    for component in reversed(COMPONENTS):
        stop(st, component)
    return 0


def restart(st: Stack, component: str) -> int:
    """Stop one component and start it again; the others keep running, also when its start fails."""
    prepare(st)
    if component == "mlflow":
        mlflow_command()  # a missing mlflow is said before the running server is stopped
    stop(st, component)
    try:
        STARTS[component](st)
    except StackError as e:
        with contextlib.redirect_stdout(io.StringIO()):
            stop(st, component)  # nothing half-started stays behind
        print(f"stack: {e}", file=sys.stderr)
        return 1
    return 0


def status(st: Stack) -> int:
    """One line per component: up/down, port, PID; 0 only if all are up."""
    prepare(st)
    rc = 0
    for component in COMPONENTS:
        pid, port = pid_of(st, component), st.port(component) or "-"
        if pid:
            print(f"{component:<9} up    port {port:<5} pid {pid}")
        else:
            print(f"{component:<9} down  port {port:<5}")
            rc = 1
    return rc


def destroy(st: Stack) -> int:
    """`down`, then delete the state directory and the env file."""
    down(st)
    shutil.rmtree(st.dir)
    st.env_file.unlink(missing_ok=True)
    say("state removed")
    return 0


def dvc_remote(env_file: Path, directory: Path) -> int:
    """Remote `team` (the default) in the DVC checkout DIRECTORY: URL and endpoint in .dvc/config, keys in
    .dvc/config.local only. The keys go through dvc's entry point in this process: on no command line."""
    if not env_file.is_file():
        raise BadInput(f"dvc-remote: no env file {env_file} (run up, or write one)")
    env = {**os.environ, **read_env_file(env_file)}
    for name in ("DVC_REMOTE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not env.get(name):
            raise BadInput(f"dvc-remote: {name} is set neither in {env_file} nor in the environment")
    where = directory.resolve()
    if not (where / ".dvc").is_dir():
        raise BadInput(f"dvc-remote: {where} is not a DVC repository")
    from dvc.cli import main as dvc

    os.chdir(where)  # dvc finds the repository from the working directory
    calls = [["remote", "add", "-d", "-f", "team", env["DVC_REMOTE_URL"]]]
    if env.get("AWS_ENDPOINT_URL"):
        calls.append(["remote", "modify", "team", "endpointurl", env["AWS_ENDPOINT_URL"]])
    calls.append(["remote", "modify", "--local", "team", "access_key_id", env["AWS_ACCESS_KEY_ID"]])
    calls.append(["remote", "modify", "--local", "team", "secret_access_key", env["AWS_SECRET_ACCESS_KEY"]])
    for argv in calls:
        if dvc(argv) != 0:
            raise BadInput(f"dvc-remote: `dvc {' '.join(argv[:3])}` failed in {where}")
    say(f"dvc remote 'team' -> {env['DVC_REMOTE_URL']} (keys in .dvc/config.local only)")
    return 0


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line quoting the bad argument, no usage block
        print(f"stack: {message}", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="deploy/stack.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = top.add_subparsers(dest="verb", metavar="VERB")
    for name, func in (("install", install), ("up", up), ("down", down), ("status", status), ("destroy", destroy)):
        verbs.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__)
    remote = verbs.add_parser("dvc-remote", help="a DVC checkout's remote: the team's", description=dvc_remote.__doc__)
    remote.add_argument("directory", nargs="?", default=".", type=Path, help="the DVC checkout (default: .)")
    again = verbs.add_parser("restart", help="restart one component", description=restart.__doc__)
    again.add_argument("component", choices=sorted(STARTS), help="the component (the others keep running)")
    return top


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)
    top = parser()
    args = top.parse_args(argv)
    try:
        if args.verb is None:
            top.print_help()
            return 2
        if args.verb == "install":
            return install()
        if args.verb == "dvc-remote":
            return dvc_remote(env_file_path(), args.directory)
        st = settings()
        if args.verb == "restart":
            return restart(st, args.component)
        return {"up": up, "down": down, "status": status, "destroy": destroy}[args.verb](st)
    except BadInput as e:
        print(f"stack: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
