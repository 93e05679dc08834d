"""The stack's state directory, its generated secrets, and the processes it starts, each recorded by PID.

Every wait is bounded; every process is started here in a session of its own and stopped by its PID."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("postgres", "ceph-mon", "ceph-osd", "radosgw", "mlflow")
SECRET_NAMES = ("pg_mlflow", "pg_optuna", "mlflow_admin", "mlflow_pipeline", "mlflow_reader", "flask_secret")
PORT_DEFAULTS = {"PG_PORT": 5433, "MON_PORT": 3300, "RGW_PORT": 7480, "MLFLOW_PORT": 5000}


class StackError(Exception):
    """A component failed: its name, why, and the log to read."""

    def __init__(self, component: str, reason: str, log: Path | str):
        super().__init__(f"{component} FAILED ({reason}); see {log}")
        self.component = component


class BadInput(Exception):
    """A setting the stack cannot use: the message quotes the value and where it came from."""


def say(message: str) -> None:
    print(f"stack: {message}", flush=True)


class Stack:
    """Where the stack keeps its state, and its settings."""

    def __init__(self, state: Path, env_file: Path, host: str, ports: dict[str, int], workers: int, memstore: int):
        self.dir, self.env_file, self.host, self.ports = state, env_file, host, ports
        self.workers, self.memstore_bytes = workers, memstore
        self.pgbin = Path(os.environ.get("STACK_PG_BIN", "/usr/lib/postgresql/15/bin"))
        self.logs, self.run, self.secrets = state / "logs", state / "run", state / "secrets"
        self.pgdir, self.ceph, self.mldir = state / "pg", state / "ceph", state / "mlflow"

    def port(self, component: str) -> int | None:
        key = {"postgres": "PG_PORT", "ceph-mon": "MON_PORT", "radosgw": "RGW_PORT", "mlflow": "MLFLOW_PORT"}
        return self.ports.get(key.get(component, ""))

    def log(self, component: str) -> Path:
        return {
            "postgres": self.pgdir / "postgres.log",
            "ceph-mon": self.logs / "ceph-mon.a.log",
            "ceph-osd": self.logs / "ceph-osd.0.log",
            "radosgw": self.logs / "ceph-client.rgw.a.log",
            "mlflow": self.logs / "mlflow.log",
        }[component]


# ---------------------------------------------------------------- settings
def positive_int(name: str, default: int, top: int | None = None) -> int:
    raw = os.environ.get(name, str(default))
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < 1 or (top is not None and int(raw) > top):
        limit = f"1-{top}" if top else "a positive integer"
        raise BadInput(f"{name}: {limit}, got '{raw}' (environment)")
    return int(raw)


def read_assignments(path: Path) -> dict[str, str]:
    """NAME=value lines (the ports file)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def env_file_path() -> Path:
    return Path(os.environ.get("STACK_ENV_FILE") or REPO / "deploy" / ".env")


def settings() -> Stack:
    """The stack's settings, from the environment; the ports and host from the state directory once recorded."""
    state = Path(os.environ.get("STACK_DIR") or REPO / "deploy" / ".stack")
    env_file = env_file_path()
    recorded = state / "ports"
    if recorded.is_file():
        values = read_assignments(recorded)
        ports = {k: int(values[k]) for k in PORT_DEFAULTS}
        # a state directory from before STACK_HOST existed was made for loopback
        host = values.get("HOST", "127.0.0.1")
        wanted = os.environ.get("STACK_HOST")
        if wanted and wanted != host:
            warning = f"STACK_HOST={wanted} ignored: {state} serves {host} (recorded at its first up)"
            print(f"stack: {warning}", file=sys.stderr)
    else:
        ports = {k: positive_int(f"STACK_{k}", v, 65535) for k, v in PORT_DEFAULTS.items()}
        host = os.environ.get("STACK_HOST", "127.0.0.1")
    if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){3}", host):
        raise BadInput(f"STACK_HOST: an IPv4 address, got '{host}'")
    workers = positive_int("STACK_MLFLOW_WORKERS", 2)
    return Stack(state, env_file, host, ports, workers, positive_int("STACK_MEMSTORE_BYTES", 4 * 1024**3))


def prepare(st: Stack) -> None:
    """Make the state directory (and record the ports and host at the first use)."""
    for d in (st.dir, st.logs, st.run, st.secrets, st.ceph, st.mldir):
        d.mkdir(parents=True, exist_ok=True)
    st.dir.chmod(0o711)  # the postgres user must traverse it to reach its data
    st.secrets.chmod(0o700)
    recorded = st.dir / "ports"
    if not recorded.is_file():
        lines = [f"{k}={v}" for k, v in st.ports.items()] + [f"HOST={st.host}"]
        recorded.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- secrets
def write_private(path: Path, text: str) -> None:
    """Write a file that only its owner can read (created 0600, never wider for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def secret(st: Stack, name: str) -> str:
    """The secret NAME of the state directory, generated at its first use."""
    path = st.secrets / name
    if not path.is_file() or not path.read_text().strip():
        write_private(path, secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


# ---------------------------------------------------------------- processes
def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, process group) of a live process, None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    return comm, rest[0], int(rest[2])


def alive(pid: int) -> bool:
    """The process runs (a zombie, e.g. our own child that exited, does not)."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z"


def pid_of(st: Stack, component: str) -> int | None:
    """The recorded PID of a component if that process is alive (its name checked: PIDs are reused)."""
    try:
        pid = int((st.run / f"{component}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    stat = proc_stat(pid)
    return pid if stat and stat[1] != "Z" and stat[0].startswith(component) else None


def spawn(st: Stack, component: str, log: Path, cmd: list[str], env: dict | None = None, cwd=None) -> int:
    """Start CMD in a session of its own (its process group is its PID), output appended to LOG."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    (st.run / f"{component}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def wait_for(st: Stack, component: str, seconds: int, answers) -> None:
    """Call ANSWERS() once a second until it is true, at most SECONDS times; fail if the component exits."""
    for _ in range(seconds):
        if answers():
            return
        if pid_of(st, component) is None:
            raise StackError(component, "exited during start", st.log(component))
        time.sleep(1)
    raise StackError(component, f"did not answer within {seconds} s", st.log(component))


# the stack's own addresses only: never through a proxy named in the environment
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str) -> bool:
    """Any HTTP answer below 500."""
    try:
        DIRECT.open(url, timeout=3).close()
    except urllib.error.HTTPError as e:
        return e.code < 500
    except OSError:
        return False
    return True


def group_members(pgid: int) -> list[int]:
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [pid for pid in pids if (stat := proc_stat(pid)) and stat[2] == pgid and stat[1] != "Z"]


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group PID leads, or the process alone when it leads none."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def reap(pid: int) -> None:
    """Collect the exit status of our own child (a process started by this command), so it is no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(st: Stack, component: str, sig: int = signal.SIGTERM) -> None:
    """Signal the recorded process group, wait at most 30 s, then KILL it and whatever of its group outlived it."""
    pid = pid_of(st, component)
    if pid is None:
        (st.run / f"{component}.pid").unlink(missing_ok=True)
        return
    signal_group(pid, sig)
    for _ in range(30):
        reap(pid)
        # gone from /proc, not only exited: a zombie waiting for init still holds its PID
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(1)
    else:
        say(f"{component} (pid {pid}) ignored {signal.Signals(sig).name} for 30 s: KILL")
        signal_group(pid, signal.SIGKILL)
        time.sleep(1)
    # members of its process group that outlived it (uvicorn workers, postgres backends)
    if group_members(pid):
        signal_group(pid, signal.SIGKILL)
        time.sleep(1)
    reap(pid)
    (st.run / f"{component}.pid").unlink(missing_ok=True)
    say(f"{component} stopped (pid {pid})")


def run_logged(cmd: list[str], log: Path, **kw) -> bool:
    """Run CMD with its output appended to LOG; True when it exits 0."""
    with open(log, "ab") as out:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kw).returncode == 0
