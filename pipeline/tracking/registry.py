"""The MLflow Model Registry: each evaluated model becomes a version of one registered model.

The evaluate stage registers the pyfunc model the train stage logged (artifact path ``model`` of the
run) as a new version of ``tracking.registered_model`` (by default ``<experiment>-model``), tagged
with its validation and test accuracy, the git commit that trained it and the DVC experiment's name.
The alias ``champion`` follows the version with the best **validation** accuracy: the test set only
reports, it never chooses. Then::

    mlflow models serve -m models:/<name>@champion --env-manager local --port 5001

Evaluating the same run again (only the evaluate settings changed) updates its version's tags rather
than adding a version.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline.tracking.run import Run, retry_locked

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # where the train stage logs the pyfunc model (serving.log_pyfunc)
VALIDATION_METRIC = "final_best_validation_accuracy"  # logged by the train stage


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    champion: str | None  # the version the alias points at after this registration


def register(run: Run, name: str, test_accuracy: float | None) -> Registered | None:
    """Register ``run``'s model as a version of ``name``; move ``champion`` to it if its validation
    accuracy beats the champion's. None (with a warning) when the run has no trained model.
    ``test_accuracy`` None: not measured yet (a sweep's best trial), no tag."""
    client = run.client
    logged = retry_locked(lambda: client.get_run(run.run_id))
    validation = logged.data.metrics.get(VALIDATION_METRIC)
    if validation is None or not any(a.path == MODEL_ARTIFACT for a in client.list_artifacts(run.run_id)):
        log.warning("model not registered: run %s holds no trained pyfunc model", run.run_id)
        return None
    tags = {
        "validation_accuracy": repr(float(validation)),
        "git.commit": logged.data.tags.get("git.commit", ""),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME") or logged.data.tags.get("dvc.exp_name", ""),
    }
    if test_accuracy is not None:
        tags["test_accuracy"] = repr(float(test_accuracy))
    _ensure_registered_model(client, name)
    existing = retry_locked(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run.run_id}'"))
    if existing:
        version = existing[0].version
    else:
        source = f"{logged.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
        version = retry_locked(lambda: client.create_model_version(name, source, run_id=run.run_id, tags=tags)).version
    for key, value in tags.items():
        retry_locked(lambda k=key, v=value: client.set_model_version_tag(name, version, k, v))

    champion = _champion(client, name)
    if champion is None or str(champion.version) == str(version) or float(validation) > _validation(champion):
        retry_locked(lambda: client.set_registered_model_alias(name, CHAMPION, version))
        champion_version = str(version)
    else:
        champion_version = str(champion.version)
    return Registered(name=name, version=str(version), champion=champion_version)


def _ensure_registered_model(client, name: str) -> None:
    try:
        retry_locked(lambda: client.get_registered_model(name))
    except Exception:
        try:
            retry_locked(lambda: client.create_registered_model(name))
        except Exception as e:  # another worker created it between our two calls
            if "already exists" not in str(e).lower():
                raise


def _champion(client, name: str):
    try:
        return retry_locked(lambda: client.get_model_version_by_alias(name, CHAMPION))
    except Exception:  # no such alias yet
        return None


def _validation(version) -> float:
    try:
        return float(version.tags.get("validation_accuracy", "-inf"))
    except ValueError:
        return float("-inf")
