"""The one module that knows about engines and devices (``train.engine``, ``train.device``).

Model code builds backend-free PyTensor graphs; this module compiles them:

* ``engine: jax`` (default): PyTensor's JAX linker; XLA compiles the whole graph, a scan over
  mini-batches included, into one program. ``device: gpu`` runs it on the GPU through JAX with
  CUDA (``pip install '.[gpu]'``); asking for a GPU that JAX cannot see is an error, never a
  silent fall back to the CPU.
* ``engine: c``: PyTensor's C linker (``g++`` required), CPU only. This environment's PyTensor has
  no BLAS library to link, so its dot products go through NumPy.

Everything is float32 (set here, before PyTensor's JAX dispatch reads ``floatX`` on import).

Convolution: one implementation for both engines, ``pipeline.convolution.conv2d_valid`` (im2col
from slices, then one dot). ``python -m pipeline.bench --conv`` compares it with a custom Op that
JAX lowers to ``lax.conv_general_dilated`` (``pipeline.conv_lax``); on 2 CPU cores the graph form
was 3-5x faster on JAX (XLA's CPU convolution is slow for these small images, the weight gradient
especially) and a NumPy ``perform`` for the C engine was slower still, so no per-engine switch is needed.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from typing import Callable, Sequence

import numpy as np
import pytensor

from pipeline.config import PipelineError

pytensor.config.floatX = "float32"
# Without a system BLAS the C linker warns on every compile; the fall back to NumPy is documented above.
warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS installation")
# JAX logs at INFO that it looked for a TPU; only its warnings concern us.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

ENGINES = ("jax", "c")
DEVICES = ("cpu", "gpu")


class Backend:
    """Compiles PyTensor graphs for one engine on one device.

    ``function(inputs, outputs, updates)`` returns a callable that takes NumPy arrays and returns a
    list of NumPy arrays (one per output), applying ``updates`` to shared variables.
    """

    def __init__(self, engine: str = "jax", device: str = "cpu"):
        if engine not in ENGINES:
            raise PipelineError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if device not in DEVICES:
            raise PipelineError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
        self.engine, self.device = engine, device
        if engine == "jax":
            self.device_name = _select_jax_device(device)
            self.mode = "JAX"
        else:
            if device != "cpu":
                raise PipelineError(f"engine c runs on the CPU only (got device {device!r}); use engine jax for a GPU")
            if not pytensor.config.cxx or shutil.which(pytensor.config.cxx) is None:
                raise PipelineError("engine c needs a C++ compiler (g++), and PyTensor found none; use engine jax")
            self.device_name = "cpu (PyTensor C)"
            self.mode = pytensor.compile.mode.Mode(linker="cvm", optimizer="fast_run")

    @property
    def static_shapes(self) -> bool:
        """True when compiled functions need fixed input shapes (JAX: a scan's length must be static)."""
        return self.engine == "jax"

    def function(self, inputs: Sequence, outputs: Sequence, updates: Sequence = ()) -> Callable[..., list[np.ndarray]]:
        with warnings.catch_warnings():
            # JAX cannot raise from inside a compiled program, so PyTensor drops its shape asserts
            # (our shapes are static and checked when the network is built) and says so.
            warnings.filterwarnings("ignore", message="Skipping .* Op .* as JAX tracing would remove it")
            warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS installation")
            fn = pytensor.function(list(inputs), list(outputs), updates=list(updates), mode=self.mode,
                                   on_unused_input="ignore")

        def call(*args) -> list[np.ndarray]:
            with warnings.catch_warnings():
                # PyTensor asks for 64-bit accumulators and indices here and there; JAX in 32-bit
                # mode keeps 32 bits and warns when it traces the graph (first call only).
                warnings.filterwarnings("ignore", message="Explicitly requested dtype (float|int)64")
                return [np.asarray(out) for out in fn(*args)]

        call.pytensor_function = fn
        return call

    def __repr__(self) -> str:
        return f"Backend(engine={self.engine!r}, device={self.device!r}: {self.device_name})"


def _select_jax_device(device: str) -> str:
    """Point JAX's default device at the CPU or the first GPU; refuse a GPU that is not there."""
    import jax

    if device == "gpu":
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if not gpus:
            found = ", ".join(sorted({d.platform for d in jax.devices()}))
            raise PipelineError(
                f"device gpu was asked for, but JAX sees no GPU (it sees: {found}). Install JAX with CUDA "
                "(pip install '.[gpu]') on a machine with an NVIDIA driver, or set train.device: cpu"
            )
        target = gpus[0]
    else:
        target = jax.devices("cpu")[0]
    jax.config.update("jax_default_device", target)
    return f"{target.platform}:{target.id} ({target.device_kind})"
