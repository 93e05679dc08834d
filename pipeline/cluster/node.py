"""What runs on a worker node around one training: its data from the shared storage, its checkpoints
kept there after every epoch, and its outputs sent back to the driver.

On one machine (``--jobs N``) a training reads and writes the driver's own folders and none of this
is needed: ``Shipment`` is None there.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.cluster.storage import DataRef, SharedStorage, clear
from pipeline.core.files import cache_dir, write_bytes
from pipeline.nn.checkpoint import CHECKPOINT_FILE
from pipeline.nn.compile_cache import jax_compilation_cache
from pipeline.tracking import RUN_FILE

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # a training's folder of its checkpoint and run reference, locally and in the storage
DATA = "data"
TASK_TAG = "cluster.task"  # on a training's MLflow run: the training's key, as in the storage


@dataclass(frozen=True)
class Shipment:
    """One training's files as a node with none of the driver's gets them."""

    storage: SharedStorage
    key: str  # the training's folder: checkpoints/<key>/ in the storage, work/<key>/ on the node
    inputs: Mapping[str, DataRef]  # a relative name (prepared/train.npz) -> its content

    @property
    def checkpoint_key(self) -> str:
        return f"{CHECKPOINTS}/{self.key}"


@dataclass(frozen=True)
class NodeWork:
    """A training's folder on its node: ``data/`` (links into the node's cache), ``checkpoints/``
    (restored from the storage), and the outputs the training writes beside them."""

    shipment: Shipment
    folder: Path

    @property
    def data(self) -> Path:
        return self.folder / DATA

    def save_checkpoints(self) -> None:
        """The checkpoint folder to the storage: another node resumes from it if this one dies."""
        self.shipment.storage.save_folder(self.folder / CHECKPOINTS, self.shipment.checkpoint_key)

    def outputs(self) -> dict[str, bytes]:
        """Every file the training wrote (not its data or checkpoints), by path relative to the folder."""
        skip = (self.folder / DATA, self.folder / CHECKPOINTS)
        return {
            str(path.relative_to(self.folder)): path.read_bytes()
            for path in sorted(self.folder.rglob("*"))
            if path.is_file() and not any(parent in skip for parent in path.parents)
        }


@contextlib.contextmanager
def on_node(shipment: Shipment) -> Iterator[NodeWork]:
    """The training's folder on this node, with its data and its last checkpoint in place; deleted
    afterwards (the storage keeps the checkpoints until the driver has the outputs)."""
    cache = cache_dir()
    work = NodeWork(shipment, cache / "work" / shipment.key)
    clear(work.folder)  # an earlier try on this node: the storage's checkpoint is the newer truth
    for name, ref in shipment.inputs.items():
        link = work.data / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(shipment.storage.fetch(ref, cache))
    restored = shipment.storage.restore_folder(
        shipment.checkpoint_key, work.folder / CHECKPOINTS, (CHECKPOINT_FILE, RUN_FILE)
    )
    if restored:
        log.info("training %s: restored %s from %s", shipment.key, ", ".join(restored), shipment.storage.url)
    try:
        with jax_compilation_cache(cache / "jax"):
            yield work
    finally:
        clear(work.folder)


def node_tags() -> dict[str, str]:
    """The Ray node running this task, for its MLflow run (empty outside Ray)."""
    ray = sys.modules.get("ray")  # not imported here: importing Ray fixes its idea of this machine's address
    if ray is None or not ray.is_initialized():
        return {}
    return {"ray.node_ip": ray.util.get_node_ip_address(), "ray.node_id": ray.get_runtime_context().get_node_id()}


def write_outputs(folder: Path, files: Mapping[str, bytes], last: str) -> None:
    """A node's outputs into the driver's ``folder``, each atomically, ``last`` after all others
    (its presence says the rest is complete)."""
    for name in sorted(files, key=lambda n: n == last):
        write_bytes(folder / name, files[name])
