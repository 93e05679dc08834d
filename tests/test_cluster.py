"""The cluster's parts: the shared storage (a folder every node mounts stands in for S3 here;
tests/cluster runs the same code against Ceph RGW), a node's folder around a training, the
refusals that come before any Ray call, and the driver of many trainings on a local Ray instance
(the cap on trainings in flight, observed)."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cluster import node as cluster_node
from pipeline.cluster.config import ClusterConfig
from pipeline.cluster.driver import Driver, Place, Training, run_trainings
from pipeline.cluster.node import Shipment, on_node, write_outputs
from pipeline.cluster.storage import SharedStorage, dvc_remote
from pipeline.cluster.tasks import Secrets, shared_storage, with_secrets
from pipeline.core.config import ConfigError, PipelineError
from pipeline.tracking import TrackingConfig


@pytest.mark.parametrize(
    "settings, says",
    [
        ({"jobs": 0}, "Got --jobs 0"),
        ({"address": "auto", "jobs": 2}, "Got --jobs 2 with --ray auto"),
        ({"gpus_per_training": 1.5}, "Got --gpus-per-training 1.5"),
        ({"cpus_per_training": 0}, "Got --cpus-per-training 0"),
        ({"max_concurrent": 0}, "Got --max-concurrent 0"),
    ],
)
def test_cluster_settings_are_refused_naming_the_option(settings, says):
    with pytest.raises(ConfigError, match=says):
        ClusterConfig(**settings)


@pytest.mark.parametrize(
    "settings",
    [{"jobs": 1}, {"max_concurrent": 1}, {"cpus_per_training": 0.01}, {"gpus_per_training": 1}, {"retries": 0}],
)
def test_cluster_settings_at_their_edge_are_accepted(settings):
    assert {key: getattr(ClusterConfig(**settings), key) for key in settings} == settings


def test_data_go_to_the_storage_once_by_md5_in_dvcs_layout_and_are_checked_on_arrival(tmp_path):
    storage = SharedStorage(str(tmp_path / "remote"))
    data = tmp_path / "train.npz"
    data.write_bytes(b"digits" * 1000)
    md5 = hashlib.md5(data.read_bytes()).hexdigest()
    ref = storage.publish(data)
    stored = tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]  # where `dvc push` puts it
    assert ref.md5 == md5 and stored.read_bytes() == data.read_bytes()
    before = stored.stat().st_mtime_ns
    assert storage.publish(data) == ref and stored.stat().st_mtime_ns == before  # not sent again

    cache = tmp_path / "node-cache"
    copy = storage.fetch(ref, cache)
    assert copy.read_bytes() == data.read_bytes() and copy.is_relative_to(cache)
    stored.write_bytes(b"tampered" * 750)  # same size, other bytes
    copy.unlink()
    with pytest.raises(PipelineError, match=f"does not have md5 {md5}"):
        storage.fetch(ref, cache)
    assert not copy.exists()  # nothing half-checked is left for the next training


def test_a_driver_publishes_each_file_once_for_all_its_trainings(tmp_path, monkeypatch):
    storage = SharedStorage(str(tmp_path / "remote"))
    train, validation = tmp_path / "train.npz", tmp_path / "validation.npz"
    train.write_bytes(b"train" * 100)
    validation.write_bytes(b"validation" * 100)
    published = []
    real_publish = SharedStorage.publish
    monkeypatch.setattr(SharedStorage, "publish", lambda self, path: published.append(path) or real_publish(self, path))
    sent = {}
    first = storage.publish_each({"prepared/train.npz": train, "prepared/validation.npz": validation}, sent)
    second = storage.publish_each({"expanded/train.npz": train, "prepared/validation.npz": validation}, sent)
    assert published == [train, validation]  # the second training's files were all sent already
    stored = sorted(p for p in (tmp_path / "remote").rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert sorted(p.read_bytes() for p in stored) == sorted([train.read_bytes(), validation.read_bytes()])
    assert first["prepared/train.npz"] == second["expanded/train.npz"] == real_publish(storage, train)
    assert second["prepared/validation.npz"].md5 == hashlib.md5(validation.read_bytes()).hexdigest()


def test_a_nodes_folder_has_its_data_and_last_checkpoint_and_sends_back_only_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("NNDL_CACHE_DIR", str(tmp_path / "cache"))
    storage = SharedStorage(str(tmp_path / "remote"))
    train = tmp_path / "train.npz"
    train.write_bytes(b"x" * 100)
    sent = Shipment(storage, "table-key", {"prepared/train.npz": storage.publish(train)})
    (tmp_path / "remote" / "checkpoints" / "table-key").mkdir(parents=True)
    (tmp_path / "remote" / "checkpoints" / "table-key" / "checkpoint.npz").write_bytes(b"epoch 2")
    with on_node(sent) as node:
        assert (node.data / "prepared" / "train.npz").read_bytes() == b"x" * 100
        assert (node.folder / "checkpoints" / "checkpoint.npz").read_bytes() == b"epoch 2"
        (node.folder / "checkpoints" / "checkpoint.npz").write_bytes(b"epoch 3")
        node.save_checkpoints()
        (node.folder / "model").mkdir()
        (node.folder / "model" / "model.npz").write_bytes(b"weights")
        (node.folder / "result.json").write_text("{}")
        outputs = node.outputs()
        folder = node.folder
    assert (tmp_path / "remote" / "checkpoints" / "table-key" / "checkpoint.npz").read_bytes() == b"epoch 3"
    assert outputs == {"model/model.npz": b"weights", "result.json": b"{}"}
    assert not folder.exists()  # the node keeps its data cache, not the training's folder

    written = []
    real_write = cluster_node.write_bytes
    monkeypatch.setattr(cluster_node, "write_bytes", lambda path, data: written.append(path) or real_write(path, data))
    files = {"result.json": b"{}", "model/model.npz": b"w", "a.csv": b""}
    write_outputs(tmp_path / "seed1", files, last="result.json")
    assert written[-1] == tmp_path / "seed1" / "result.json" and len(written) == 3  # the finished mark last
    assert {str(p.relative_to(tmp_path / "seed1")): p.read_bytes() for p in written} == files


def test_a_cluster_refuses_a_tracking_store_only_this_machine_opens(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(PipelineError, match="is on this machine only"):
        shared_storage(ClusterConfig(address="auto"), TrackingConfig())


def test_a_cluster_without_shared_storage_says_how_to_set_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    with pytest.raises(PipelineError, match="set a default DVC remote"):
        dvc_remote()
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], check=True)
    storage, keys = dvc_remote()
    assert storage.url == str(tmp_path / "remote") and keys == {}


def test_secrets_reach_the_task_and_never_its_repr(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-password-value")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    credentials = Secrets.of({"AWS_SECRET_ACCESS_KEY": "key-from-dvc-config"})
    assert "s3cr3t" not in repr(credentials) and "key-from" not in repr(credentials)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    seen = with_secrets(credentials, lambda: (__import__("os").environ["MLFLOW_TRACKING_PASSWORD"],))
    assert seen == ("s3cr3t-password-value",)
    assert __import__("os").environ["AWS_SECRET_ACCESS_KEY"] == "key-from-dvc-config"
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")


def _probe(folder: str, total: int, cap: int, task: int, place: Place) -> dict:
    """A training that holds its place until every training of its wave (``cap`` at a time) has
    started, and records when it ran. A driver that runs fewer than ``cap`` at once leaves it
    waiting (it gives up after 120 s); one that runs more starts more before any ends."""
    start = time.monotonic_ns()  # one clock for every process of this machine
    root = Path(folder)
    index = next(i for i in range(total) if _claim(root / f"started-{i}"))
    wave = min(total, (index // cap + 1) * cap)
    deadline = time.monotonic() + 120
    while len(list(root.glob("started-*"))) < wave:
        if time.monotonic() > deadline:
            raise RuntimeError(f"training {task}: {wave} trainings never ran at once")
        time.sleep(0.02)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    import pipeline.nn.backend  # noqa: F401  (as a training does: it sets the devices before JAX starts)
    from pipeline.nn.data_parallel import cpu_devices

    end = time.monotonic_ns()
    return {"task": task, "start": start, "end": end, "cache": cache, "worker": place.worker, "devices": cpu_devices()}


def _claim(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def peak_in_flight(results: list[dict]) -> int:
    """The most trainings running at one moment, from their start and end times."""
    return max(sum(r["start"] <= s["start"] < r["end"] for r in results) for s in results)


def test_the_driver_runs_at_most_max_concurrent_trainings_at_once_and_reaches_it(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # else the workers get that one
    ray = pytest.importorskip("ray", reason="--jobs runs on Ray: pip install -e '.[cluster]'")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    total, cap = 5, 2
    driver = Driver(
        train=functools.partial(_probe, str(tmp_path), total, cap),
        cluster=ClusterConfig(jobs=3, max_concurrent=cap),  # Ray alone would run three at once
        tracking=TrackingConfig(enabled=False),
        compile_cache=tmp_path / "jax-cache",
    )
    finished, in_flight = [], []

    def trainings():  # read by the driver one when a place is free: what it has in flight is seen here
        for i in range(total):
            in_flight.append(i + 1 - len(finished))
            yield Training(f"probe {i}", f"probe-{i}", tmp_path / f"t{i}", {}, i)

    for training, result in run_trainings(trainings(), driver):
        assert training.task == result["task"]
        finished.append(result)
    assert sorted(r["task"] for r in finished) == list(range(total))
    assert max(in_flight) == cap  # never more in flight than the cap, and the cap reached
    assert peak_in_flight(finished) == cap  # and that many ran at once in the workers
    # each in a Ray worker, sharing the driver's compilation cache as one at a time does, on one
    # CPU device for its one CPU (this process has two: conftest.py)
    assert {(r["worker"], r["cache"], r["devices"]) for r in finished} == {(True, str(tmp_path / "jax-cache"), 1)}


def test_the_peak_is_counted_from_overlapping_times():
    runs = [{"start": 0, "end": 10}, {"start": 5, "end": 15}, {"start": 10, "end": 20}, {"start": 12, "end": 13}]
    assert peak_in_flight(runs) == 3  # at 12: the second, third and fourth; the first ended at 10
    assert peak_in_flight(runs[:1]) == 1


def test_one_training_or_jobs_1_runs_in_this_process_with_the_compile_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # else that one is used
    seen = []

    def train(task, place):
        import jax

        seen.append((task, place, jax.config.jax_compilation_cache_dir))
        return {"task": task}

    trainings = [Training("one", "one", tmp_path, {}, 7)]
    for cluster in (ClusterConfig(jobs=4), ClusterConfig(jobs=1)):
        driver = Driver(train, cluster, TrackingConfig(enabled=False), compile_cache=tmp_path / "cache")
        assert [(t.task, r) for t, r in run_trainings(trainings, driver)] == [(7, {"task": 7})]
    assert seen == [(7, Place(), str(tmp_path / "cache"))] * 2


def test_runs_a_dead_node_left_running_are_ended_only_once_a_result_names_the_run_that_went_on(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.cluster import driver as cluster_driver

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("orphans")
    went_on, orphan, other = (
        client.create_run(experiment, tags={cluster_node.TASK_TAG: key}).info.run_id for key in ("k", "k", "other")
    )
    config = TrackingConfig(experiment="orphans")
    for result in ({"failed": "cost diverged"}, {"run_id": None}):  # no run to keep: none is ended
        cluster_driver._end_orphan_runs(config, "k", result)
        assert {client.get_run(r).info.status for r in (went_on, orphan, other)} == {"RUNNING"}
    cluster_driver._end_orphan_runs(config, "k", {"run_id": went_on})
    status = {r: client.get_run(r).info.status for r in (went_on, orphan, other)}
    assert status == {went_on: "RUNNING", orphan: "KILLED", other: "RUNNING"}  # another training's run is not touched


def test_a_worker_process_reused_for_the_next_training_logs_under_its_name(tmp_path):
    """Ray reuses a worker process for the next task: its log lines must carry that training's name,
    not the first one's (logging.basicConfig does nothing once the root logger has a handler)."""
    code = (
        "import logging\n"
        "from pathlib import Path\n"
        "from pipeline.cluster.driver import Training, _in_worker\n"
        "def train(task, place):\n"
        "    logging.getLogger('pipeline.probe').info('task %s', task)\n"
        "    return {}\n"
        "for i in (1, 2):\n"
        "    _in_worker(train, Training(f'seed{i}', f'key{i}', Path('out'), {}, i), None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "pipeline.probe" in line]
    assert lines == ["INFO pipeline.probe [seed1]: task 1", "INFO pipeline.probe [seed2]: task 2"], done.stderr
