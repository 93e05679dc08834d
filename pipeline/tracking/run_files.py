"""The files that say which MLflow run a training or a model belongs to: beside the checkpoints (the run
a resumed training continues) and beside the metrics (the run the evaluate stage continues)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.core.files import write_json
from pipeline.tracking.location import tracking_uri
from pipeline.tracking.run import Run, TrackingError

__all__ = ["RUN_FILE", "load_run_reference", "read_run_file", "remember_run", "resumable_run", "save_run_reference"]

# beside the metrics, not in the model directory (its DVC hash depends on the weights alone): the run
# evaluate continues; beside checkpoints: the run a resume continues
RUN_FILE = "mlflow_run.json"


def remember_run(checkpoint_dir: Path, run: Run, fingerprint: str) -> None:
    """Note which run trains from this checkpoint directory, so a resumed training continues it."""
    write_json(
        Path(checkpoint_dir) / RUN_FILE,
        {"run_id": run.run_id, "fingerprint": fingerprint, "tracking_uri": tracking_uri()},
    )


def resumable_run(checkpoint_dir: Path, fingerprint: str) -> str | None:
    """The run to continue: the one that trained the checkpoint with these very params, in this store."""
    saved = read_run_file(Path(checkpoint_dir) / RUN_FILE)
    if saved is None:
        return None
    same = saved.get("fingerprint") == fingerprint and saved.get("tracking_uri") == tracking_uri()
    return saved.get("run_id") if same else None


def save_run_reference(path: Path, run: Run | None) -> None:
    """Record in ``path`` which run a model belongs to (the evaluate stage continues that run).

    A file apart from the model directory: a run id inside it would give two trainings with the same
    weights different DVC hashes, and re-run every stage after them."""
    if run is not None:
        write_json(Path(path), {"run_id": run.run_id, "tracking_uri": tracking_uri()})


def load_run_reference(path: Path | None) -> str | None:
    """The run id in ``path`` (the train stage's ``mlflow_run.json``); None when there is no such file."""
    saved = read_run_file(path) if path is not None else None
    return saved.get("run_id") if saved is not None else None


def read_run_file(path: Path) -> dict[str, Any] | None:
    """A run file (``mlflow_run.json``) as a dict whose run_id, if any, is an id; None when there is none."""
    if not Path(path).is_file():
        return None
    redo = "delete it, or rerun the train stage, which writes it"
    try:
        saved = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON
        raise TrackingError(f"{path}: not valid JSON ({type(e).__name__}: {e}); {redo}") from None
    if not isinstance(saved, dict):
        raise TrackingError(f"{path}: expected an object with a run_id, got {type(saved).__name__}; {redo}")
    run_id = saved.get("run_id")
    # it goes into the store's queries and URLs: letters, digits, - and _ only, as MLflow's own ids
    if run_id is not None and not (isinstance(run_id, str) and re.fullmatch(r"[\w-]{1,128}", run_id)):
        raise TrackingError(f"{path}: run_id={run_id!r} is not an MLflow run id; {redo}")
    return saved
