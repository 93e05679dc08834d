"""What a run is tagged and parameterised with: params.yaml flattened, the git commit, the DVC experiment."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from typing import Any

__all__ = ["flatten", "source_tags"]


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'eta': 0.1}} -> {'train.eta': '0.1'}; lists become JSON (MLflow params are strings)."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """Git commit and dirtiness of the working copy; DVC experiment name and baseline when set."""
    tags = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags
