"""Atomic writes: the umask's permissions, fsync of the file before the rename and of its directory after."""

import os
import stat

import numpy as np
import pytest

from pipeline.core import files
from pipeline.core.files import atomic_path, save_npz, write_bytes, write_json

WRITERS = {
    "save_npz": lambda path: save_npz(path, a=np.arange(3, dtype=np.float32)),
    "write_json": lambda path: write_json(path, {"a": 1}),
    "write_bytes": lambda path: write_bytes(path, b"abc"),
}


@pytest.fixture
def umask():
    """Set the umask for one test; the old one comes back whatever happens."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_permissions_of_the_umask(tmp_path, umask, writer, mask, mode):
    umask(mask)
    WRITERS[writer](tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027])
def test_the_umask_is_read_without_changing_it(umask, mask):
    umask(mask)
    assert files.current_umask() == mask
    assert umask(mask) == mask


@pytest.mark.parametrize("writer", WRITERS)
def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch, writer):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "directory" if os.path.isdir(target) else os.path.basename(target)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    WRITERS[writer](tmp_path / "sub" / "out.bin")
    (fsync_file, moved, fsync_dir) = events
    assert fsync_file[0] == "fsync" and fsync_file[1].startswith(".out.bin.") and fsync_file[1].endswith(".tmp")
    assert moved == ("replace", "out.bin")
    assert fsync_dir == ("fsync", "directory")


def test_a_failed_write_leaves_nothing_and_syncs_nothing(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files.os, "fsync", synced.append)
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == [] and synced == []
