"""The train and evaluate stages together, tracked in a real MLflow SQLite store."""

import csv
import json
import warnings

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.core.config import ConfigError, PipelineError
from pipeline.core.files import load_npz
from pipeline.evaluation.evaluate import EvaluateConfig, shifted_probabilities
from pipeline.nn.architecture import build, resolve
from pipeline.nn.fit import TrainingDiverged
from pipeline.nn.model_io import load_model, save_model
from pipeline.tracking.tracked import train_tracked

from reference import np_shift
from synthetic import TINY_NET, stage_evaluation_in, stage_training_in, write_prepared


@pytest.fixture
def project(tmp_path, monkeypatch, migrated_store):
    """A repository-like directory: runs go to <project>/mlflow.db, as by default."""
    (tmp_path / ".dvc").mkdir()
    migrated_store(tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    write_prepared(tmp_path / "data" / "prepared")
    return tmp_path


def params(**train):
    settings = {"architecture": TINY_NET, "epochs": 2, "eta": 0.5, "lmbda": 0.0, "seed": 3, "steps_per_call": 20}
    settings.update(train)
    return {"prepare": {"train_size": 600}, "train": settings, "tracking": {"experiment": "tests"}}


def train_in(project, **train):
    return train_tracked(stage_training_in(params(**train), project / "data/prepared", project / "data"))


def client(project):
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def test_train_and_evaluate_log_one_complete_run(project):
    summary = train_in(project)
    metrics = stage_evaluation_in(
        project / "data", EvaluateConfig(gallery_size=5), tracking.TrackingConfig(experiment="tests")
    )

    # the evaluation files agree with an independent count from the labels and the CSV
    test = load_npz(project / "data/prepared/test.npz")
    with open(project / "data/evaluate/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    actual = np.array([int(r["actual"]) for r in rows])
    predicted = np.array([int(r["predicted"]) for r in rows])
    np.testing.assert_array_equal(actual, test["labels"])
    np.testing.assert_array_equal(predicted, load_model(project / "data/model").predict(test["images"]))
    assert metrics["test_accuracy"] == pytest.approx(np.mean(actual == predicted))
    assert metrics["test_accuracy"] > 0.8  # chance is 0.1
    for digit in range(10):
        mine = actual == digit
        assert metrics["per_class_accuracy"][str(digit)] == pytest.approx(np.mean(predicted[mine] == digit))
    # evaluate.json: the one number of dvc exp show; the accuracy per digit beside the plots
    assert json.loads((project / "data/metrics/evaluate.json").read_text()) == {
        "test_accuracy": metrics["test_accuracy"]
    }
    assert (
        json.loads((project / "data/evaluate" / "per_class_accuracy.json").read_text()) == metrics["per_class_accuracy"]
    )
    for name in ("confusion.png", "misclassified.png"):
        assert (project / "data/evaluate" / name).read_bytes()[:4] == b"\x89PNG"

    # one run holds params, per-epoch metrics, test accuracy, tags and artifacts
    mlflow_client = client(project)
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.eta"] == "0.5" and run.data.params["prepare.train_size"] == "600"
    assert json.loads(run.data.params["architecture.resolved"])[0]["n_out"] == 30
    history = mlflow_client.get_metric_history(run.info.run_id, "validation_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == [row["validation_accuracy"] for row in summary["history"]]
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert run.data.metrics["final_best_validation_accuracy"] == summary["best_validation_accuracy"]
    assert run.data.tags["engine"] == "jax" and run.data.tags["preset"] == "custom"
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"model", "model_files", "metrics", "evaluation"} <= artifacts
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"mnist-prepared-train", "mnist-validation"}

    # evaluate settings are tags: changing one re-runs evaluate alone, on the same run (MLflow params are immutable)
    assert run.data.tags["evaluate.gallery_size"] == "5" and "evaluate.gallery_size" not in run.data.params
    stage_evaluation_in(project / "data", EvaluateConfig(gallery_size=7), tracking.TrackingConfig(experiment="tests"))
    again = mlflow_client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED" and again.data.tags["evaluate.gallery_size"] == "7"

    # registered as <experiment>-model, the champion (evaluating the run again adds no version)
    champion = mlflow_client.get_model_version_by_alias("tests-model", "champion")
    assert str(champion.version) == "1" and champion.run_id == run.info.run_id
    assert [str(v.version) for v in mlflow_client.search_model_versions("name = 'tests-model'")] == ["1"]
    assert float(champion.tags["validation_accuracy"]) == run.data.metrics["final_best_validation_accuracy"]
    assert float(champion.tags["test_accuracy"]) == metrics["test_accuracy"]

    # the champion's pyfunc model (the run's), loaded back through MLflow (no pickle) as
    # `mlflow models serve -m models:/tests-model@champion` does, predicts what the pipeline predicts
    pyfunc = mlflow.pyfunc.load_model("models:/tests-model@champion")
    out = pyfunc.predict(test["images"][:50].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out["label"]), predicted[:50])
    assert np.asarray(out["probabilities"]).shape == (50, 10)


def test_a_diverged_training_is_marked_failed(project):
    with pytest.raises(TrainingDiverged):
        train_in(
            project,
            eta=1e30,
            architecture=[
                {"type": "fully_connected", "n_in": 784, "n_out": 30, "activation": "linear"},
                {"type": "softmax", "n_in": 30, "n_out": 10},
            ],
        )
    mlflow_client = client(project)
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert "NaN" in run.data.tags["failure_reason"]


def test_resumed_training_continues_the_same_run(project):
    """A training stopped after epoch 1 and started again adds to its own run, not a new one."""
    train_in(project, epochs=1)
    first = client(project).search_runs([client(project).get_experiment_by_name("tests").experiment_id])
    # the same params again: the checkpoint is complete, the run is reopened rather than duplicated
    train_in(project, epochs=1)
    runs = client(project).search_runs([client(project).get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [first[0].info.run_id]
    assert runs[0].info.status == "FINISHED"


def test_a_tracked_run_and_loading_its_model_raise_no_mlflow_warnings(project):
    # warnings that every `dvc repro` printed until MLflow's dataset-source and type-hint quirks were handled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_in(project, epochs=1)
        (run,) = client(project).search_runs([client(project).get_experiment_by_name("tests").experiment_id])
        mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    # DeprecationWarnings (SQLAlchemy's, inside MLflow's store) are hidden from users by default
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    from_mlflow = [f"{w.category.__name__}: {w.message}" for w in shown if "mlflow" in w.filename]
    assert from_mlflow == []


class WherePixel:
    """A stand-in network that answers from where an image's one lit pixel is: half its probability
    on (row mod 10), half on (column mod 10); a blank image (the pixel shifted out) gets 0.1 each."""

    def predict_proba(self, images):
        images = np.asarray(images).reshape(len(images), 28, 28)
        out = np.full((len(images), 10), 0.1)
        for i, image in enumerate(images):
            lit = np.argwhere(image)
            if len(lit):
                ((row, col),) = lit
                out[i] = 0
                out[i, row % 10] += 0.5
                out[i, col % 10] += 0.5
        return out


def test_test_time_shifts_average_the_image_and_its_four_one_pixel_shifts():
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 5, 7] = 255  # views at rows 5, 6, 4, 5, 5 and columns 7, 7, 7, 8, 6
    images[1, 0, 3] = 255  # its up-shift is blank; the others at rows 0, 1, 0, 0 and columns 3, 3, 4, 2
    expected = np.array(
        [
            # digits:  0     1     2     3     4     5     6     7     8     9
            [0.00, 0.00, 0.00, 0.00, 0.10, 0.30, 0.20, 0.30, 0.10, 0.00],  # 6 is a row and a column
            [0.32, 0.12, 0.12, 0.22, 0.12, 0.02, 0.02, 0.02, 0.02, 0.02],  # the blank view adds 0.1 / 5 to each
        ]
    )
    np.testing.assert_allclose(shifted_probabilities(WherePixel(), images, 1), expected, atol=1e-6)
    np.testing.assert_allclose(shifted_probabilities(WherePixel(), images.reshape(2, 784), 1), expected, atol=1e-6)
    np.testing.assert_allclose(shifted_probabilities(WherePixel(), images, 0), WherePixel().predict_proba(images))
    with pytest.raises(PipelineError, match="Got test_time_shifts=14: must be 0..13 pixels"):
        shifted_probabilities(WherePixel(), images, 14)


def test_bad_test_time_shifts_are_named():
    for bad in (-1, 14):
        with pytest.raises(ConfigError, match=f"Got evaluate.test_time_shifts={bad}: must be 0..13 pixels"):
            EvaluateConfig(test_time_shifts=bad)


def test_evaluate_with_test_time_shifts_answers_from_five_views(project):
    # random weights: a trained network is so sure of the synthetic digits that no shift changes an answer
    network = build(resolve(TINY_NET), rng=np.random.default_rng(0))
    rng = np.random.default_rng(99)
    save_model(
        project / "data/model", network, [rng.normal(0, 0.3, v.shape).astype(np.float32) for v in network.get_values()]
    )
    metrics = stage_evaluation_in(project / "data", EvaluateConfig(gallery_size=5, test_time_shifts=1))

    test, model = load_npz(project / "data/prepared/test.npz"), load_model(project / "data/model")
    views = [test["images"], *(np_shift(test["images"], dy, dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)))]
    expected = np.mean([model.predict_proba(v) for v in views], axis=0).argmax(axis=1)
    assert np.sum(expected != model.predict(test["images"])) > 0  # the views change some answers
    with open(project / "data/evaluate/predictions.csv") as f:
        predicted = np.array([int(r["predicted"]) for r in csv.DictReader(f)])
    np.testing.assert_array_equal(predicted, expected)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(expected == test["labels"]))
    assert metrics["test_time_shifts"] == 1


def test_registering_can_be_turned_off(project):
    train_in(project, epochs=1)
    stage_evaluation_in(
        project / "data",
        EvaluateConfig(gallery_size=2),
        tracking.TrackingConfig(experiment="tests", registered_model=""),
    )
    assert client(project).search_registered_models() == []


@pytest.mark.parametrize("on", [True, False])
def test_training_runs_log_system_metrics_unless_turned_off(project, monkeypatch, on):
    # MLflow's seconds between samples, far longer than this training: its only, unfinished interval counts
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "600")
    settings = params(epochs=2)
    settings["tracking"]["system_metrics"] = on
    summary = train_tracked(stage_training_in(settings, project / "data/prepared", project / "data"))
    logged = client(project).get_run(summary["run_id"]).data.metrics
    system = {name for name in logged if name.startswith("system/")}
    if on:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, logged
    else:
        assert system == set()


def test_the_model_directory_holds_no_run_id(project):
    """Two trainings with the same weights give the same model files, so the same DVC hash; each run's
    id is in data/metrics/mlflow_run.json, apart from the model."""
    runs = []
    for name in ("a", "b"):
        summary = train_tracked(stage_training_in(params(epochs=1), project / "data/prepared", project / name))
        runs.append(summary["run_id"])
        assert json.loads((project / name / "metrics" / "mlflow_run.json").read_text())["run_id"] == summary["run_id"]
    assert runs[0] != runs[1]

    def contents(directory):
        return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    first, second = contents(project / "a" / "model"), contents(project / "b" / "model")
    assert sorted(map(str, first)) == ["architecture.json", "model.npz"]
    assert first == second
