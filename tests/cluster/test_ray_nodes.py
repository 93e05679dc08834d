"""The two-node Ray cluster of tests/cluster/run.sh, as the pipeline's cluster tests will use it:
a driver in the head's namespace, a task pinned to each node, the worker killed and started again,
and no connection leaving the run's own /24 and loopback."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from servers import failure, release, wait_for_pause

# a driver: where it runs, and where a task pinned to each alive node runs
PLACEMENT = r"""
import json, os
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

def here():
    return {"ip": ray.util.get_node_ip_address(), "netns": os.readlink("/proc/self/ns/net"),
            "cache": os.environ.get("NNDL_CACHE_DIR"), "home": os.environ.get("HOME"),
            "node_id": ray.get_runtime_context().get_node_id()}

@ray.remote(num_cpus=1)
def where():
    return here()

ray.init(logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
          for n in alive]
print(json.dumps({"driver": here(), "nodes": [n["NodeID"] for n in alive], "tasks": ray.get(pinned, timeout=120)}))
"""

# a background driver: tasks spread over the nodes, retried when their node dies; the first two
# hold their node's one CPU in a pause (pipeline/core/pause.py) until the test releases them
STEPS = r"""
import json, sys
from pathlib import Path
import ray
from pipeline.core.pause import PausePoint

@ray.remote(num_cpus=1, max_retries=5, scheduling_strategy="SPREAD")
def step(i, gate):
    if gate:
        PausePoint(1, Path(gate)).after_epoch(1)
    return i, ray.util.get_node_ip_address()

ray.init(logging_level="ERROR", log_to_driver=False)
n, gate = int(sys.argv[1]), sys.argv[2]
refs = [step.remote(i, gate if i < 2 else None) for i in range(n)]
done = ray.get(refs, timeout=300)
print(json.dumps({"steps": sorted(i for i, _ in done), "ips": sorted({ip for _, ip in done})}), flush=True)
"""


def netns_of(ns: str) -> str:
    """'net:[INODE]', as /proc/PID/ns/net reads for a process in the named namespace."""
    return f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"


def placement(cluster) -> dict:
    out = cluster.python_in_head(PLACEMENT, stack=False)
    assert out.returncode == 0, failure(out.stderr, 3000)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_task_pinned_to_each_node_runs_there_with_that_nodes_cache(cluster):
    got = placement(cluster)
    driver = got["driver"]
    assert (driver["ip"], driver["netns"]) == (cluster.head_ip, netns_of(cluster.head_ns))
    assert len(got["nodes"]) == 2, got
    by_ip = {t["ip"]: t for t in got["tasks"]}
    assert set(by_ip) == {cluster.head_ip, cluster.worker_ip}, got
    for node in ("head", "worker"):
        task = by_ip[cluster.ip(node)]
        assert task["netns"] == netns_of(cluster.ns(node))
        assert task["cache"] == str(cluster.cache_dir(node))
        assert task["home"] == str(cluster.node_dir(node) / "home")
    assert by_ip[cluster.head_ip]["cache"] != by_ip[cluster.worker_ip]["cache"]
    assert driver["node_id"] == by_ip[cluster.head_ip]["node_id"]


def test_the_driver_gets_the_stack_env_on_the_bridge(cluster, stack_env):
    assert stack_env["MLFLOW_TRACKING_URI"].startswith(f"http://{cluster.bridge_ip}:")
    assert f"@{cluster.bridge_ip}:" in stack_env["OPTUNA_STORAGE"]
    # from inside the head's namespace: the MLflow server's /health and Optuna's storage (schema made by run.sh)
    code = (
        "import os, urllib.request, optuna; "
        "print(urllib.request.urlopen(os.environ['MLFLOW_TRACKING_URI'] + '/health', timeout=10).status); "
        "print(len(optuna.storages.RDBStorage(os.environ['OPTUNA_STORAGE']).get_all_studies()) >= 0)"
    )
    out = cluster.python_in_head(code)
    assert out.returncode == 0, failure(out.stderr, 3000)
    assert out.stdout.split() == ["200", "True"]


def test_ray_connects_only_within_the_subnet_and_loopback(cluster):
    placement(cluster)  # some traffic first: a driver, workers leased on both nodes
    for node in ("head", "worker"):
        assert cluster.node_pids(node)
        assert cluster.foreign_connections(node) == [], node
        # nothing else is even routable from the namespaces
        routes = subprocess.run(
            ["ip", "-n", cluster.ns(node), "-4", "route", "show"], capture_output=True, text=True, check=True
        ).stdout
        assert "default" not in routes and routes.strip(), routes


def test_the_token_is_in_no_command_line_and_no_environment(cluster):
    token = cluster.token_path.read_text().strip()
    assert len(token) == 64 and oct(cluster.token_path.stat().st_mode & 0o777) == "0o600"
    for node in ("head", "worker"):
        with_path = 0
        for pid in cluster.node_pids(node):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
                environ = open(f"/proc/{pid}/environ", "rb").read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            assert token.encode() not in cmdline and token.encode() not in environ, pid
            # Python processes overwrite theirs with their title; the raylet and GCS keep it
            with_path += f"RAY_AUTH_TOKEN_PATH={cluster.token_path}".encode() in environ
        assert with_path >= 1, node


def test_a_driver_with_a_wrong_token_is_refused(cluster, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64 + "\n")
    wrong.chmod(0o600)
    code = "import ray; ray.init(logging_level='ERROR'); print(ray.nodes())"
    # RAY_gcs_server_port_wait_time_s: 2 connection attempts, not Ray's 20 (1 s apart)
    env = {"RAY_AUTH_TOKEN_PATH": str(wrong), "RAY_gcs_server_port_wait_time_s": "2"}
    out = cluster.python_in_head(code, stack=False, env=env, timeout=120)
    assert out.returncode != 0
    assert "InvalidAuthToken" in out.stderr, out.stderr[-3000:]


def test_a_driver_survives_the_worker_killed_and_started_again(cluster, tmp_path):
    """The harness of the pipeline's fault tests: a background driver whose tasks hold both nodes,
    the worker SIGKILLed under it (every process of namespace B), started again; the driver's tasks
    are retried and all finish."""
    n, gate = 6, tmp_path / "gate"
    gate.mkdir()
    driver = cluster.popen_in_head(
        [cluster.venv / "bin" / "python", "-c", STEPS, str(n), str(gate)],
        stack=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        held = wait_for_pause(gate, lambda: driver.poll() is None, count=2, limit_s=120)
        assert sorted(cluster.node_of(h["pid"]) for h in held) == ["head", "worker"], held
        for node in ("head", "worker"):
            assert cluster.foreign_connections(node) == [], node
        dead_s = cluster.kill_worker()
        assert cluster.node_pids("worker") == []
        state = cluster.nodes_state()
        assert state == {cluster.head_ip: True, cluster.worker_ip: False}, state
        start_s = cluster.start_worker()
        assert cluster.nodes_state()[cluster.worker_ip] is True
        release(gate)
        out, err = driver.communicate(timeout=300)
    finally:
        release(gate)  # a failure above must not leave tasks holding the nodes' CPUs
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
            driver.wait(30)
    assert driver.returncode == 0, failure(err, 3000)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == list(range(n))
    assert cluster.head_ip in result["ips"]
    # the restarted worker takes tasks again, from a new node id
    got = placement(cluster)
    assert {t["ip"] for t in got["tasks"]} == {cluster.head_ip, cluster.worker_ip}
    print(f"worker seen dead {dead_s:.1f} s after SIGKILL; started again and alive in {start_s:.1f} s")
    print(
        f"node RSS after the restart: head {cluster.node_rss_mb('head')} MB, worker {cluster.node_rss_mb('worker')} MB"
    )


@pytest.mark.parametrize("node", ["head", "worker"])
def test_node_rss_is_measured(cluster, node):
    pids = cluster.node_pids(node)
    assert len(pids) >= 3
    assert 50 < cluster.node_rss_mb(node) < 4000
