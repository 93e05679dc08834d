"""Tracking against real MLflow stores: a SQLite file, and a real `mlflow server` on 127.0.0.1."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.tracking import TrackingConfig, TrackingError, flatten, tracked_run
from pipeline.tracking.run import Run, is_transient

from servers import free_port, mlflow_server


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A directory standing for the user's repository, with no tracking URI in the environment."""
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def client_for(repo):
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def test_default_store_is_absolute_sqlite_at_the_repository_root(repo, monkeypatch):
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}?timeout=60"
    # under `dvc exp run --temp/--queue` the stage runs in a copy; DVC_ROOT names the real repository
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    (copy / ".dvc").mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}?timeout=60"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.tracking_uri() == "http://example.invalid:5000"


def test_a_run_is_logged_with_params_metrics_tags_and_artifacts(repo):
    (repo / "note.txt").write_text("hello")
    with tracked_run(TrackingConfig(experiment="exp"), run_name="r1", tags={"engine": "jax"}) as run:
        run.log_params(flatten({"train": {"eta": 0.1, "layers": [1, 2]}}))
        for epoch in range(3):
            run.log_metrics({"validation_accuracy": 0.5 + epoch / 10}, step=epoch)
        run.log_artifact(repo / "note.txt", "notes")

    client = client_for(repo)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {"train.eta": "0.1", "train.layers": "[1, 2]"}
    assert logged.data.tags["engine"] == "jax"
    history = client.get_metric_history(run.run_id, "validation_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert [a.path for a in client.list_artifacts(run.run_id, "notes")] == ["notes/note.txt"]
    # artifacts live beside the store at the repository root, not in the current directory
    assert (repo / "mlartifacts").is_dir()
    assert client.get_experiment_by_name("exp").artifact_location == (repo / "mlartifacts").as_uri()


@pytest.mark.parametrize("error", [ValueError("cost is nan at epoch 3"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_run_is_marked_failed(repo, error):
    with pytest.raises(type(error)):
        with tracked_run(TrackingConfig(experiment="exp")) as run:
            raise error
    logged = client_for(repo).get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert type(error).__name__ in logged.data.tags["failure_reason"]


def test_a_reopened_run_continues_the_same_run(repo):
    with tracked_run(TrackingConfig(experiment="exp")) as first:
        first.log_metrics({"a": 1.0})
    with tracked_run(TrackingConfig(experiment="exp"), resume_run_id=first.run_id) as second:
        second.log_metrics({"b": 2.0})
    assert second.run_id == first.run_id
    logged = client_for(repo).get_run(first.run_id)
    assert logged.data.metrics == {"a": 1.0, "b": 2.0} and logged.info.status == "FINISHED"


def test_git_and_dvc_tags(repo, monkeypatch):
    subprocess.run(["git", "init", "-q"], check=True)
    (repo / "f").write_text("x")
    subprocess.run(["git", "add", "f"], check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"], check=True)
    monkeypatch.setenv("DVC_EXP_NAME", "quick-fox")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    (repo / "f").write_text("changed")
    tags = tracking.source_tags()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["git.commit"] == head and tags["git.dirty"] == "True"
    assert tags["dvc.exp_name"] == "quick-fox" and tags["dvc.baseline_rev"] == "abc123"


def test_unreachable_server_fails_early_naming_the_uri(repo, monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"unreachable \(MLFLOW_TRACKING_URI='http://127.0.0.1:{port}'\)"):
        with tracked_run(TrackingConfig()):
            pytest.fail("the body must not run")
    assert time.monotonic() - started < 10


@pytest.fixture
def mlflow_server_uri(tmp_path, migrated_store):
    migrated_store(tmp_path / "server.db")
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "art", cwd=tmp_path) as uri:
        yield uri


def test_runs_go_to_a_real_tracking_server(repo, monkeypatch, mlflow_server_uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_uri)
    (repo / "a.txt").write_text("artifact")
    with tracked_run(TrackingConfig(experiment="served")) as run:
        run.log_params({"train.eta": "0.03"})
        run.log_metrics({"test_accuracy": 0.99}, step=0)
        run.log_artifact(repo / "a.txt")
    client = MlflowClient(tracking_uri=mlflow_server_uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.data.metrics["test_accuracy"] == 0.99
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["a.txt"]
    assert not (repo / "mlflow.db").exists()


def test_two_processes_writing_at_once_lose_no_run(repo):
    """Two queue workers share the SQLite store: both runs and all their metrics must land."""
    script = textwrap.dedent(
        """
        import sys
        from pipeline.tracking import TrackingConfig, tracked_run
        with tracked_run(TrackingConfig(experiment="parallel"), run_name=sys.argv[1]) as run:
            for step in range(60):
                run.log_metrics({"m": step}, step=step)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    workers = [
        subprocess.Popen([sys.executable, "-c", script, f"w{i}"], cwd=repo, env=env, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    client = client_for(repo)
    experiment = client.get_experiment_by_name("parallel")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["w0", "w1"]
    for r in runs:
        assert r.info.status == "FINISHED"
        history = client.get_metric_history(r.info.run_id, "m")
        assert sorted((m.step, m.value) for m in history) == [(step, float(step)) for step in range(60)]


@pytest.fixture
def login_server():
    """A tiny HTTP server on 127.0.0.1 that is healthy but refuses every API call with 401."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path == "/health" else 401
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_wrong_password_fails_early_naming_uri_and_user(repo, monkeypatch, login_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", login_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-not-shown")
    with pytest.raises(TrackingError) as caught:
        with tracked_run(TrackingConfig()):
            pytest.fail("the body must not run")
    message = str(caught.value)
    assert f"MLflow server {login_server} refused the login of MLFLOW_TRACKING_USERNAME='pipeline' (401)" in message
    assert "MLFLOW_TRACKING_PASSWORD" in message and "s3cret-not-shown" not in message


def test_the_train_stage_reports_a_wrong_password_in_one_line(tmp_path, login_server):
    env = dict(os.environ, MLFLOW_TRACKING_URI=login_server, MLFLOW_TRACKING_USERNAME="pipeline")
    env["MLFLOW_TRACKING_PASSWORD"] = "s3cret-not-shown"
    import shutil

    from project import ROOT, configure
    from synthetic import TINY_NET, write_prepared

    (tmp_path / ".dvc").mkdir()
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    configure(tmp_path, train={"architecture": TINY_NET, "epochs": 1})
    write_prepared(tmp_path / "prepared")
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--prepared", "prepared", "--no-progress"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: MLflow server {login_server} refused the login")
    assert "s3cret-not-shown" not in p.stdout + p.stderr
    assert not (tmp_path / "data" / "model").exists()


class FlakyClient:
    """Stands for MlflowClient: log_batch fails (connection refused) while ``down`` is true."""

    def __init__(self):
        self.down = False
        self.metrics = []
        self.terminated = None

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if self.down:
            raise tracking_exception("API request to http://127.0.0.1:1/x failed: [Errno 111] Connection refused")
        self.metrics += list(metrics)

    def set_terminated(self, run_id, status):
        self.terminated = status


def tracking_exception(message):
    from mlflow.exceptions import MlflowException

    return MlflowException(message)


def test_unsendable_epoch_metrics_are_buffered_then_sent(monkeypatch):
    monkeypatch.setattr(Run, "EPOCH_RETRY_S", 0.0)
    client = FlakyClient()
    run = Run(client, "r1")
    run.log_metrics({"validation_accuracy": 0.5}, step=1, buffer=True)
    client.down = True
    run.log_metrics({"validation_accuracy": 0.6}, step=2, buffer=True)  # the training goes on
    assert [m.step for m in run.pending] == [2]
    with pytest.raises(Exception, match="Connection refused"):  # unbuffered calls still fail
        monkeypatch.setenv("PIPELINE_TRACKING_RETRY_S", "0")
        run.log_metrics({"test_accuracy": 0.9})
    client.down = False
    run.log_metrics({"validation_accuracy": 0.7}, step=3, buffer=True)
    run.close("FINISHED")
    steps = [m.step for m in client.metrics if m.key == "validation_accuracy"]
    assert steps == [1, 2, 3] and client.terminated == "FINISHED" and not run.pending


def test_a_run_that_cannot_deliver_its_epochs_fails_loudly(monkeypatch):
    monkeypatch.setattr(Run, "EPOCH_RETRY_S", 0.0)
    monkeypatch.setenv("PIPELINE_TRACKING_RETRY_S", "1")
    client = FlakyClient()
    client.down = True
    run = Run(client, "r-lost")
    run.log_metrics({"validation_accuracy": 0.5}, step=4, buffer=True)
    with pytest.raises(TrackingError, match=r"run r-lost: the metrics of steps \[4\] could not be delivered"):
        run.close("FINISHED")
    assert client.terminated is None


class Clock:
    """Stands for the time module in pipeline.tracking.run: a sleep is recorded and moves the clock on."""

    def __init__(self):
        self.now = 0.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.8e9 + self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    """The retries' clock, and their jitter: ``clock.jitter`` is what random.random() gives them."""
    from types import SimpleNamespace

    from pipeline.tracking import run as run_module

    fake = Clock()
    fake.jitter = 0.0
    monkeypatch.setattr(run_module, "time", fake)
    monkeypatch.setattr(run_module, "random", SimpleNamespace(random=lambda: fake.jitter))
    return fake


def refused(failures: int):
    """A call that fails ``failures`` times as MLflow's client does while its server is down."""
    calls = []

    def call():
        calls.append(len(calls))
        if len(calls) <= failures:
            raise tracking_exception("API request to http://127.0.0.1:5000/x failed: [Errno 111] Connection refused")
        return "ok"

    return call, calls


@pytest.mark.parametrize("jitter", [0.0, 0.999])
def test_transient_retries_wait_twice_as_long_each_time_up_to_10_s(clock, jitter):
    clock.jitter = jitter
    call, calls = refused(8)
    assert tracking.retry_transient(call, seconds=1000) == "ok" and len(calls) == 9
    assert clock.waits == pytest.approx([d * (1 + jitter / 2) for d in (0.5, 1, 2, 4, 8, 10, 10, 10)])


@pytest.mark.parametrize(
    "jitter, seconds, waits",
    [
        (0.0, 15.5, [0.5, 1, 2, 4, 8]),  # the fifth wait ends exactly at the budget: taken
        (0.0, 15.49, [0.5, 1, 2, 4]),  # one past: the error is raised instead of waiting
        (0.999, 20.0, [0.74975, 1.4995, 2.999, 5.998]),  # the jittered 12 s wait would end at 23.2
    ],
)
def test_transient_retries_end_within_pipeline_tracking_retry_s(clock, monkeypatch, jitter, seconds, waits):
    clock.jitter = jitter
    monkeypatch.setenv("PIPELINE_TRACKING_RETRY_S", str(seconds))
    call, calls = refused(100)
    with pytest.raises(Exception, match="Connection refused"):
        tracking.retry_transient(call)
    assert clock.waits == pytest.approx(waits) and len(calls) == len(waits) + 1
    assert clock.now <= seconds


def test_only_transient_failures_are_retried(clock):
    def denied():
        raise tracking_exception("API request failed with error code 401 != 200")

    with pytest.raises(Exception, match="401"):
        tracking.retry_transient(denied, seconds=1000)
    assert clock.waits == []
    assert not is_transient(tracking_exception("API request failed with error code 401 != 200"))
    assert is_transient(tracking_exception("API request failed with error code 503 != 200"))


def test_a_locked_sqlite_store_is_retried_with_growing_waits(clock):
    from pipeline.tracking.run import LOCK_RETRIES, retry_locked

    def locked():
        raise tracking_exception("(sqlite3.OperationalError) database is locked")

    with pytest.raises(Exception, match="database is locked"):
        retry_locked(locked)
    assert clock.waits == pytest.approx([0.2 * 2**attempt for attempt in range(LOCK_RETRIES - 1)])


def test_experiments_open_on_their_training_runs_in_the_mlflow_ui(repo):
    """MLflow 3's UI opens an experiment without `mlflow.experimentKind` on its GenAI overview."""
    with tracked_run(TrackingConfig(experiment="new")):
        pass
    client = client_for(repo)
    assert client.get_experiment_by_name("new").tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before (by an older version of the pipeline, or by hand) is tagged when reused
    client.create_experiment("older", artifact_location=(repo / "mlartifacts").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment_by_name("older").tags
    with tracked_run(TrackingConfig(experiment="older")):
        pass
    assert client.get_experiment_by_name("older").tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_dead_nodes_run_is_marked_killed_and_the_run_that_went_on_is_kept(tmp_path, monkeypatch):
    """What the cluster does when a training's retry opened a second run (the first node died before
    noting its run): the orphan, and only it, ends KILLED; find_run finds a run by its tags."""
    monkeypatch.chdir(tmp_path)
    config = TrackingConfig(experiment="orphans")
    task = {"cluster.task": "table-abc"}
    with tracked_run(config, run_name="dead node", tags=task, finish=False) as orphan:
        pass
    with tracked_run(config, run_name="other training", tags={"cluster.task": "table-xyz"}, finish=False) as other:
        pass
    with tracked_run(config, run_name="the retry", tags=task, finish=False) as retry:
        assert tracking.end_orphan_runs(config, task, keep=retry.run_id) == [orphan.run_id]
    client = MlflowClient()
    status = {run_id: client.get_run(run_id).info.status for run_id in (orphan.run_id, other.run_id, retry.run_id)}
    assert status == {orphan.run_id: "KILLED", other.run_id: "RUNNING", retry.run_id: "RUNNING"}
    assert tracking.find_run(config, {"cluster.task": "table-xyz"}) == other.run_id
    assert tracking.find_run(config, {"cluster.task": "nothing"}) is None
    assert tracking.end_orphan_runs(TrackingConfig(enabled=False), task, keep=None) == []
