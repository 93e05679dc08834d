"""The Model Registry in a real SQLite store: versions, their tags, and the champion alias."""

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.config import ConfigError
from pipeline.tracking import TrackingConfig, registry, tracked_run


def trained_run(tmp_path, validation):
    """A finished run as the train stage leaves it: a validation accuracy and a model artifact."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "MLmodel").write_text("stand-in\n")
    with tracked_run(TrackingConfig(experiment="reg")) as run:
        run.set_tags({"git.commit": "abc123"})
        run.log_metrics({"final_best_validation_accuracy": validation})
        run.log_artifacts(tmp_path / "model", "model")
    return run


def test_the_champion_follows_the_best_validation_accuracy_never_test(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_EXP_NAME", "quick-fox")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    first = trained_run(tmp_path, 0.90)
    assert registry.register(first, "digits", test_accuracy=0.80) == registry.Registered("digits", "1", "1")
    tags = client.get_model_version("digits", "1").tags
    assert tags == {
        "validation_accuracy": "0.9",
        "test_accuracy": "0.8",
        "git.commit": "abc123",
        "dvc.exp_name": "quick-fox",
    }
    # better on test, worse on validation: a new version, the champion stays
    worse = trained_run(tmp_path, 0.85)
    assert registry.register(worse, "digits", test_accuracy=0.99) == registry.Registered("digits", "2", "1")
    # equal on validation: not better, the champion stays
    assert registry.register(trained_run(tmp_path, 0.90), "digits", 0.95).champion == "1"
    better = trained_run(tmp_path, 0.95)
    assert registry.register(better, "digits", test_accuracy=0.70) == registry.Registered("digits", "4", "4")
    assert client.get_model_version_by_alias("digits", "champion").run_id == better.run_id
    # evaluating a run again updates its version, adds none
    assert registry.register(worse, "digits", test_accuracy=0.98) == registry.Registered("digits", "2", "4")
    assert client.get_model_version("digits", "2").tags["test_accuracy"] == "0.98"
    assert len(client.search_model_versions("name = 'digits'")) == 4
    assert client.get_model_version("digits", "4").source.endswith("/model")


def test_a_run_without_a_trained_model_is_not_registered(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracked_run(TrackingConfig(experiment="reg")) as run:
        pass
    assert registry.register(run, "digits", 0.9) is None
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_registered_models() == []


def test_the_registered_model_setting():
    assert TrackingConfig().registered_model_name == "nndl-chapter6-model"
    assert TrackingConfig(experiment="sweep", registered_model=None).registered_model_name == "sweep-model"
    assert TrackingConfig(registered_model="digits").registered_model_name == "digits"
    assert TrackingConfig(registered_model="").registered_model_name is None  # off
    for bad in (" digits", "a'b", "a/b"):
        with pytest.raises(ConfigError, match="tracking.registered_model"):
            TrackingConfig(registered_model=bad)


def test_the_best_of_many_is_registered_if_its_run_still_exists_and_the_parent_says_which(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    deleted = trained_run(tmp_path, 0.99)
    client.delete_run(deleted.run_id)
    with tracked_run(TrackingConfig(experiment="reg")) as no_model:  # a table's training: no pyfunc model
        no_model.log_metrics({"final_best_validation_accuracy": 0.98})
    best, tied = trained_run(tmp_path, 0.95), trained_run(tmp_path, 0.95)
    gone = tmp_path / "removed"  # a model folder since deleted
    candidates = [
        registry.Candidate(None, tmp_path / "model", 1.0),  # trained with tracking off
        registry.Candidate("0" * 32, tmp_path / "model", 0.999),  # a run of another store
        registry.Candidate(deleted.run_id, tmp_path / "model", 0.99),
        registry.Candidate(no_model.run_id, gone, 0.98),  # its pyfunc model cannot be made
        registry.Candidate(best.run_id, gone, 0.95, test_accuracy=0.5, labels={"row": "3", "seed": 2}),
        registry.Candidate(tied.run_id, gone, 0.95, labels={"row": "3", "seed": 3}),  # ties: the earlier wins
        registry.Candidate(no_model.run_id, gone, 0.95, labels={"row": "4", "seed": 1}),  # tied, but no model
    ]
    with tracked_run(TrackingConfig(experiment="reg")) as parent:
        assert registry.register_best(parent, candidates, "digits") == registry.Registered(
            "digits", "1", "1", tie="tie with row 3 seed 3 at 95.00%: the earlier, row 3 seed 2, is registered"
        )
        assert registry.register_best(parent, candidates[:5], "digits").tie == ""  # alone at 0.95
        assert registry.register_best(parent, candidates[:4], "digits") is None
    (version,) = client.search_model_versions("name = 'digits'")
    assert version.run_id == best.run_id and version.tags["test_accuracy"] == "0.5"
    tags = client.get_run(parent.run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("registered.")} == {
        "registered.run_id": best.run_id,
        "registered.version": "1",
        "registered.row": "3",
        "registered.seed": "2",
    }
