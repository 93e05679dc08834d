"""Atomic file writing and pickle-free array files, shared by every stage.

Every output goes to a temporary file beside its destination and is renamed into place, so a
crash or a kill never leaves half a file where a good one is expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Save arrays uncompressed (fast to load) without pickle; refuses object arrays."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which would need pickle")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an .npz file into memory, never unpickling."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
