"""The pipeline's MLflow runs against the stack's server and PostgreSQL when a batch is written twice,
or two runs add the same dataset at once.

MLflow's HTTP client resends a request that timed out, POSTs too, while the server may still be
writing the first copy: both copies read the run's params before either commits, and the second
is refused as a duplicate key. Here the test's own uncommitted rows stand in for the first copy,
and the test commits them once the server's INSERT waits on them in PostgreSQL (seen in
``pg_stat_activity``), so the collision lands at a known point."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from pipeline.tracking.run import Run


def _mlflow_database(env):
    """A connection to the server's own database as its owner, the password read by libpq from the
    stack's 0600 pgpass file."""
    import psycopg2

    storage = urlparse(env["OPTUNA_STORAGE"].replace("postgresql+psycopg2://", "postgresql://"))
    passfile = Path(env["STACK_DIR"]) / "secrets" / "pgpass"
    return psycopg2.connect(
        host=storage.hostname, port=storage.port, user="mlflow", dbname="mlflow", passfile=str(passfile)
    )


def _waiting_inserts(db, table: str) -> int:
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE %s",
            (f"INSERT INTO {table} %",),
        )
        return cursor.fetchone()[0]


def _colliding_with(env, action, table: str, first_copy: list[tuple[str, tuple]]):
    """``action()`` while the test holds the rows ``first_copy`` ((SQL, values) each) written but
    uncommitted; commits them once the server's INSERT INTO ``table`` waits on them. Returns what
    ``action`` raised (None: nothing)."""
    writer, watcher = _mlflow_database(env), _mlflow_database(env)
    watcher.autocommit = True
    outcome = {}

    def act():
        try:
            action()
        except Exception as e:  # handed to the test
            outcome["error"] = e

    try:
        with writer.cursor() as cursor:
            for sql, values in first_copy:
                cursor.execute(sql, values)
        thread = threading.Thread(target=act, daemon=True)  # a hung call must not hold pytest at exit
        thread.start()
        for _ in range(600):  # bounded: 60 s
            if _waiting_inserts(watcher, table) or not thread.is_alive():
                break
            time.sleep(0.1)
        assert thread.is_alive(), f"the call ended before the server wrote into {table}: {outcome}"
        assert _waiting_inserts(watcher, table) == 1
        writer.commit()
        thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        writer.rollback()
        writer.close()
        watcher.close()
    return outcome.get("error")


def _log_params_colliding_with(env, run: Run, params: dict, first_copy: dict):
    """``run.log_params(params)`` while another copy of the batch, ``first_copy``, is being written."""
    rows = [
        ("INSERT INTO params (key, value, run_uuid) VALUES (%s, %s, %s)", (key, value, run.run_id))
        for key, value in first_copy.items()
    ]
    return _colliding_with(env, lambda: run.log_params(params), "params", rows)


@pytest.fixture()
def run(pipeline_client):
    experiment = pipeline_client.create_experiment(f"stack-duplicate-{time.time_ns()}")
    yield Run(pipeline_client, pipeline_client.create_run(experiment).info.run_id)


def test_params_written_first_by_another_copy_of_the_batch_are_accepted(env, run, pipeline_client):
    params = {"train.eta": "0.1", "train.epochs": "3"}
    error = _log_params_colliding_with(env, run, params, first_copy=params)  # not in the assert: env holds secrets
    assert error is None, error
    assert pipeline_client.get_run(run.run_id).data.params == params


def test_a_param_written_first_with_another_value_is_still_an_error(env, run, pipeline_client):
    error = _log_params_colliding_with(
        env, run, {"train.eta": "0.1", "train.epochs": "3"}, first_copy={"train.eta": "0.5", "train.epochs": "3"}
    )
    assert error is not None and "duplicate key value violates unique constraint" in str(error)
    assert pipeline_client.get_run(run.run_id).data.params == {"train.eta": "0.5", "train.epochs": "3"}


def test_a_dataset_another_run_adds_at_the_same_moment_is_linked_to(env, run, pipeline_client, tmp_path):
    import numpy as np

    from pipeline.core.files import save_npz, sha256_file

    path = tmp_path / "train.npz"
    save_npz(path, images=np.zeros((3, 28, 28), np.uint8), labels=np.arange(3, dtype=np.uint8))
    experiment = pipeline_client.get_run(run.run_id).info.experiment_id
    # another run's log_inputs of the same file adding the dataset row, not yet committed
    row = (
        "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, dataset_source_type, dataset_source)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (uuid.uuid4().hex, int(experiment), "train", sha256_file(path)[:32], "local", "{}"),
    )
    error = _colliding_with(env, lambda: run.log_dataset(path, "train", "training"), "datasets", [row])
    assert error is None, error
    (logged,) = pipeline_client.get_run(run.run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("train", sha256_file(path)[:32])
