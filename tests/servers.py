"""The servers tests start or reach, in one place: a free port on 127.0.0.1, a real `mlflow server`,
a process group stopped by its id, and the team stack (its env file, its credentials, its command).

Only the standard library at import time: tests/cluster/nodes.py, which run.sh runs before anything
imports Ray or MLflow, reads the stack's env file with :func:`read_env_file`.

Every test calls the stack's command through :func:`stack_command`, so that a new command for
deploy/stack.py is a change of that one function.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
# the env file's names whose values are credentials
SECRET_VARS = (
    "MLFLOW_TRACKING_PASSWORD",
    "STACK_READER_PASSWORD",
    "STACK_ADMIN_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


# ------------------------------------------------------------------ local servers
def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on once this returns (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the last line of a Python traceback, also as Ray wraps it: "ray.exceptions.RayTaskError(MlflowException): ..."
_EXCEPTION_LINE = re.compile(r"\s*[\w.]*(Error|Exception)(\([\w.]+\))?: ")


def failure(output: str, size: int = 3000) -> str:
    """A failed command's output for an assertion message: its last exception line first, so that a
    report that cuts a long message short still shows the cause, then the output's last ``size``
    characters."""
    errors = [line.strip() for line in output.splitlines() if _EXCEPTION_LINE.match(line)]
    return f"{errors[-1][:1000] if errors else '(no exception line)'}\n...\n{output[-size:]}"


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """Stop a process started with ``start_new_session=True``, and all it started, by its group id:
    TERM, a bounded wait, then KILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until_answering(url: str, process: subprocess.Popen, what: str, limit_s: float = 120) -> None:
    """Poll ``url`` (on 127.0.0.1) until it answers; fail naming ``what`` if ``process`` exits or time runs out."""
    assert urlparse(url).hostname == "127.0.0.1", url
    deadline = time.monotonic() + limit_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            assert process.poll() is None, f"{what} exited with status {process.returncode}"
            assert time.monotonic() < deadline, f"{what} did not answer {url} within {limit_s} s"
            time.sleep(0.5)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, cwd: Path, port: int | None = None) -> Iterator[str]:
    """A real `mlflow server` (one worker) on ``port`` (a free one if None) of 127.0.0.1 over
    ``backend_uri``; yields its URL once /health answers, and stops it (with its workers) afterwards."""
    port = port or free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)]
    server = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answering(url + "/health", server, "mlflow server")
        yield url
    finally:
        stop(server)


# ------------------------------------------------------------------ the team stack
def stack_command(*args: str) -> list[str]:
    """The argv of the team stack's command (deploy/stack.py, run by this interpreter) with ``args``:
    every test's one way to it."""
    return [sys.executable, str(REPO / "deploy" / "stack.py"), *map(str, args)]


def restart(component: str, stack_env: dict[str, str], env_file: str | Path) -> float:
    """`restart COMPONENT` (mlflow or postgres) of the running stack; the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        stack_command("restart", component),
        env={**os.environ, "STACK_DIR": stack_env["STACK_DIR"], "STACK_ENV_FILE": str(env_file)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic() - started


def read_env_file(path: str | Path) -> dict[str, str]:
    """The ``export NAME='value'`` lines of the env file the stack writes, as a dict."""
    env = {}
    for line in Path(path).read_text().splitlines():
        m = re.fullmatch(r"export (\w+)='([^']*)'", line.strip())
        if m:
            env[m[1]] = m[2]
    return env


def stack_http(env: dict[str, str], method: str, path: str, auth=None, **kw):
    """A request to the stack's MLflow server (asserted to be on 127.0.0.1)."""
    import requests

    url = env["MLFLOW_TRACKING_URI"] + path
    assert urlparse(url).hostname == "127.0.0.1", url
    return requests.request(method, url, auth=auth, timeout=60, **kw)


def creds(env: dict[str, str], who: str) -> tuple[str, str]:
    """(user, password) of the stack's ``pipeline``, ``reader`` or ``admin`` MLflow user."""
    return {
        "pipeline": (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]),
        "reader": (env["STACK_READER_USERNAME"], env["STACK_READER_PASSWORD"]),
        "admin": (env["STACK_ADMIN_USERNAME"], env["STACK_ADMIN_PASSWORD"]),
    }[who]


def pid_of(stack_env: dict[str, str], component: str) -> int:
    """The PID the stack recorded for ``component`` (its run/<component>.pid)."""
    return int((Path(stack_env["STACK_DIR"]) / "run" / f"{component}.pid").read_text().split()[0])


# ------------------------------------------------------------------ a training paused for a fault
def wait_for_pause(directory: Path, alive, count: int = 1, limit_s: float = 300) -> list[dict]:
    """The markers (``{"epoch", "pid"}``) of ``count`` trainings paused in ``directory`` by
    PIPELINE_PAUSE_AT_EPOCH / PIPELINE_PAUSE_DIR (pipeline/core/pause.py), once that many are there;
    fails if ``alive()`` turns false first, or after ``limit_s``."""
    import json

    deadline = time.monotonic() + limit_s
    while len(markers := sorted(Path(directory).glob("paused-*.json"))) < count:
        assert alive(), f"the training ended with {len(markers)} of {count} paused"
        assert time.monotonic() < deadline, f"{len(markers)} of {count} trainings paused within {limit_s} s"
        time.sleep(0.1)
    return [json.loads(m.read_text()) for m in markers]


def release(directory: Path) -> None:
    """Let every training paused in ``directory`` go on (and any that reaches its pause later)."""
    from pipeline.core.pause import RELEASE_FILE

    (Path(directory) / RELEASE_FILE).touch()
