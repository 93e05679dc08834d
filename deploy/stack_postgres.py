"""PostgreSQL 15: MLflow's tracking store and user store, and Optuna's database.

Passwords reach the server only as SCRAM verifiers on psql's stdin; MLflow reads its password from a
0600 PGPASSFILE, so no URI and no command line carries one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pwd
import subprocess

from stack_core import Stack, StackError, pid_of, run_logged, say, secret, wait_for, write_private

ROLES_SQL = """\
CREATE ROLE mlflow LOGIN PASSWORD '{mlflow}';
CREATE ROLE optuna LOGIN PASSWORD '{optuna}';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
REVOKE CONNECT ON DATABASE mlflow, mlflow_auth FROM PUBLIC;
REVOKE CONNECT ON DATABASE optuna FROM PUBLIC;
"""

CONF = """\
# deploy/stack.py
listen_addresses = '{host}'
port = {port}
unix_socket_directories = '{socket_dir}'
password_encryption = 'scram-sha-256'
shared_buffers = 64MB
max_connections = 100
log_min_error_statement = panic
"""


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of PASSWORD (RFC 5802/7677): what the server stores instead of it."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(x: bytes) -> str:
        return base64.b64encode(x).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


def as_pg(cmd: list[str]) -> list[str]:
    """CMD run as the postgres user when this command runs as root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def init_cluster(st: Stack) -> None:
    """initdb, then the settings (loopback or STACK_HOST only, the stack's ports and socket directory)."""
    data = st.pgdir / "data"
    initdb = [str(st.pgbin / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=peer"]
    initdb += ["--auth-host=scram-sha-256", "--no-locale", "-E", "UTF8"]
    if not run_logged(as_pg(initdb), st.pgdir / "initdb.log"):
        raise StackError("postgres", "initdb failed", st.pgdir / "initdb.log")
    subprocess.run(as_pg(["mkdir", "-p", str(st.pgdir / "run")]), check=True)
    port = st.ports["PG_PORT"]
    with open(data / "postgresql.conf", "a") as f:
        f.write(CONF.format(host=st.host, port=port, socket_dir=st.pgdir / "run"))
    if st.host != "127.0.0.1":  # clients on STACK_HOST's /24 (initdb admits loopback only)
        subnet = st.host.rsplit(".", 1)[0] + ".0/24"
        with open(data / "pg_hba.conf", "a") as f:
            f.write(f"# deploy/stack.py: STACK_HOST\nhost all all {subnet} scram-sha-256\n")


def create_roles(st: Stack) -> None:
    """The mlflow and optuna roles and their databases, once; only the verifiers reach psql (on stdin)."""
    if (st.pgdir / "roles-done").is_file():
        return
    sql = ROLES_SQL.format(
        mlflow=scram_verifier(secret(st, "pg_mlflow")), optuna=scram_verifier(secret(st, "pg_optuna"))
    )
    psql = [str(st.pgbin / "psql"), "-h", str(st.pgdir / "run"), "-p", str(st.ports["PG_PORT"])]
    psql += ["-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-X"]
    log = st.logs / "postgres-setup.log"
    with open(log, "ab") as out:
        done = subprocess.run(as_pg(psql), input=sql.encode(), stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise StackError("postgres", "creating roles and databases failed", log)
    (st.pgdir / "roles-done").touch()


def start_postgres(st: Stack) -> None:
    if pid_of(st, "postgres"):
        say("postgres already running")
        return
    st.pgdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        postgres = pwd.getpwnam("postgres")
        os.chown(st.pgdir, postgres.pw_uid, postgres.pw_gid)
    st.pgdir.chmod(0o700)
    if subprocess.run(as_pg(["test", "-x", str(st.pgdir)])).returncode != 0:
        raise StackError("postgres", f"the postgres user cannot reach {st.pgdir} (parent folders need o+x)", st.pgdir)
    data = st.pgdir / "data"
    if not (data / "PG_VERSION").is_file():
        init_cluster(st)
    pg_ctl = [str(st.pgbin / "pg_ctl"), "-D", str(data), "-l", str(st.log("postgres")), "-w", "-t", "60", "start"]
    if subprocess.run(as_pg(pg_ctl), capture_output=True).returncode != 0:
        raise StackError("postgres", "pg_ctl start failed", st.log("postgres"))
    pid = (data / "postmaster.pid").read_text().splitlines()[0]
    (st.run / "postgres.pid").write_text(pid + "\n")
    ready = [str(st.pgbin / "pg_isready"), "-q", "-h", st.host, "-p", str(st.ports["PG_PORT"])]
    wait_for(st, "postgres", 60, lambda: subprocess.run(ready).returncode == 0)
    create_roles(st)
    # libpq reads the password from here: no password in any URI or command line
    write_private(st.secrets / "pgpass", f"{st.host}:{st.ports['PG_PORT']}:*:mlflow:{secret(st, 'pg_mlflow')}\n")
    say(f"postgres up on {st.host}:{st.ports['PG_PORT']} (pid {pid_of(st, 'postgres')})")
