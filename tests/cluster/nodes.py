"""Two Ray nodes on one machine, each in a network namespace of its own, for tests/cluster.

tests/cluster/run.sh makes the bridge, the two namespaces and the team stack, exports the
``CLUSTER_*`` variables below, starts both nodes with this file's command line and stops them at
the end; the tests reach the same code through the ``cluster`` fixture (``Cluster.from_env()``).

    python tests/cluster/nodes.py start head|worker    # start a node, wait until the head lists it alive
    python tests/cluster/nodes.py stop head|worker     # TERM its processes, bounded wait, then KILL
    python tests/cluster/nodes.py kill worker          # KILL every process of the node, wait until it is dead
    python tests/cluster/nodes.py rss head|worker      # RSS in MB, summed over the node's processes
    python tests/cluster/nodes.py pids head|worker     # the PIDs in the node's namespace
    python tests/cluster/nodes.py scan-logs            # exit 1 if Ray's files hold the token or a stack secret

A node is everything in its namespace: ``ip netns pids NS`` lists its processes (GCS, raylet,
agents, workers, and any driver started there), and stopping or killing a node signals exactly
those PIDs, never processes found by name (``ray stop`` would stop every Ray node on the machine).

Every Ray process gets its environment from ``node_env`` only (nothing is inherited from the
caller): PATH to the virtual environment, ``HOME``, ``TMPDIR`` and Ray's ``--temp-dir`` under the
node's folder in ``CLUSTER_ROOT`` (so neither ``~/.ray`` nor ``/tmp/ray`` is touched), usage stats
off, ``RAY_AUTH_MODE=token`` with the token read from the 0600 file ``RAY_AUTH_TOKEN_PATH`` (the
token itself is in no environment and on no command line), and ``NNDL_CACHE_DIR``, the node's own
data cache. The nodes do NOT get the stack's credentials; a driver started with ``run_in_head``
does (the env file's variables), and passes what its tasks need in their ``runtime_env``.

Only the standard library here: run.sh uses this file before anything imports Ray.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE.parent) not in sys.path:  # run as a script (run.sh): tests/, for servers.py
    sys.path.insert(0, str(HERE.parent))
from servers import read_env_file  # noqa: E402

RAY_PORT = 6379
NODES = ("head", "worker")

# exported by tests/cluster/run.sh (STACK_ENV_FILE is deploy/stack.py's own variable)
ENV_VARS = (
    "CLUSTER_ROOT",  # the run's temporary folder: node-a/, node-b/, ray/auth_token, stack/, ...
    "CLUSTER_SUBNET",  # 10.77.X.0/24
    "CLUSTER_BRIDGE",  # the bridge device
    "CLUSTER_BRIDGE_IP",  # 10.77.X.254: the stack listens here (STACK_HOST)
    "CLUSTER_HEAD_NS",  # network namespace of the head (node A)
    "CLUSTER_WORKER_NS",  # network namespace of the worker (node B)
    "CLUSTER_HEAD_IP",  # 10.77.X.1
    "CLUSTER_WORKER_IP",  # 10.77.X.2
    "CLUSTER_RAY_ADDRESS",  # 10.77.X.1:6379, what RAY_ADDRESS is inside the head namespace
    "CLUSTER_RAY_TOKEN_PATH",  # the token file (0600), RAY_AUTH_TOKEN_PATH of every Ray process
    "CLUSTER_VENV",  # the virtual environment the nodes and drivers run from
    "STACK_ENV_FILE",  # the team stack's env file (0600), URLs on CLUSTER_BRIDGE_IP
)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_env(environ=None) -> list[str]:
    environ = os.environ if environ is None else environ
    return [name for name in ENV_VARS if not environ.get(name)]


def _ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip netns pids {ns}: {out.stderr.strip()}")
    return sorted(int(p) for p in out.stdout.split())


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _peer_host(addr: str) -> str:
    """'[::ffff:10.77.3.1]:6379' or '10.77.3.1:6379' or '[::1]:80' -> the host part, unmapped."""
    host = addr.rsplit(":", 1)[0].strip("[]")
    if "%" in host:
        host = host.split("%", 1)[0]
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


@dataclass(frozen=True)
class Cluster:
    root: Path
    subnet: str
    bridge: str
    bridge_ip: str
    head_ns: str
    worker_ns: str
    head_ip: str
    worker_ip: str
    ray_address: str
    token_path: Path
    venv: Path
    stack_env_file: Path
    num_cpus: int = 1
    object_store_bytes: int = 300_000_000

    @classmethod
    def from_env(cls, environ=None) -> Cluster:
        environ = os.environ if environ is None else environ
        missing = missing_env(environ)
        if missing:
            raise LookupError(f"no cluster: {', '.join(missing)} not set (tests/cluster/run.sh sets them)")
        e = environ
        return cls(
            root=Path(e["CLUSTER_ROOT"]),
            subnet=e["CLUSTER_SUBNET"],
            bridge=e["CLUSTER_BRIDGE"],
            bridge_ip=e["CLUSTER_BRIDGE_IP"],
            head_ns=e["CLUSTER_HEAD_NS"],
            worker_ns=e["CLUSTER_WORKER_NS"],
            head_ip=e["CLUSTER_HEAD_IP"],
            worker_ip=e["CLUSTER_WORKER_IP"],
            ray_address=e["CLUSTER_RAY_ADDRESS"],
            token_path=Path(e["CLUSTER_RAY_TOKEN_PATH"]),
            venv=Path(e["CLUSTER_VENV"]),
            stack_env_file=Path(e["STACK_ENV_FILE"]),
            num_cpus=int(e.get("CLUSTER_NODE_CPUS") or 1),
            object_store_bytes=int(e.get("CLUSTER_OBJECT_STORE_BYTES") or 300_000_000),
        )

    # ------------------------------------------------------------------ layout
    def ns(self, node: str) -> str:
        return {"head": self.head_ns, "worker": self.worker_ns}[node]

    def ip(self, node: str) -> str:
        return {"head": self.head_ip, "worker": self.worker_ip}[node]

    def node_dir(self, node: str) -> Path:
        """CLUSTER_ROOT/node-a (head) or node-b (worker): home/, tmp/, ray/ (--temp-dir), cache/, work/."""
        return self.root / {"head": "node-a", "worker": "node-b"}[node]

    def cache_dir(self, node: str) -> Path:
        return self.node_dir(node) / "cache"

    def stack_env(self) -> dict[str, str]:
        return read_env_file(self.stack_env_file)

    def node_env(self, node: str) -> dict[str, str]:
        """The whole environment of a Ray node's processes (and the base of a driver's)."""
        d = self.node_dir(node)
        return {
            "PATH": f"{self.venv / 'bin'}:{SYSTEM_PATH}",
            "VIRTUAL_ENV": str(self.venv),
            "LANG": "C.UTF-8",
            "HOME": str(d / "home"),
            "TMPDIR": str(d / "tmp"),
            "RAY_TMPDIR": str(d / "tmp"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "NNDL_CACHE_DIR": str(self.cache_dir(node)),
        }

    def driver_env(self, env: dict[str, str] | None = None, stack: bool = True) -> dict[str, str]:
        """A driver in the head namespace: the head's environment, RAY_ADDRESS, the stack's env
        file (MLflow, S3, OPTUNA_STORAGE; unless stack=False), then ``env`` on top."""
        out = self.node_env("head")
        out["RAY_ADDRESS"] = self.ray_address
        if stack:
            out.update(self.stack_env())
        out.update(env or {})
        return out

    def _argv_in(self, node: str, argv) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *[str(a) for a in argv]]

    # ------------------------------------------------------------------ drivers
    def run_in_head(
        self,
        argv,
        *,
        env: dict[str, str] | None = None,
        timeout: float = 600,
        cwd=None,
        stack: bool = True,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in the head's namespace with ``driver_env(env, stack)``; cwd defaults to
        CLUSTER_ROOT/node-a/work. Output captured as text. On timeout the process is killed and
        subprocess.TimeoutExpired raised."""
        return subprocess.run(
            self._argv_in("head", argv),
            env=self.driver_env(env, stack),
            cwd=str(cwd or self.node_dir("head") / "work"),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
        )

    def popen_in_head(
        self,
        argv,
        *,
        env: dict[str, str] | None = None,
        cwd=None,
        stack: bool = True,
        **popen_kw,
    ) -> subprocess.Popen:
        """Start ``argv`` in the head's namespace in the background (a driver to kill a node
        under). ``ip netns exec`` execs it, so ``.pid`` is the driver itself; it gets a session of
        its own (``os.killpg(p.pid, SIGKILL)`` stops it with its children) unless popen_kw says
        otherwise. The caller waits for it; run.sh's teardown kills whatever is left in the namespace."""
        popen_kw.setdefault("start_new_session", True)
        popen_kw.setdefault("text", True)
        return subprocess.Popen(
            self._argv_in("head", argv),
            env=self.driver_env(env, stack),
            cwd=str(cwd or self.node_dir("head") / "work"),
            **popen_kw,
        )

    def python_in_head(self, code: str, *, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """``python -c code`` of the virtual environment, as a driver in the head namespace."""
        return self.run_in_head([self.venv / "bin" / "python", "-c", code], timeout=timeout, **kw)

    # ------------------------------------------------------------------ nodes
    def node_pids(self, node: str) -> list[int]:
        return _ns_pids(self.ns(node))

    def node_of(self, pid: int) -> str | None:
        """ "head" or "worker": the node whose namespace holds process ``pid`` (None: neither)."""
        return next((node for node in NODES if pid in self.node_pids(node)), None)

    def node_rss_mb(self, node: str) -> int:
        """RSS summed over every process in the node's namespace (shared pages counted per process)."""
        return round(sum(_rss_kb(p) for p in self.node_pids(node)) / 1024)

    def nodes_state(self, timeout: float = 60) -> dict[str, bool]:
        """{node IP: alive} as the head's GCS reports it (an IP is alive if any of its entries is)."""
        out = self._wait_in_head(["state"], timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def _wait_in_head(self, args, timeout: float) -> subprocess.CompletedProcess:
        out = self.run_in_head(
            [self.venv / "bin" / "python", HERE / "nodes.py", "_gcs", *args, "--timeout", str(timeout)],
            stack=False,
            timeout=timeout + 60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {out.stdout.strip()} {out.stderr.strip()[-2000:]}")
        return out

    def wait_node(self, node: str, alive: bool, timeout: float = 90) -> float:
        """Wait until the head's GCS lists the node's IP alive (or no longer alive); seconds waited."""
        t0 = time.monotonic()
        self._wait_in_head(["alive" if alive else "dead", self.ip(node)], timeout)
        return time.monotonic() - t0

    def start_node(self, node: str, timeout: float = 90) -> float:
        """``ray start`` in the node's namespace with the settings above; for the worker, also wait
        until the head lists it alive. Returns the seconds it took. Refuses if the namespace
        still has processes (stop or kill the node first)."""
        if self.node_pids(node):
            raise RuntimeError(f"{node}: namespace {self.ns(node)} still has processes {self.node_pids(node)}")
        d = self.node_dir(node)
        for sub in ("home", "tmp", "ray", "cache", "work"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        argv = [
            self.venv / "bin" / "ray",
            "start",
            f"--node-ip-address={self.ip(node)}",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={d / 'ray'}",
            "--disable-usage-stats",
        ]
        if node == "head":
            argv += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
        else:
            argv += [f"--address={self.ray_address}"]
        t0 = time.monotonic()
        # the log is a file, not a pipe: the daemons ray start leaves behind would hold a pipe open
        with open(d / "start.log", "a") as log:
            rc = subprocess.run(
                self._argv_in(node, argv),
                env=self.node_env(node),
                cwd=str(d / "work"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
        if rc != 0:
            raise RuntimeError(f"ray start {node} exited {rc}; see {d / 'start.log'}")
        if node == "worker":
            self.wait_node("worker", alive=True, timeout=max(10.0, timeout - (time.monotonic() - t0)))
        return time.monotonic() - t0

    def start_worker(self, timeout: float = 90) -> float:
        """Start node B again with the same settings; wait until the head lists it alive."""
        return self.start_node("worker", timeout)

    def _wait_gone(self, node: str, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while (left := self.node_pids(node)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def stop_node(self, node: str, grace: float = 3) -> list[int]:
        """TERM the raylet first (it tells the GCS, ends its workers), then every other process of
        the node, each step waiting up to ``grace`` s; KILL what is left (the head's GCS and
        autoscaler monitor linger on SIGTERM trying to flush to agents already gone), and wait
        until the namespace is empty (bounded). Returns the PIDs signalled; raises if any outlived KILL."""
        signalled: set[int] = set()

        def term(pids):
            signalled.update(pids)
            _signal(pids, signal.SIGTERM)

        raylets = [p for p in self.node_pids(node) if _comm(p) == "raylet"]
        term(raylets)
        deadline = time.monotonic() + grace
        while set(raylets) & set(self.node_pids(node)) and time.monotonic() < deadline:
            time.sleep(0.1)
        term(self.node_pids(node))
        left = self._wait_gone(node, grace)
        if left:
            signalled.update(left)
            _signal(left, signal.SIGKILL)
            left = self._wait_gone(node, 10)
        if left:
            raise RuntimeError(f"{node}: {left} still running after KILL")
        return sorted(signalled)

    def kill_worker(self, timeout: float = 90) -> float:
        """SIGKILL every process in the worker's namespace (a machine dying), wait until none is
        left and the head lists the worker dead. Returns the seconds until the head noticed."""
        t0 = time.monotonic()
        for _ in range(5):  # a process forked between listing and signalling is caught next round
            pids = self.node_pids("worker")
            if not pids:
                break
            _signal(pids, signal.SIGKILL)
            time.sleep(0.2)
        if self._wait_gone("worker", 10):
            raise RuntimeError(f"worker: {self.node_pids('worker')} survived SIGKILL")
        self.wait_node("worker", alive=False, timeout=max(10.0, timeout - (time.monotonic() - t0)))
        return time.monotonic() - t0

    def secrets(self) -> set[str]:
        """The Ray token and every credential of the stack's env file."""
        from urllib.parse import urlparse

        values = {self.token_path.read_text().strip()}
        env = self.stack_env() if self.stack_env_file.is_file() else {}
        values |= {v for k, v in env.items() if re.search(r"PASSWORD|SECRET|ACCESS_KEY", k)}
        if env.get("OPTUNA_STORAGE"):
            values.add(urlparse(env["OPTUNA_STORAGE"]).password or "")
        return {v for v in values if len(v) >= 16}

    def files_with_secrets(self) -> tuple[list[Path], int]:
        """Files under both nodes' Ray --temp-dir (logs, session data) that hold a secret, and how
        many files were read. Names only: the values are never returned or printed."""
        needles = [v.encode() for v in self.secrets()]
        hits, n = [], 0
        for node in NODES:
            for f in sorted((self.node_dir(node) / "ray").rglob("*")):
                if f.is_symlink() or not f.is_file():
                    continue
                n += 1
                data = f.read_bytes()
                if any(v in data for v in needles):
                    hits.append(f)
        return hits, n

    def foreign_connections(self, node: str) -> list[str]:
        """``ss -tunpH`` lines in the node's namespace whose peer is neither in CLUSTER_SUBNET nor
        loopback (listening and unconnected sockets have no peer and are left out)."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns(node), "ss", "-tunpH"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        net = ipaddress.ip_network(self.subnet)
        bad = []
        for line in out.stdout.splitlines():
            fields = line.split()
            if len(fields) < 6:
                continue
            peer = fields[5]
            if peer.endswith(":*"):
                continue
            ip = ipaddress.ip_address(_peer_host(peer))
            if not (ip.is_loopback or ip in net):
                bad.append(line)
        return bad


def _gcs(args) -> int:
    """Inside the head namespace: poll the GCS (ray.nodes()) until the condition holds, bounded."""
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
    deadline = time.monotonic() + args.timeout
    while True:
        state: dict[str, bool] = {}
        for n in ray.nodes():
            state[n["NodeManagerAddress"]] = state.get(n["NodeManagerAddress"], False) or bool(n["Alive"])
        if args.what == "state":
            print(json.dumps(state))
            return 0
        if state.get(args.ip, False) == (args.what == "alive"):
            print(json.dumps(state))
            return 0
        if time.monotonic() > deadline:
            print(f"{args.ip} not {args.what} after {args.timeout} s: {json.dumps(state)}")
            return 1
        time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("start", "stop", "kill", "rss", "pids"):
        sp = sub.add_parser(cmd)
        sp.add_argument("node", choices=NODES)
    sub.add_parser("scan-logs", help="exit 1 if a file under the nodes' Ray temp dirs holds a secret")
    g = sub.add_parser("_gcs", help="internal: runs inside the head namespace")
    g.add_argument("what", choices=("alive", "dead", "state"))
    g.add_argument("ip", nargs="?")
    g.add_argument("--timeout", type=float, default=60)
    args = p.parse_args(argv)
    if args.cmd == "_gcs":
        return _gcs(args)
    c = Cluster.from_env()
    if args.cmd == "start":
        print(f"nodes: {args.node} started in {c.start_node(args.node):.1f} s ({c.ip(args.node)}, {c.ns(args.node)})")
    elif args.cmd == "stop":
        print(f"nodes: {args.node} stopped ({len(c.stop_node(args.node))} pids)")
    elif args.cmd == "kill":
        if args.node != "worker":
            p.error("kill: only the worker")
        print(f"nodes: worker killed, seen dead after {c.kill_worker():.1f} s")
    elif args.cmd == "rss":
        print(c.node_rss_mb(args.node))
    elif args.cmd == "scan-logs":
        hits, n = c.files_with_secrets()
        for f in hits:
            print(f"nodes: a secret (Ray token or stack credential) in {f}")
        print(f"nodes: {len(hits)} of {n} files under the nodes' Ray temp dirs hold a secret")
        return 1 if hits else 0
    elif args.cmd == "pids":
        print(" ".join(map(str, c.node_pids(args.node))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
