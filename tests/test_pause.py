"""The fault tests' pause point (pipeline/core/pause.py): its variables refused in one line, a real
tracked training held after a chosen epoch with that epoch in its checkpoint and its MLflow store,
then released to the same weights as a training never paused; the bounded wait. And the fault it is
for: a real MLflow server stopped while the training is held, the epochs after it kept while the
server is away and sent once it is back."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.files import load_npz
from pipeline.core.pause import DIR_ENV, EPOCH_ENV, RELEASE_FILE, PauseError, PausePoint
from pipeline.nn.checkpoint import CHECKPOINT_FILE
from pipeline.stages import train as train_stage
from pipeline.tracking.run import Run
from pipeline.tracking.tracked import train_tracked

from servers import free_port, mlflow_server, release, wait_for_pause
from synthetic import TINY_NET, stage_training_in, write_prepared


def pause_env(epoch, directory):
    return {EPOCH_ENV: epoch, DIR_ENV: str(directory)}


def test_no_variable_is_no_pause():
    assert PausePoint.from_env({}) is None


@pytest.mark.parametrize("epoch", ["1", "12", " 3"])
def test_an_epoch_of_1_or_more_and_a_folder_are_a_pause(tmp_path, epoch):
    assert PausePoint.from_env(pause_env(epoch, tmp_path)) == PausePoint(int(epoch), tmp_path)


@pytest.mark.parametrize("epoch", ["0", "-1", "1.5", "two", "", "+1"])
def test_an_epoch_below_1_or_not_a_whole_number_is_refused(tmp_path, epoch):
    with pytest.raises(PauseError) as refused:
        PausePoint.from_env(pause_env(epoch, tmp_path))
    assert str(refused.value) == f"Got {EPOCH_ENV}={epoch!r}: expected an epoch number, 1 or more"


def test_a_folder_that_is_missing_or_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    for directory in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(PauseError, match=rf"^Got {DIR_ENV}='{directory}': not an existing directory$"):
            PausePoint.from_env(pause_env("2", directory))


@pytest.mark.parametrize("environ", [{EPOCH_ENV: "2"}, {DIR_ENV: "/tmp"}, {EPOCH_ENV: "2", DIR_ENV: ""}])
def test_one_variable_without_the_other_is_refused(environ):
    with pytest.raises(PauseError, match="set both, or neither$"):
        PausePoint.from_env(environ)


def test_the_stage_refuses_a_bad_pause_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    write_prepared(tmp_path / "prepared")
    (tmp_path / "params.yaml").write_text(json.dumps({"train": {"architecture": TINY_NET, "epochs": 1}}))
    monkeypatch.setenv(EPOCH_ENV, "0")
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    argv = ["--params", str(tmp_path / "params.yaml"), "--prepared", str(tmp_path / "prepared")]
    argv += ["--checkpoints", str(tmp_path / "ckpt"), "--model", str(tmp_path / "model"), "--no-progress"]
    assert train_stage.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: Got {EPOCH_ENV}='0': expected an epoch number, 1 or more"
    )
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "model").exists()


def test_a_pause_nobody_releases_fails_after_its_limit(tmp_path):
    pause = PausePoint(2, tmp_path, limit_s=0.3)
    started = time.monotonic()
    with pytest.raises(
        PauseError, match=rf"^paused after epoch 2 \({EPOCH_ENV}\), but no {tmp_path}/release within 0.3 s$"
    ):
        pause.after_epoch(2)
    assert 0.3 <= time.monotonic() - started < 5
    assert json.loads(pause.marker().read_text())["epoch"] == 2


def test_other_epochs_and_a_released_pause_do_not_wait(tmp_path):
    pause = PausePoint(2, tmp_path, limit_s=0.01)
    for epoch in (1, 3):
        pause.after_epoch(epoch)  # would raise PauseError if it waited
    assert list(tmp_path.iterdir()) == []
    (tmp_path / RELEASE_FILE).touch()
    pause.after_epoch(2)
    assert pause.marker() == tmp_path / f"paused-{os.getpid()}.json"
    assert json.loads(pause.marker().read_text()) == {"epoch": 2, "pid": os.getpid()}


# ------------------------------------------------------------------ a real training, held and released
def job(tmp_path, name, **tracking):
    """A tracked training of 3 epochs; no pyfunc model, datasets or system metrics (slow, and not the point here)."""
    settings = {"architecture": TINY_NET, "epochs": 3, "eta": 0.5, "lmbda": 0.0, "seed": 3, "steps_per_call": 20}
    out = tmp_path / name
    tracking = {"experiment": name, "system_metrics": False, **tracking}
    training = stage_training_in({"train": settings, "tracking": tracking}, tmp_path / "prepared", out)
    return dataclasses.replace(training, log_pyfunc=False, log_datasets=False)


def test_a_training_waits_after_its_epoch_is_recorded_and_ends_as_one_never_paused(tmp_path, monkeypatch):
    write_prepared(tmp_path / "prepared")
    unpaused = job(tmp_path, "unpaused", enabled=False)
    train_tracked(unpaused)

    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    monkeypatch.setenv(EPOCH_ENV, "2")
    monkeypatch.setenv(DIR_ENV, str(pause_dir))
    paused = job(tmp_path, "paused")
    results = {}
    training = threading.Thread(target=lambda: results.update(train_tracked(paused)), daemon=True)
    training.start()
    try:
        assert wait_for_pause(pause_dir, training.is_alive, limit_s=120) == [{"epoch": 2, "pid": os.getpid()}]
        # held: epoch 2 in the checkpoint and in the store, epoch 3 not begun
        assert training.is_alive()
        state = json.loads(str(load_npz(paused.paths.checkpoints / CHECKPOINT_FILE)["__state__"]))
        assert state["epochs_done"] == 2
        client = MlflowClient()
        (only,) = client.search_runs([client.get_experiment_by_name("paused").experiment_id])
        steps = [m.step for m in client.get_metric_history(only.info.run_id, "validation_accuracy")]
        assert sorted(steps) == [1, 2] and only.info.status == "RUNNING"
    finally:
        release(pause_dir)
        training.join(timeout=120)
    assert not training.is_alive() and results["epochs_run"] == 3
    assert client.get_run(only.info.run_id).info.status == "FINISHED"
    for name in ("model.npz", "architecture.json"):
        assert (paused.paths.model / name).read_bytes() == (unpaused.paths.model / name).read_bytes(), name


def test_epochs_finished_while_the_server_is_down_are_sent_when_it_is_back(tmp_path, monkeypatch, caplog):
    write_prepared(tmp_path / "prepared")
    pause_dir, port, backend = tmp_path / "pause", free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    pause_dir.mkdir()
    monkeypatch.setenv(EPOCH_ENV, "1")
    monkeypatch.setenv(DIR_ENV, str(pause_dir))
    monkeypatch.setattr(Run, "EPOCH_RETRY_S", 1.0)  # an epoch's metrics wait 1 s, not 20, before they are kept
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each refused call fails at once; Run retries
    results = {}
    with mlflow_server(backend, tmp_path / "artifacts", tmp_path, port) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        training = threading.Thread(target=lambda: results.update(train_tracked(job(tmp_path, "away"))), daemon=True)
        training.start()
        try:
            wait_for_pause(pause_dir, training.is_alive, limit_s=120)
        except BaseException:
            release(pause_dir)
            raise
    # the server is stopped (its process group gone), epoch 1 recorded, the training held
    release(pause_dir)
    try:
        deadline = time.monotonic() + 120
        while "metrics of steps [2, 3] kept to resend" not in caplog.text:
            assert training.is_alive() and time.monotonic() < deadline, caplog.text[-2000:]
            time.sleep(0.2)
        assert training.is_alive()  # epochs 2 and 3 trained, kept; the run's close waits for the server
    finally:
        with mlflow_server(backend, tmp_path / "artifacts", tmp_path, port):
            training.join(timeout=300)
    assert not training.is_alive() and results["epochs_run"] == 3
    client = MlflowClient(tracking_uri=backend)
    run = client.get_run(results["run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "validation_accuracy")]
    assert sorted(steps) == [1, 2, 3]  # every epoch once: none lost while the server was away, none twice
