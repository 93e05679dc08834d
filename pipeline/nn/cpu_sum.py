"""The sum over the CPU devices that each data-parallel training step makes, as an XLA FFI handler.

``jax.lax.psum`` on XLA's CPU devices puts a device that arrives first to sleep at once, and on a
machine whose idle cores halt, waking it costs a large part of a small step (docs/engines.md, "The
devices meet by spinning"). ``cpu_sum.cc`` makes the same sum with a device that arrives first
spinning for up to ``SPIN_US`` microseconds before it sleeps, yielding its core as it spins (so
that trainings sharing the cores lose nothing to it). With 2 devices its sums are XLA's bit
for bit (one addition per element); with more, each element is added in the order of the devices.

The handler is compiled once per machine with the C++ compiler $CXX names (else ``g++``, else
``c++``) against jaxlib's FFI headers, and kept in the pipeline's cache folder
(``pipeline.core.files.cache_dir``) under a name made from its source, jaxlib's version and the
compiler. Where it cannot be built (no compiler, a jaxlib without FFI headers) the training uses
``jax.lax.psum`` and says so once. ``$NNDL_DEVICE_SUM=xla`` chooses ``jax.lax.psum`` in any case.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pipeline.core.config import PipelineError
from pipeline.core.files import atomic_path, cache_dir

__all__ = ["CHOICE_ENV", "LIMIT_S", "SOURCE", "SPIN_US", "cpu_sum", "library", "spin_sum_chosen"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_sum.cc")
TARGET = "nndl_cpu_sum"
CHOICE_ENV = "NNDL_DEVICE_SUM"
CHOICES = ("spin", "xla")
# Long enough for the wait at a meeting of a step (measured: a few to a few tens of microseconds at
# batch 10), short enough that a device sharing its core with another process gives it up soon.
SPIN_US = 100
# A device that waits this long for the others gives up with an error instead of hanging.
LIMIT_S = 300.0
FALLBACK = "the devices' sums use jax.lax.psum, slower at small batches (docs/engines.md)"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), compiler.encode(), platform.machine().encode()):
        key.update(hashlib.sha256(part).digest())
    return cache_dir() / "xla-ffi" / f"cpu_sum-{key.hexdigest()[:16]}.so"


def _build(compiler: str, path: Path) -> None:
    include = jax.ffi.include_dir()
    with atomic_path(path) as tmp:
        command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}", str(SOURCE), "-o", str(tmp)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise OSError(f"{compiler} exited with status {done.returncode}: {done.stderr.strip()[-300:]}")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled handler, built if this machine's cache has none, and registered with XLA; None
    (logged once) where it cannot be built or loaded."""
    compiler = _compiler()
    if compiler is None or shutil.which(compiler) is None:
        log.warning("no C++ compiler (g++) to build %s: %s", SOURCE.name, FALLBACK)
        return None
    path = _library_path(compiler)
    try:
        if not path.is_file():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NndlCpuSum), platform="cpu")
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        log.warning("cannot build or load %s (%s): %s", path, e, FALLBACK)
        return None
    return lib


def spin_sum_chosen() -> bool:
    """Whether the devices' sums spin (``cpu_sum``): unless $NNDL_DEVICE_SUM says ``xla``, and where the
    handler can be built."""
    choice = os.environ.get(CHOICE_ENV, "spin")
    if choice not in CHOICES:
        raise PipelineError(f"{CHOICE_ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice == "spin" and library() is not None


def cpu_sum(x, axis: str, *, spin_us: int = SPIN_US, limit_s: float = LIMIT_S, devices: int | None = None):
    """The sum of the float32 array ``x`` over the devices of the ``shard_map`` mesh axis ``axis``
    (``library()`` must have registered the handler). ``devices`` stands in for the axis size only in
    tests of a meeting that never completes."""
    devices = jax.lax.axis_size(axis) if devices is None else devices
    rank = jax.lax.axis_index(axis).astype(jnp.int32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype), has_side_effect=True)
    return call(x, rank, devices=np.int64(devices), spin_us=np.int64(spin_us), limit_s=np.float64(limit_s))
