"""A real two-node Ray cluster and the team stack, for the tests in this folder.

tests/cluster/run.sh (as root) makes a bridge and two network namespaces, starts deploy/stack.py on
the bridge's address, a Ray head in namespace A and a Ray worker in namespace B, exports the
``CLUSTER_*`` variables that nodes.py lists, and runs pytest here. Without them (a plain ``pytest``
from the repository root) every test in this folder is skipped, with the names of the missing
variables as the reason.

Fixtures:
- ``cluster`` (session): a ``nodes.Cluster``: ``run_in_head``, ``popen_in_head``,
  ``python_in_head``, ``kill_worker``, ``start_worker``, ``node_pids``, ``node_rss_mb``,
  ``nodes_state``, ``foreign_connections``, the names, addresses and paths;
- ``stack_env`` (session): the stack's env file as a dict (URLs on the bridge's address);
- ``worker_back`` (autouse): after each test, starts the worker again if the test left its
  namespace empty (killed and not restarted), so the next test has two nodes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes import Cluster, missing_env

HERE = Path(__file__).resolve().parent
MISSING = missing_env()
_NAMES = "the CLUSTER_* variables" if len(MISSING) > 3 else ", ".join(MISSING)
REASON = f"no running cluster: {_NAMES} not set (tests/cluster/run.sh starts one, as root)"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.cluster)
            if MISSING:
                item.add_marker(pytest.mark.skip(reason=REASON))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    if MISSING:
        pytest.skip(REASON)
    return Cluster.from_env()


@pytest.fixture(scope="session")
def stack_env(cluster) -> dict[str, str]:
    return cluster.stack_env()


@pytest.fixture(autouse=True)
def worker_back():
    yield
    if MISSING:
        return
    c = Cluster.from_env()
    if not c.node_pids("worker"):
        c.start_worker()
