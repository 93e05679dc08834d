"""The cluster's parts that need no Ray: the shared storage (a folder every node mounts stands in
for S3 here; tests/cluster runs the same code against Ceph RGW), a node's folder around a training,
and the refusals that come before any Ray call."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from pipeline.cluster import node as cluster_node
from pipeline.cluster.config import ClusterConfig
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
    monkeypatch.setattr(cluster_node, "write_bytes", lambda path, data: written.append(path.name))
    write_outputs(tmp_path / "seed1", {"result.json": b"{}", "model/model.npz": b"w", "a.csv": b""}, last="result.json")
    assert written[-1] == "result.json"


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
