"""What a finished (row, seed) is kept by: its ``result.json``, keyed on its settings and the bytes of
its data, and stamped with the training code that made it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from pipeline.cluster.driver import RESULT_FILE
from pipeline.nn.checkpoint import training_source_hashes
from pipeline.nn.config import TrainConfig
from pipeline.table.datasets import Data, file_sha256

PROBABILITIES_FILE = "test_probabilities.npz"


# TrainConfig fields added after results of the table were first trained: keyed only when not at
# their default, so that adding a field never retrains a finished row (the train.distort_* fields).
TRAIN_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}


KEYED_WHEN_SET = ("distort_rotation", "distort_scale", "distort_alpha", "distort_sigma")


def result_key(config: TrainConfig, data: Data, test_sha: str) -> str | None:
    """What a finished result must match: its settings and the bytes of its three data sets.

    Not the code: a finished (row, seed) of a table that takes hours is kept across edits to the
    training code; its result records the code it came from (``code_version``) and the report names
    rows trained by other code than the current. Delete OUT/<row> to train a row again. (An
    unfinished one resumes only from a checkpoint of the same code: see train.fingerprint.)"""
    train_path, validation_path = data.train_path(config.dataset), data.prepared / "validation.npz"
    if not train_path.is_file() or not validation_path.is_file():
        return None
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "steps_per_call"}
    for name in KEYED_WHEN_SET:  # a field added later is left out at its default: older results still match
        if settings[name] == TRAIN_DEFAULTS[name]:
            del settings[name]
    settings.update(train=file_sha256(train_path), validation=file_sha256(validation_path), test=test_sha)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def code_version() -> str:
    """A short hash of the training code (the sources the train stage's checkpoints are keyed on)."""
    digest = hashlib.sha256()
    for source_digest in training_source_hashes().values():
        digest.update(source_digest.encode())
    return digest.hexdigest()[:12]


# Versions of the training code shown to train the same weights, bit for bit, as a later version:
# a result stamped with a key counts as trained by the value's code, and by the code that one maps to in
# turn. Each pair trained the default `dvc repro` network and quick `bn` and row-8 tables to identical
# model.npz files (docs/table.md, "Resume"). fe47bddc4df5: the code before the package was laid out in
# folders (pipeline/*.py); 51b68d4a31cc: before the summary's files moved out of nn/training.py;
# 95e6cd7a8476: before nn/training.py and nn/trainer.py were named nn/fit.py and nn/compiled.py (the same
# default `dvc repro` model.npz, run side by side on one machine); 87c5210b075d: before mini-batches over 16
# images were trained in chunks (the book's batch of 10 is not cut: a fresh clone's `dvc repro` gave the
# same model.npz); 8c40303b4b9c: before each first-layer window became one strided slice and docstrings
# were corrected (rows 1, 3 and 4 of 2026-12-07; parameters after the same steps hashed the same for
# four networks); 8c1be1e637da: before the first layer's pooling gradient was written by hand
# (`_planes_max`; rows 1, 3 and 4 of the second run of 2026-12-07; the same dvc repro model.npz, and the
# same parameters after the same steps in ten cases: six networks on JAX, two of them also on C);
# da3f412f0b6a: before that gradient took each plane by an index instead of a slice (which also works
# where the length of the rows is not known when the graph is built; the same parameters after the same
# steps); a81589862f63: before PyTensor read inner graphs' static output shapes from their types and an
# epoch ran in calls of one length (the same compiled graphs in seven cases, the same parameters after the
# same steps in the ten cases above, the same dvc repro model.npz); 85688064ad8c: before a device's share of
# a mini-batch was cut into the smallest chunks from 8 images up, not the largest (the book's batch of 10 is
# cut as before, not at all: the same parameters after 60 steps at batch 10 on 2 devices and on 1, the
# same dvc repro model.npz); 51656e753f95: before inference ran 25 batches a call (the training code is
# untouched and the probabilities are the same bit for bit, on JAX and C: the same dvc repro model.npz);
# 5c9a28edcd90: before a docstring of that inference was corrected and graph.scan returned a list on
# PyTensor too, as on theano-pymc (the same compiled programs); 8f16d0a75b36: before the backend turned on
# XLA's copy insertion with region analysis (the same arithmetic without a copy of each weight matrix per
# step: the same parameters after the same steps for rows 1, 2, 4, 6b, 7b, 7c and 8's networks and at batch
# 64, the same dvc repro model.npz); b6fe8c32c9fc: before a dense layer's weight gradient was made once
# after a device's chunks instead of summed chunk by chunk (only trainings cut into chunks, 16 images a
# device or more, change: the book's batch of 10 is not cut; the same parameters after the same steps at
# batch 10 for rows 1, 2, 4, 7b and 8's networks, the same dvc repro model.npz); 554a96713852: before the
# second layer's windows were stacked a row at a time (the same values moved in another grouping: the same
# parameters after the same steps for the conv2, conv2_relu and conv2_relu_dropout networks, the same dvc
# repro model.npz); 0119bcd783cc: before the dropout masks were drawn by one helper, layers.keep_mask (the
# same draws from the same generators); 875ff3bbdacb: before the devices' gradient sum was cpu_sum's instead
# of jax.lax.psum (on 2 devices one addition per element, the same: the same parameters after the same
# steps for the conv2, conv2_relu, conv2_relu_fc300, conv2_relu_2fc100 and conv2_relu_2fc300 networks, the
# same dvc repro model.npz) and a compiled function's first call had a private temporary directory;
# c8eb5aa6fe52: before cpu_sum's library was named by jaxlib's version rather than JAX's (the same handler);
# aef940941880: before a device spinning in cpu_sum yielded its core (the same sums, the same parameters after
# the same steps at batch 10 and 64); c0cd092b5920: before two docstrings were corrected (the same code).
SAME_WEIGHTS_AS = {
    "fe47bddc4df5": "51b68d4a31cc",
    "51b68d4a31cc": "95e6cd7a8476",
    "95e6cd7a8476": "9f4ef7883f19",
    "87c5210b075d": "eea7de590cf3",
    "2d0ff3106407": "6eb18e74947f",
    "8c40303b4b9c": "6a4b04972190",
    "8c1be1e637da": "da3f412f0b6a",
    "da3f412f0b6a": "a81589862f63",
    "a81589862f63": "85688064ad8c",
    "85688064ad8c": "52ca9a4ceb9e",
    "51656e753f95": "5c9a28edcd90",
    "5c9a28edcd90": "8f16d0a75b36",
    "8f16d0a75b36": "b6fe8c32c9fc",
    "b6fe8c32c9fc": "554a96713852",
    "554a96713852": "0119bcd783cc",
    "0119bcd783cc": "875ff3bbdacb",
    "875ff3bbdacb": "c8eb5aa6fe52",
    "c8eb5aa6fe52": "aef940941880",
    "aef940941880": "c0cd092b5920",
    "c0cd092b5920": "a85683da363e",
}


def load_result(seed_dir: Path, key: str | None, code: str) -> dict | None:
    """The finished result in ``seed_dir`` if it was made with these settings and data; its ``code``
    is re-stamped as ``code`` when its own version is known to train the same weights."""
    path = seed_dir / RESULT_FILE
    if key is None or not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("key") != key:
        return None
    if code in _same_weights_chain(result.get("code")):
        result = {**result, "code": code, "restamped_from": result["code"]}
    return result


def _same_weights_chain(version: str | None) -> list[str]:
    """The later versions ``version`` is known to train the same weights as, nearest first."""
    chain = []
    while version in SAME_WEIGHTS_AS and len(chain) < len(SAME_WEIGHTS_AS):  # bounded, should a cycle creep in
        version = SAME_WEIGHTS_AS[version]
        chain.append(version)
    return chain


def last_seed_on_disk(row_dir: Path) -> int:
    """The highest seed of a row with a result on disk (from an earlier call with more repeats), or 0."""
    seeds = [int(p.parent.name[4:]) for p in row_dir.glob(f"seed*/{RESULT_FILE}") if p.parent.name[4:].isdigit()]
    return max(seeds, default=0)
