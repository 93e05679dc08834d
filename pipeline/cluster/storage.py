"""The cluster's shared storage: data sets by content hash and the trainings' checkpoints, where every
node can read them.

A worker node has none of the driver's files. The storage is the team's DVC remote (docs/team.md:
``deploy/stack.py dvc-remote``), any S3 bucket, or a folder every node mounts. Data sets are kept in
DVC's own layout, ``files/md5/ab/cdef...``, so a file that ``dvc push`` uploaded is found there and not
sent again (and ``dvc pull`` finds what the driver sent); a node copies each file once into its cache
(``NNDL_CACHE_DIR``) and checks its md5 before use. Ray's object store could carry the data instead,
but it lives in memory, is capped per node, and is emptied when the driver stops; the remote is
already where the team's data are versioned, and a node's cache survives between calls.
Checkpoints live under ``checkpoints/<training key>/``: after a node dies, another one resumes the
training from there.

S3 credentials come from the environment (AWS_ACCESS_KEY_ID, ...), or from the DVC remote's
``.dvc/config.local``; they never enter this module's objects, which travel with each task.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from pipeline.core.config import PipelineError
from pipeline.core.files import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataRef:
    """A data file by content: its md5 (DVC's hash), size and a name for messages."""

    md5: str
    size: int
    name: str

    @property
    def key(self) -> str:
        return f"files/md5/{self.md5[:2]}/{self.md5[2:]}"


@dataclass(frozen=True)
class SharedStorage:
    """``url``: s3://bucket/prefix or a folder path; ``endpoint_url``: a non-AWS S3 API's address."""

    url: str
    endpoint_url: str | None = None

    def __post_init__(self):
        if "://" in self.url and not self.url.startswith(("s3://", "file://")):
            raise PipelineError(f"Got storage {self.url!r}: use s3://bucket/prefix or a folder every node mounts")

    def _fs(self):
        import fsspec

        if self.url.startswith("s3://"):
            try:
                return fsspec.filesystem("s3", endpoint_url=self.endpoint_url)
            except ImportError:
                raise PipelineError(f"storage {self.url} needs s3fs: pip install 'dvc[s3]'") from None
        return fsspec.filesystem("file")

    def _path(self, key: str) -> str:
        root = self.url.removeprefix("file://").removeprefix("s3://").rstrip("/")
        return f"{root}/{key}"

    def exists(self, key: str) -> bool:
        return self._fs().exists(self._path(key))

    def put(self, local: Path, key: str) -> None:
        fs = self._fs()
        if not self.url.startswith("s3://"):
            fs.makedirs(os.path.dirname(self._path(key)), exist_ok=True)
        fs.put_file(str(local), self._path(key))

    def get(self, key: str, local: Path) -> bool:
        """Copy ``key`` to ``local`` (atomically); False when the storage has no such file."""
        fs = self._fs()
        try:
            with atomic_path(local) as tmp:
                fs.get_file(self._path(key), str(tmp))
        except FileNotFoundError:
            return False
        return True

    def delete(self, prefix: str) -> None:
        fs = self._fs()
        if fs.exists(self._path(prefix)):
            fs.rm(self._path(prefix), recursive=True)

    # -- data sets, by md5 ---------------------------------------------------------------------------
    def publish(self, path: Path) -> DataRef:
        """Upload ``path`` unless the storage has its content already; returns its reference."""
        ref = DataRef(md5_file(path), path.stat().st_size, str(path))
        if not self.exists(ref.key):
            log.info("sending %s (%.1f MB) to %s", path, ref.size / 1e6, self.url)
            self.put(path, ref.key)
        return ref

    def publish_each(self, files: Mapping[str, Path], sent: dict[Path, DataRef]) -> dict[str, DataRef]:
        """``files`` (a name -> its path) published, each path once for all calls that share ``sent``."""
        for path in files.values():
            if path not in sent:
                sent[path] = self.publish(path)
        return {name: sent[path] for name, path in files.items()}

    def fetch(self, ref: DataRef, cache: Path) -> Path:
        """The node's copy of ``ref``: from the cache, or copied from the storage and checked once."""
        target = cache / ref.key
        with FileLock(str(target) + ".lock"):  # several trainings on one node want the same file
            if target.is_file() and target.stat().st_size == ref.size:
                return target
            if not self.get(ref.key, target):
                raise PipelineError(f"{ref.name} (md5 {ref.md5}) is not in the shared storage {self.url}")
            if md5_file(target) != ref.md5:
                target.unlink()
                raise PipelineError(f"{ref.name}: the copy from {self.url} does not have md5 {ref.md5}")
        return target

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_folder(self, local: Path, key: str) -> None:
        """Every file of ``local`` (flat) to ``key/``; each file replaces its old copy whole."""
        for path in sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith(".")):
            self.put(path, f"{key}/{path.name}")

    def restore_folder(self, key: str, local: Path, names: tuple[str, ...]) -> list[str]:
        """The files ``names`` of ``key/`` that exist, copied into ``local``; returns those copied."""
        return [name for name in names if self.get(f"{key}/{name}", local / name)]


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_remote(root: Path = Path(".")) -> tuple[SharedStorage, dict[str, str]]:
    """The DVC repository's default remote as shared storage, and the S3 credentials its config
    holds (as AWS_* variables, for the workers' environment)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            config = repo.config
    except NotDvcRepoError:
        raise PipelineError(f"{root.resolve()} is not a DVC repository: pass --storage") from None
    name = config["core"].get("remote")
    if not name:
        raise PipelineError(
            "a cluster needs shared storage for its data and checkpoints: set a default DVC remote "
            "(deploy/stack.py dvc-remote, or dvc remote add -d) or pass --storage s3://bucket/prefix"
        )
    remote = config["remote"][name]
    env = {
        var: remote[key]
        for key, var in (("access_key_id", "AWS_ACCESS_KEY_ID"), ("secret_access_key", "AWS_SECRET_ACCESS_KEY"))
        if remote.get(key)
    }
    url = remote["url"]
    if "://" not in url:  # a local remote, relative to .dvc/
        url = str((root / ".dvc" / url).resolve()) if not os.path.isabs(url) else url
    return SharedStorage(url, remote.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL")), env


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
