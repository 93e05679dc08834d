"""The sweep command end to end on small synthetic digits: a grid in dvc exp run -S syntax, trained
in this process and on a local Ray instance (--jobs 2) to the same numbers, an Optuna search that a
second call extends and a restarted driver finishes, every trial an MLflow child run like a train
stage run, the best chosen by validation accuracy; and bad input refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.files import load_npz
from pipeline.stages import sweep as sweep_stage
from pipeline.sweep import runner
from pipeline.sweep import study as studies
from pipeline.sweep.config import SweepConfig
from pipeline.sweep.report import sweep_summary
from pipeline.sweep.space import parse_space
from pipeline.tracking import TrackingConfig, flatten

from table_quick import write_set

GRID = ["-S", "train.eta=0.05,0.5", "-S", "train.epochs=2", "-S", "train.architecture=shallow"]
SEARCH = ["-S", "train.eta=tag(log, interval(0.01, 1))", "-S", "train.epochs=2", "-S", "train.architecture=shallow"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-data")
    for name, n, seed in [("prepared/train", 300, 1), ("prepared/validation", 100, 2), ("expanded/train", 300, 4)]:
        write_set(root / f"{name}.npz", n, seed)
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    (root / "params.yaml").write_text(params.read_text())
    return root


def sweep(data: Path, out: Path, *args: str) -> int:
    return sweep_stage.main(
        [
            "--params",
            str(data / "params.yaml"),
            "--prepared",
            str(data / "prepared"),
            "--expanded",
            str(data / "expanded"),
            "--out",
            str(out),
            "--no-progress",
            *args,
        ]
    )


def runs(experiment: str = "nndl-chapter6"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])


def children_of(all_runs, parent) -> list:
    return [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_a_grid_trains_each_point_once_as_a_child_run_like_the_train_stage(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep(data, tmp_path / "grid", *GRID, "--name", "grid", "--register") == 0
    client, all_runs = runs()
    (parent,) = [r for r in all_runs if r.data.tags.get("sweep.role") == "parent"]
    children = children_of(all_runs, parent)
    assert sorted(r.data.params["train.eta"] for r in children) == ["0.05", "0.5"]
    assert {r.info.status for r in children} == {"FINISHED"}
    params = __import__("yaml").safe_load((data / "params.yaml").read_text())
    for run in children:
        # the train stage's params (every section but evaluate, with the trial's values), its curves, its model
        expected = flatten({k: v for k, v in params.items() if k != "evaluate"})
        assert set(expected) | {"architecture.resolved"} <= set(run.data.params)
        assert run.data.params["train.epochs"] == "2" and run.data.params["train.architecture"] == "shallow"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "validation_accuracy")]
        assert steps == [1, 2]
        files = {f.path for f in client.list_artifacts(run.info.run_id, "model_files")}
        assert "model_files/model.npz" in files
    # the best by validation accuracy, as the children recorded it (never by test accuracy); ties: the
    # earlier point of the grid (eta 0.05)
    best = min(
        children,
        key=lambda r: (-r.data.metrics["final_best_validation_accuracy"], float(r.data.params["train.eta"])),
    )
    assert parent.data.tags["best.train.eta"] == best.data.params["train.eta"]
    assert parent.data.tags["best.run_id"] == best.info.run_id
    assert parent.data.metrics["best_validation_accuracy"] == best.data.metrics["final_best_validation_accuracy"]
    summary = json.loads((tmp_path / "grid" / "sweep.json").read_text())
    assert summary["best"]["run_id"] == best.info.run_id and summary["finished"] == 2
    assert (tmp_path / "grid" / "sweep.png").stat().st_size > 10_000
    assert not any("test_accuracy" in r.data.metrics for r in children)
    # --register: the best trial's model is a version of the registered model, and the champion
    (version,) = client.search_model_versions("name = 'nndl-chapter6-model'")
    assert version.run_id == best.info.run_id and "test_accuracy" not in version.tags
    assert client.get_model_version_by_alias("nndl-chapter6-model", "champion").version == version.version
    assert (parent.data.tags["registered.run_id"], parent.data.tags["registered.trial"]) == (
        best.info.run_id,
        parent.data.tags["best.trial"],
    )

    # the same command again trains nothing and adds no run
    assert sweep(data, tmp_path / "grid", *GRID, "--name", "grid") == 0
    _, again = runs()
    assert len(again) == len(all_runs)
    assert json.loads((tmp_path / "grid" / "sweep.json").read_text())["trials"] == summary["trials"]


def test_a_grid_on_a_local_ray_gives_the_same_numbers_as_in_process(data, tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="--jobs runs on Ray: pip install -e '.[cluster]'")
    monkeypatch.chdir(tmp_path)
    assert sweep(data, tmp_path / "one", *GRID, "--name", "one") == 0
    # two trainings at once, each on as many CPU devices as this process trains on (conftest.py):
    # the mini-batch shared among as many devices, so the same additions in the same order
    assert sweep(data, tmp_path / "ray", *GRID, "--name", "ray", "--jobs", "4", "--cpus-per-training", "2") == 0
    one = json.loads((tmp_path / "one" / "sweep.json").read_text())["trials"]
    ray = json.loads((tmp_path / "ray" / "sweep.json").read_text())["trials"]
    assert [(t["key"], t["validation_accuracy"], t["best_epoch"]) for t in one] == [
        (t["key"], t["validation_accuracy"], t["best_epoch"]) for t in ray
    ]
    assert {t["ray.node_ip"] for t in ray} == {"127.0.0.1"}  # a local instance stays on loopback
    for trial in one:  # bit for bit the same weights
        a = load_npz(tmp_path / "one" / "trials" / trial["key"] / "model" / "model.npz")
        b = load_npz(tmp_path / "ray" / "trials" / trial["key"] / "model" / "model.npz")
        assert all((a[name] == b[name]).all() for name in a)


def test_an_optuna_search_grows_with_a_second_call_and_a_restarted_driver_finishes_its_trials(
    data, tmp_path, monkeypatch
):
    optuna = pytest.importorskip("optuna", reason="pip install -e '.[cluster]'")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "search"
    assert sweep(data, out, *SEARCH, "--name", "search", "--search", "optuna", "--trials", "3", "--seed", "1") == 0
    storage = f"sqlite:///{out / 'optuna.db'}"
    study = optuna.load_study(study_name="search", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3

    # a driver killed after asking a trial leaves it RUNNING: the same command runs it under its number
    driver = json.loads((out / "driver.json").read_text())["driver"]
    orphan = study.ask({"train.eta": optuna.distributions.FloatDistribution(0.01, 1, log=True)})
    studies.mark_driver(orphan, driver)
    assert sweep(data, out, *SEARCH, "--name", "search", "--search", "optuna", "--trials", "5", "--seed", "2") == 0
    study = optuna.load_study(study_name="search", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert study.trials[3].number == orphan.number and study.trials[3].params == orphan.params

    _, all_runs = runs()
    (parent,) = [r for r in all_runs if r.data.tags.get("sweep.role") == "parent"]
    children = children_of(all_runs, parent)
    assert sorted(int(r.data.tags["sweep.optuna_trial"]) for r in children) == [0, 1, 2, 3, 4]
    assert {r.info.status for r in children} == {"FINISHED"}
    for trial in study.trials:  # Optuna's value is the child run's validation accuracy
        (child,) = [r for r in children if r.data.tags["sweep.optuna_trial"] == str(trial.number)]
        assert trial.value == child.data.metrics["final_best_validation_accuracy"]
    assert parent.data.metrics["best_validation_accuracy"] == study.best_value

    # the same command again: the study has its 5 trials; nothing trains
    assert sweep(data, out, *SEARCH, "--name", "search", "--search", "optuna", "--trials", "5") == 0
    assert len(optuna.load_study(study_name="search", storage=storage).trials) == 5
    assert len(runs()[1]) == len(all_runs)


def test_an_optuna_search_with_two_trainings_in_flight_finishes_exactly_its_trials(data, tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna", reason="pip install -e '.[cluster]'")
    pytest.importorskip("ray", reason="--jobs runs on Ray: pip install -e '.[cluster]'")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the sweep's own cache, checked below
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "two"
    args = [*SEARCH, "--name", "two", "--search", "optuna", "--trials", "3", "--seed", "1", "--jobs", "2"]
    assert sweep(data, out, *args) == 0
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    _, all_runs = runs()
    (parent,) = [r for r in all_runs if r.data.tags.get("sweep.role") == "parent"]
    children = children_of(all_runs, parent)
    assert sorted(int(r.data.tags["sweep.optuna_trial"]) for r in children) == [0, 1, 2]
    assert {(r.info.status, r.data.tags["ray.node_ip"]) for r in children} == {("FINISHED", "127.0.0.1")}
    assert len(all_runs) == 4  # the parent and three trainings: none begun past the budget
    assert any((out / ".jax-cache").iterdir())  # the workers shared the sweep's compilation cache


def test_a_point_asked_again_while_it_trains_counts_toward_the_budget(data, tmp_path):
    """Two trainings in flight, as --jobs 2 runs them, and Optuna asking the same point three times:
    those three trials are the budget of 3, and nothing more is asked or trained."""
    pytest.importorskip("optuna", reason="pip install -e '.[cluster]'")
    space = parse_space(["train.eta=0.05,0.5"], yaml.safe_load((data / "params.yaml").read_text()))
    sweep_run = SweepConfig(
        name="budget", space=space, search="optuna", trials=3, tracking=TrackingConfig(enabled=False)
    )
    study = studies.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "budget")
    for eta in (0.05, 0.05, 0.05, 0.5, 0.5):  # what Optuna will propose, in this order
        study.enqueue_trial({"train.eta": eta})
    paths = {"prepared": data / "prepared", "expanded": data / "expanded"}
    asking = runner._Asking(study, sweep_run, paths, tmp_path, "driver")
    pending, running, trained = asking.trials(), [], []
    while True:  # as the driver reads the trials: a new one only when one of two places is free
        while len(running) < 2 and (trial := next(pending, None)) is not None:
            running.append(trial)
        if not running:
            break
        trial = running.pop(0)
        trained.append(trial.point["train.eta"])
        asking.tell(trial, {"key": trial.key, "point": dict(trial.point), "validation_accuracy": 0.9})
    assert trained == [0.05]
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") == 3 and "RUNNING" not in states


def test_a_tie_goes_to_the_earlier_trial_and_the_summary_says_so(data):
    space = parse_space(["train.eta=0.05,0.5"], yaml.safe_load((data / "params.yaml").read_text()))
    sweep_run = SweepConfig(name="ties", space=space, tracking=TrackingConfig(enabled=False))
    results = [  # as an Optuna study holds them: in any order, numbered
        {"key": "c", "number": 3, "point": {}, "validation_accuracy": 0.985},
        {"key": "a", "number": 1, "point": {}, "validation_accuracy": 0.985},
        {"key": "b", "number": 2, "point": {}, "validation_accuracy": 0.99},
        {"key": "d", "number": 4, "point": {}, "failed": "cost diverged"},
    ]
    assert (sweep_summary(sweep_run, results)["best"]["number"], sweep_summary(sweep_run, results)["tie"]) == (2, "")
    results[2]["validation_accuracy"] = 0.985
    summary = sweep_summary(sweep_run, results)
    assert summary["best"]["number"] == 1
    assert summary["tie"] == "tie with trial 2, trial 3 at 98.50%: the earlier, trial 1, is kept"
    grid = [{**r, "number": None} for r in results[:2]]  # a grid's points: by key
    assert sweep_summary(sweep_run, grid)["tie"] == "tie with trial c at 98.50%: the earlier, trial a, is kept"


@pytest.mark.parametrize(
    "args, says",
    [
        (["-S", "train.etaa=0.1,0.2"], "train.etaa"),
        (["-S", "train.eta=0.1,abc"], "abc"),
        (["-S", "train.eta=interval(0.01, 1)"], "interval"),
        (["-S", "train.eta=0.1,0.2", "--search", "optuna"], "--trials"),
        (["-S", "train.eta=0.1,0.2", "--jobs", "0"], "--jobs 0"),
        (["-S", "train.eta=0.1,0.2", "--gpus-per-training", "1.5"], "1.5"),
        (["-S", "train.eta=0.1,0.2", "--name", "../x"], "../x"),
        (["-S", "train.eta=0.1"], "at least one"),
    ],
)
def test_bad_input_is_one_line_before_anything_is_written(data, tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    command = [sys.executable, "-m", "pipeline", "sweep", "--params", str(data / "params.yaml")]
    command += ["--prepared", str(data / "prepared"), "--out", str(tmp_path / "out"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "tracking, says",
    [({"enabled": False}, "tracking.enabled: false"), ({"registered_model": ""}, "tracking.registered_model: ''")],
)
def test_register_with_nothing_to_register_in_is_one_line_before_anything_is_written(
    data, tmp_path, capsys, tracking, says
):
    values = yaml.safe_load((data / "params.yaml").read_text())
    values["tracking"].update(tracking)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(values))
    argv = ["--params", str(params), "--prepared", str(data / "prepared"), "--out", str(tmp_path / "out")]
    assert sweep_stage.main([*argv, *GRID, "--register"]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: Got --register with {says}: nothing to register in"]
    assert not (tmp_path / "out").exists()


def test_jobs_without_ray_names_the_extra_to_install(data, tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
        "from pipeline.__main__ import main\n"
        f"sys.exit(main(['sweep', '--params', {str(data / 'params.yaml')!r}, '--prepared', {str(data / 'prepared')!r},"
        f" '--out', {str(tmp_path / 'out')!r}, '-S', 'train.eta=0.1,0.2', '-S', 'train.epochs=1', '--jobs', '2']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert (
        done.stderr.strip().splitlines()[-1]
        == 'error: running trainings side by side needs Ray: pip install -e ".[cluster]"'
    )
