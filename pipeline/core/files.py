"""Atomic file writing and pickle-free array files, shared by every stage.

Every output goes to a temporary file beside its destination and is renamed into place, so a
crash or a kill never leaves half a file where a good one is expected. The file is fsynced before
the rename and its directory after it, so after a power loss the name holds either the old file or
the whole new one, never an empty one. Outputs get the permissions the umask gives a new file
(0644 under the usual 022), not mkstemp's private 0600, so a team's group can read them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import PipelineError

CACHE_ENV = "NNDL_CACHE_DIR"


def cache_dir() -> Path:
    """This machine's cache folder for the pipeline: $NNDL_CACHE_DIR, else ~/.cache/nndl-pipeline
    ($XDG_CACHE_HOME/nndl-pipeline where that is set)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nndl-pipeline"
    return Path(os.environ.get(CACHE_ENV) or default)


class OutputError(PipelineError, OSError):
    """An output that cannot be written where it goes: a file in the way of a directory, or the reverse."""


class NpzError(PipelineError, ValueError):
    """A file that is not an .npz archive of plain arrays; a ValueError, as numpy's own refusals are."""


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask would, for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    """Flush ``path`` (a file, or a directory where the system allows opening one) to the disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.path.isdir(path):
            return  # Windows cannot open a directory; its renames need no directory fsync
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    Before the rename the file gets the umask's permissions and is fsynced; the directory is fsynced after."""
    path = Path(path)
    make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        fsync_path(tmp)
        try:
            os.replace(tmp, path)
        except IsADirectoryError as e:
            raise OutputError(f"cannot write {str(path)!r}: {e.strerror}") from None
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_dir(path: str | Path) -> None:
    """Create the directory ``path`` and its parents; OutputError naming it when a file is in the way."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise OutputError(f"cannot create the directory {str(path)!r}: {e.strerror}") from None


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
    """Load every array of an .npz file into memory, never unpickling.

    NpzError, naming the file, for anything else: a truncated archive, a lone .npy (np.load would
    return it bare), an array that would need pickle, a damaged member."""
    if not zipfile.is_zipfile(path):
        why = "not found" if not Path(path).exists() else "not an .npz file (a zip archive of arrays)"
        raise NpzError(f"{path}: {why}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise NpzError(f"{path}: cannot read the arrays ({type(e).__name__}: {e})") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
