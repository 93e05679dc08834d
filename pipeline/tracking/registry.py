"""The MLflow Model Registry: each evaluated model becomes a version of one registered model.

The evaluate stage registers the pyfunc model the train stage logged (artifact path ``model`` of the
run) as a new version of ``tracking.registered_model`` (by default ``<experiment>-model``), tagged
with its validation and test accuracy, the git commit that trained it and the DVC experiment's name.
The alias ``champion`` follows the version with the best **validation** accuracy: the test set only
reports, it never chooses. Then::

    mlflow models serve -m models:/<name>@champion --env-manager local --port 5001

Evaluating the same run again (only the evaluate settings changed) updates its version's tags rather
than adding a version.

``sweep --register`` and ``table --register`` register the best of many trainings
(:func:`register_best`): of the networks whose run still exists, the one with the best validation
accuracy; its pyfunc model logged first from its model folder when its run has none (the table's
trainings log none: only the registered network pays for it); the parent run tagged
``registered.*``. Of equal validation accuracies the earlier wins, here as in a table's row and a
sweep's best (:func:`earliest_best`), and the tie is said (:func:`tie_note`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.config import ConfigError
from pipeline.tracking import serving
from pipeline.tracking.config import TrackingConfig
from pipeline.tracking.run import Run, retry_locked, retry_transient

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # where the train stage logs the pyfunc model (serving.log_pyfunc)
VALIDATION_METRIC = "final_best_validation_accuracy"  # logged by the train stage
T = TypeVar("T")


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    champion: str | None  # the version the alias points at after this registration
    tie: str = ""  # register_best: the later networks of the same validation accuracy (tie_note), if any


@dataclass(frozen=True)
class Candidate:
    """One trained network of many (a sweep's trial, a table's (row, seed)) that may be registered."""

    run_id: str | None  # None: trained with tracking off, nothing to register
    model_dir: Path  # the pipeline's model folder (model.npz, architecture.json)
    validation_accuracy: float
    test_accuracy: float | None = None  # a tag of the version; never chooses
    labels: Mapping[str, Any] = field(default_factory=dict)  # tagged registered.<key> on the parent run

    @property
    def name(self) -> str:
        """The candidate in a message: "row 3 seed 2", "trial 4"."""
        return " ".join(f"{key} {value}" for key, value in self.labels.items()) or str(self.run_id)


def earliest_best(items: Sequence[T], accuracy: Callable[[T], float]) -> tuple[T | None, list[T]]:
    """The item of the highest ``accuracy``, the earliest of equals, and the later items tied with it:
    the one rule by which a table's row, a sweep and the registry choose among trainings."""
    best = max(items, key=accuracy, default=None)  # max keeps the first of equals
    if best is None:
        return None, []
    return best, [item for item in items if item is not best and accuracy(item) == accuracy(best)]


def tie_note(kept: str, tied: Sequence[str], accuracy: float, verb: str = "kept") -> str:
    """ "tie with trial 3 at 98.50%: the earlier, trial 1, is kept"; "" when nothing is tied."""
    if not tied:
        return ""
    return f"tie with {', '.join(tied)} at {100 * accuracy:.2f}%: the earlier, {kept}, is {verb}"


def require_registry(config: TrackingConfig) -> None:
    """Refuse ``--register`` before anything trains when there is no registered model to add to."""
    if not config.enabled:
        raise ConfigError("Got --register with tracking.enabled: false: nothing to register in")
    if not config.registered_model_name:
        raise ConfigError(
            f"Got --register with tracking.registered_model: {config.registered_model!r}: nothing to register in"
        )


def register_best(parent: Run, candidates: Sequence[Candidate], name: str) -> Registered | None:
    """Register, as :func:`register` does, the candidate with the best validation accuracy (ties: the
    earlier in ``candidates``) whose run still exists, logging its pyfunc model from its model folder
    first if the run has none; tag ``parent`` with what was registered. None (with a warning) when
    no candidate is left or its run cannot be registered."""
    best, tied = _best_available(parent.client, candidates)
    if best is None:
        log.warning("nothing registered: no trained network with an MLflow run (and a model) to register")
        return None
    run = Run(parent.client, best.run_id)
    if not _has_model(parent.client, best.run_id):  # logged here, once, rather than by every training
        serving.log_pyfunc(run, best.model_dir)
    registered = register(run, name, best.test_accuracy)
    if registered is not None:
        tie = tie_note(best.name, [c.name for c in tied], best.validation_accuracy, "registered")
        registered = dataclasses.replace(registered, tie=tie)
        labels = {f"registered.{key}": value for key, value in best.labels.items()}
        parent.set_tags({"registered.run_id": best.run_id, "registered.version": registered.version, **labels})
        log.info(
            "registered %s version %s (champion: version %s)%s",
            registered.name,
            registered.version,
            registered.champion,
            f"; {tie}" if tie else "",
        )
    return registered


def _best_available(client, candidates: Sequence[Candidate]) -> tuple[Candidate | None, list[Candidate]]:
    """The best by validation accuracy of those that can still be registered, and the later ones
    tied with it: a cached result may name a run of another store or a deleted one, and a model
    folder since removed matters when the run has no pyfunc model yet (another driver's trial has
    one, its folder on that machine)."""
    ranked = sorted(candidates, key=lambda c: -c.validation_accuracy)  # stable: ties keep their order
    best = next((candidate for candidate in ranked if _can_register(client, candidate)), None)
    if best is None:
        return None, []
    after = ranked[[c is best for c in ranked].index(True) + 1 :]
    same = itertools.takewhile(lambda c: c.validation_accuracy == best.validation_accuracy, after)
    return best, [c for c in same if _can_register(client, c)]


def _can_register(client, candidate: Candidate) -> bool:
    if not candidate.run_id or not _run_exists(client, candidate.run_id):
        return False
    return candidate.model_dir.is_dir() or _has_model(client, candidate.run_id)


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = retry_transient(lambda: client.get_run(run_id))
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return run.info.lifecycle_stage != "deleted"


def _has_model(client, run_id: str) -> bool:
    return any(a.path == MODEL_ARTIFACT for a in retry_transient(lambda: client.list_artifacts(run_id)))


def register(run: Run, name: str, test_accuracy: float | None) -> Registered | None:
    """Register ``run``'s model as a version of ``name``; move ``champion`` to it if its validation
    accuracy beats the champion's. None (with a warning) when the run has no trained model.
    ``test_accuracy`` None: not measured yet (a sweep's best trial), no tag."""
    client = run.client
    logged = retry_locked(lambda: client.get_run(run.run_id))
    validation = logged.data.metrics.get(VALIDATION_METRIC)
    if validation is None or not _has_model(client, run.run_id):
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
