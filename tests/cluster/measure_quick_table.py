"""The quick table (`python -m pipeline table --quick`: rows 1-9, 3 seeds, 1 epoch on 2,000 images)
on one Ray node, then on two, side by side in one run: wall time of each, the ratio, each node's
memory, and whether both reports hold the same numbers. Run by tests/cluster/run.sh:

    CLUSTER_COMMAND='python tests/cluster/measure_quick_table.py' tests/cluster/run.sh

Both nodes are network namespaces of ONE machine (2 cores here), each given one Ray CPU: the
figure says what a second node buys when a training cannot use the whole machine, not what a
second real machine would buy. Synthetic digits of the quick table's sizes stand in for MNIST.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # as under pytest
from team_project import make_project, pipeline  # noqa: E402

from nodes import Cluster  # noqa: E402

SIZES = {"prepared/train": 2000, "prepared/validation": 1000, "prepared/test": 1000, "expanded/train": 2000}


def peak_rss(cluster: Cluster, stop: threading.Event, peaks: dict) -> None:
    while not stop.wait(2):
        for node in ("head", "worker"):
            if cluster.node_pids(node):
                peaks[node] = max(peaks.get(node, 0), cluster.node_rss_mb(node))


def timed_table(cluster: Cluster, project, out: str) -> tuple[float, dict]:
    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=peak_rss, args=(cluster, stop, peaks))
    sampler.start()
    start = time.monotonic()
    args = ["--quick", "--no-progress", "--out", out, "--ray", "auto"]
    done = pipeline(cluster, project, "table", *args, experiment=out, timeout=3600)
    seconds = time.monotonic() - start
    stop.set()
    sampler.join()
    if done.returncode != 0:
        raise SystemExit(f"{out}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return seconds, peaks


def main() -> None:
    cluster = Cluster.from_env()
    project = make_project(cluster, cluster.node_dir("head") / "work" / "measure", SIZES)
    cluster.stop_node("worker")
    cluster.wait_node("worker", alive=False)
    one, one_peaks = timed_table(cluster, project, "quick-1-node")
    cluster.start_worker()
    two, two_peaks = timed_table(cluster, project, "quick-2-nodes")
    lines = [
        json.loads((project / out / "results.json").read_text())["lines"] for out in ("quick-1-node", "quick-2-nodes")
    ]
    same = [[(line["row"], line["ours"]) for line in each] for each in lines]
    print(f"quick table, 1 node (1 training at a time):  {one:7.1f} s   peak RSS head {one_peaks.get('head')} MB")
    print(
        f"quick table, 2 nodes (2 trainings at a time): {two:7.1f} s   peak RSS head {two_peaks.get('head')} MB, "
        f"worker {two_peaks.get('worker')} MB"
    )
    print(f"speed-up: {one / two:.2f}x; the same accuracy in every row: {same[0] == same[1]}")


if __name__ == "__main__":
    main()
