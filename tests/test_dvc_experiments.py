"""Sweeps as users run them: queued `dvc exp run`, landing in the repository's MLflow store.

DVC runs queued experiments in temporary copies under .dvc/tmp/exps; the runs must still land in
<repository>/mlflow.db and their artifacts in <repository>/mlartifacts.

One queue worker: with two, DVC's workers race each other now and then and a task fails without
logs (treeverse/dvc#10673, open), which is DVC's bug, not this pipeline's. Two processes writing the
SQLite store at once is tested without DVC in tests/test_tracking.py.
"""

import json
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from project import configure, dvc_env, make_project, sh, synthetic_checksums
from synthetic import TINY_NET, write_mnist


def test_queued_experiments_land_in_the_repository_store(tmp_path, migrated_store):
    project = make_project(tmp_path)
    write_mnist(tmp_path / "mirror", n_train=200, n_test=40)
    configure(
        project,
        download={"sha256": synthetic_checksums(tmp_path / "mirror")},
        prepare={"train_size": 150, "validation_size": 50},
        train={"architecture": TINY_NET, "epochs": 1, "eta": 0.5, "lmbda": 0.0, "steps_per_call": 15},
        evaluate={"gallery_size": 4},
    )
    env = dvc_env(tmp_path / "mirror")
    dvc = (sys.executable, "-m", "dvc")
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline", cwd=project)

    sh(*dvc, "exp", "run", "--queue", "-S", "train.eta=0.5,0.1", cwd=project, env=env)
    migrated_store(project / "mlflow.db")  # after queueing: not part of the experiments' workspace
    # the worker outlives `dvc queue start`: a pipe to it would keep this call waiting
    subprocess.run(
        [*dvc, "queue", "start"], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = sh(*dvc, "queue", "status", cwd=project, env=env).stdout
        # both tasks ended: a task between the queue and its run is listed as neither for a moment
        if status.count("Success") + status.count("Failed") == 2 and "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    logs = [sh(*dvc, "queue", "logs", task, cwd=project, env=env, check=False).stdout for task in failed]
    assert status.count("Success") == 2, status + "\n".join(logs)

    # both runs are in the repository's store, complete, with their artifacts beside it
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nndl-chapter6").experiment_id])
    assert sorted(r.data.params["train.eta"] for r in runs) == ["0.1", "0.5"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "test_accuracy" in run.data.metrics and "validation_accuracy" in run.data.metrics
        assert run.data.tags["dvc.exp_name"] and run.data.tags["dvc.baseline_rev"]
        assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
        assert {"model", "evaluation"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (project / ".dvc" / "tmp" / "exps" / "mlflow.db").exists()

    # and DVC lists both experiments with their params and metrics
    shown = json.loads(sh(*dvc, "exp", "show", "--json", cwd=project, env=env).stdout)
    experiments = [e for baseline in shown for e in (baseline.get("experiments") or [])]
    etas = set()
    for experiment in experiments:
        for rev in experiment["revs"]:
            data = rev["data"]
            etas.add(data["params"]["params.yaml"]["data"]["train"]["eta"])
            assert "test_accuracy" in data["metrics"]["data/metrics/evaluate.json"]["data"]
    assert etas == {0.5, 0.1}

    # the metrics files hold a few numbers, so `dvc exp show` gets few metric columns
    data = experiments[0]["revs"][0]["data"]
    metric_names = []
    for name in ("train.json", "evaluate.json"):
        metrics = data["metrics"][f"data/metrics/{name}"]["data"]
        assert all(isinstance(v, (int, float)) for v in metrics.values()), metrics
        metric_names += metrics
    assert len(metric_names) <= 2, metric_names
    # In a terminal DVC hands the whole table to its pager, which scrolls sideways (less -S): the first
    # screen of a 120-column terminal is each line's first 120 characters of what a pipe gets
    wanted = ["Experiment", "Created", "State", "Executor", *metric_names]
    for options, columns in (((), wanted), (("--only-changed",), [*wanted, "train.eta"])):
        shown = sh(*dvc, "exp", "show", *options, cwd=project, env={**env, "COLUMNS": "120"}).stdout
        header = next(line for line in shown.splitlines() if "Experiment" in line)
        assert all(column in header[:120].split() for column in columns), (options, header[:120])
