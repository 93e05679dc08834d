"""Checkpoints of a training, written after every epoch, and the fingerprint that says whether one
may be resumed: every train setting that changes what an epoch computes, the sha256 of both data
files and of the training code. A checkpoint with another fingerprint is ignored."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.files import load_npz, save_npz, sha256_file

if TYPE_CHECKING:
    from pipeline.nn.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_FORMAT = 1
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # pipeline/
# The code that computes a training's steps, relative to the package: a change to any of them makes a
# checkpoint unusable (and the table names the networks it trained as trained by other code).
TRAINING_SOURCES = (
    "nn/fit.py",
    "nn/config.py",
    "nn/checkpoint.py",
    "nn/compiled.py",
    "nn/network.py",
    "nn/layers.py",
    "nn/convolution.py",
    "nn/architecture.py",
    "nn/backend.py",
    "nn/data_parallel.py",
    "nn/cpu_sum.py",
    "nn/cpu_sum.cc",
    "nn/theano_engine.py",
    "nn/sgd.py",
    "data/distort.py",
)
# Keys that do not change what any single epoch computes, so a checkpoint survives a change to them
# (steps_per_call only groups the same steps into calls: the weights come out bit for bit the same).
NOT_FINGERPRINTED = ("epochs", "early_stopping_patience", "steps_per_call")


def fingerprint(config: TrainConfig, train_path: Path, validation_path: Path) -> str:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_FINGERPRINTED}
    settings.update(format=CHECKPOINT_FORMAT, train=sha256_file(train_path), validation=sha256_file(validation_path))
    # the code that computes each step: DVC re-runs the stage when it changes, and a resume must not
    # then continue weights that the old code produced
    settings.update({f"source:{name}": digest for name, digest in training_source_hashes().items()})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def training_source_hashes() -> dict[str, str]:
    """The sha256 of each file of the training code (``TRAINING_SOURCES``), in that order."""
    return {name: sha256_file(PACKAGE_DIR / name) for name in TRAINING_SOURCES}


def save_checkpoint(path: Path, state: dict, params: list, best: list | None, velocities: list) -> None:
    arrays = {f"param{i}": v for i, v in enumerate(params)}
    arrays.update({f"best{i}": v for i, v in enumerate(best or [])})
    arrays.update({f"velocity{i}": v for i, v in enumerate(velocities)})
    save_npz(path, __state__=np.array(json.dumps(state)), **arrays)


def load_checkpoint(path: Path, expected_fingerprint: str, epochs: int):
    """(state, params, best, velocities) from a matching checkpoint, or None."""
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        state = json.loads(str(arrays.pop("__state__")))
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable checkpoint %s (%s); starting afresh", path, e)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        log.info(
            "ignoring checkpoint %s: it was made with other train params, data or training code; starting afresh", path
        )
        return None
    if state["epochs_done"] > epochs:
        log.info(
            "ignoring checkpoint %s: it is at epoch %d, beyond train.epochs=%d", path, state["epochs_done"], epochs
        )
        return None

    def group(prefix):
        return [arrays[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) for k in arrays))]

    return state, group("param"), group("best") or None, group("velocity")
