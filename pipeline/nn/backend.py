"""The one module that knows about engines and devices (``train.engine``, ``train.device``).

Model code builds backend-free graphs with ``graph`` (below); this module compiles them:

* ``engine: jax`` (default): PyTensor's JAX linker; XLA compiles the whole graph, a scan over
  mini-batches included, into one program. ``device: gpu`` runs it on the GPU through JAX with
  CUDA (``pip install '.[gpu]'``); asking for a GPU that JAX cannot see is an error, never a
  silent fall back to the CPU.
* ``engine: c``: PyTensor's C linker (``g++`` required), CPU only. This environment's PyTensor has
  no BLAS library to link, so its dot products go through NumPy.
* ``engine: theano-pymc``: the book's own library (its last release, 1.1.2), C linker with
  OpenBLAS, CPU only. It needs numpy < 1.24 and PyTensor numpy >= 2, so it runs in a second
  virtual environment, made by ``THEANO_INSTALL`` below; ``pipeline.nn.theano_engine`` adapts it.

**One graph library per process.** ``graph`` is PyTensor where PyTensor imports (the main
environment), else theano-pymc (its own environment). The two APIs are the same but for the few
entries of :class:`Graph`; model code takes ``graph.tensor`` (``pytensor.tensor`` or
``theano.tensor``) and those entries from here and never imports either library itself.

Everything is float32 (set here, before PyTensor's JAX dispatch reads ``floatX`` on import).

Convolution: on PyTensor, one implementation for both engines, ``pipeline.nn.convolution.conv2d_valid``
(im2col from slices, then one dot). ``python -m pipeline.benchmarks.train --conv-lax`` compares it with a custom Op that
JAX lowers to ``lax.conv_general_dilated`` (``pipeline.benchmarks.conv_lax``); on 2 CPU cores the graph form
was 3-5x faster on JAX (XLA's CPU convolution is slow for these small images, the weight gradient
especially) and a NumPy ``perform`` for the C engine was slower still. theano-pymc uses its own
``conv2d`` and ``pool_2d`` (``graph.conv2d_valid``/``graph.max_pool``; see ``pipeline.nn.theano_engine``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.config import PipelineError

ENGINES = ("jax", "c", "theano-pymc")
DEVICES = ("cpu", "gpu")
# The one command that makes the theano-pymc environment (from the repository root). The package goes
# in without its dependencies: PyTensor, JAX and DVC are the main environment's, and need numpy 2.
THEANO_ENV = ".venv-theano"
THEANO_INSTALL = (
    f"python3 -m venv {THEANO_ENV} && {THEANO_ENV}/bin/pip install -r pipeline/requirements-theano.txt "
    f"&& {THEANO_ENV}/bin/pip install --no-deps -e ."
)


@dataclass(frozen=True)
class Graph:
    """What model code builds graphs with: PyTensor's or theano-pymc's versions of each entry."""

    library: str  # "pytensor" or "theano-pymc"
    tensor: Any  # the tensor module: dot, concatenate, switch, maximum, argmax, cast, ...
    shared: Callable  # shared(float32 array, name) -> a shared variable of that array's shape
    variable: Callable  # variable(name, dtype, shape) -> a symbolic input (shape: ints, None for any size)
    sigmoid: Callable
    softplus: Callable
    softmax: Callable  # of each row of a matrix
    log_softmax: Callable  # of each row of a matrix
    grad: Callable  # grad(cost, wrt list) -> list
    scan: Callable  # scan(fn, sequences=, outputs_info=, non_sequences=) -> list of outputs
    clone_replace: Callable  # clone_replace(outputs, replace dict)
    conv2d_valid: Callable | None  # the library's own convolution, where it beats the graph form; else None
    max_pool: Callable | None


def _pytensor_graph() -> Graph:
    import pytensor
    import pytensor.tensor as pt
    from pytensor.graph.replace import clone_replace

    pytensor.config.floatX = "float32"
    # Without a system BLAS the C linker warns on every compile; the fall back to NumPy is documented above.
    warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS installation")
    # JAX logs at INFO that it looked for a TPU; only its warnings concern us.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    _inner_shapes_from_types()

    def scan(fn, *, sequences, outputs_info, non_sequences):
        return pytensor.scan(
            fn,
            sequences=sequences,
            outputs_info=outputs_info,
            non_sequences=non_sequences,
            return_list=True,
            return_updates=False,
        )

    return Graph(
        library="pytensor",
        tensor=pt,
        shared=lambda value, name: pytensor.shared(value, name=name, shape=value.shape),
        variable=lambda name, dtype, shape: pt.tensor(name, dtype=dtype, shape=shape),
        sigmoid=pt.sigmoid,
        softplus=pt.softplus,
        softmax=lambda z: pt.special.softmax(z, axis=-1),
        log_softmax=lambda z: pt.special.log_softmax(z, axis=-1),
        grad=pytensor.grad,
        scan=scan,
        clone_replace=clone_replace,
        conv2d_valid=None,
        max_pool=None,
    )


def _inner_shapes_from_types() -> None:
    """Let PyTensor read the shape of an inner graph's output (a ``scan``'s or an ``OpFromGraph``'s)
    from its type when the type fixes every dimension. PyTensor's ``infer_shape`` for inner graphs
    walks the whole graph behind each output to build its shape, and its rewrites ask again each time
    they rebuild a node: for a training ``scan``, whose cost is a scalar behind the whole network, that
    walk was about a third of compiling a training (docs/engines.md). The shapes are the same
    constants the walk ends with, so the compiled graph is the same; outputs with a dimension the type
    leaves open are still walked."""
    import pytensor.compile.builders as builders
    from pytensor.scan import op as scan_op
    from pytensor.tensor.basic import constant

    walk = builders.infer_shape
    if getattr(walk, "reads_static_types", False) or scan_op.infer_shape is not walk:
        return  # done already, or a PyTensor whose scan no longer shares this function: left as it is

    def infer_shape(outs, inputs, input_shapes):
        walk = infer_shape.walk
        static = [None not in getattr(out.type, "shape", (None,)) for out in outs]
        unknown = [out for out, known in zip(outs, static) if not known]
        walked = iter(walk(unknown, inputs, input_shapes) if unknown else [])
        return [
            tuple(constant(size, dtype="int64") for size in out.type.shape) if known else next(walked)
            for out, known in zip(outs, static)
        ]

    infer_shape.reads_static_types, infer_shape.walk = True, walk
    builders.infer_shape = scan_op.infer_shape = infer_shape


def _theano_graph() -> Graph:
    from pipeline.nn import theano_engine

    return Graph(**theano_engine.graph_entries())


CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def xla_flags_with_cpu_devices(flags: str, count: int) -> str:
    """``flags`` (an $XLA_FLAGS value) with the CPU device count set to ``count``, whatever it said."""
    kept = [flag for flag in flags.split() if not flag.startswith(CPU_DEVICES_FLAG)]
    return " ".join([*kept, f"{CPU_DEVICES_FLAG}={count}"])


# XLA's copy insertion with its region analysis: without it, the CPU compiler copies each weight
# matrix that a step reads twice (forward and backward) before the step's SGD update overwrites it, a
# copy per matrix per step; with it, the same arithmetic, without those copies (docs/engines.md).
COPY_ANALYSIS_FLAG = "--xla_cpu_copy_insertion_use_region_analysis"


def _xla_cpu_flags() -> None:
    """Give JAX one CPU device per core this process may use (``pipeline.nn.data_parallel``), unless
    $XLA_FLAGS already sets the count (``--xla_force_host_platform_device_count=1`` turns it off; a
    Ray task gets one device per CPU it asks for, ``pipeline.cluster.tasks.worker_env``), and turn on
    ``COPY_ANALYSIS_FLAG`` unless $XLA_FLAGS sets it. XLA reads the flags once, when JAX starts, so
    this runs before anything here imports JAX."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_DEVICES_FLAG not in flags:
        flags = xla_flags_with_cpu_devices(flags, len(os.sched_getaffinity(0)))
    if COPY_ANALYSIS_FLAG not in flags:
        flags = f"{flags} {COPY_ANALYSIS_FLAG}=true"
    os.environ["XLA_FLAGS"] = flags


_xla_cpu_flags()

try:
    import pytensor  # noqa: F401  (only to learn which environment this is)
except ImportError as pytensor_error:
    try:
        graph = _theano_graph()
    except ImportError as e:
        raise PipelineError(
            f"neither PyTensor ({pytensor_error}) nor theano-pymc ({e}) can be imported: install the package with "
            f"pip install -e . (engines jax and c), or make the theano-pymc environment with "
            f"{THEANO_INSTALL}"
        ) from None
else:
    graph = _pytensor_graph()

DEFAULT_ENGINE = "jax" if graph.library == "pytensor" else "theano-pymc"


def engine_unavailable(engine: str) -> str | None:
    """Why ``engine`` cannot run in this environment (naming what to do instead), or None when it can."""
    if engine == "theano-pymc" and graph.library != "theano-pymc":
        return (
            f"engine theano-pymc is not installed in this environment (it needs numpy < 1.24, PyTensor needs "
            f"numpy >= 2, so it has an environment of its own). Create it once, from the repository root, with: "
            f"{THEANO_INSTALL}  (on Debian/Ubuntu first: apt-get install libopenblas-dev); then run the stage "
            f"with {THEANO_ENV}/bin/python -m pipeline train"
        )
    if engine in ("jax", "c") and graph.library != "pytensor":
        return (
            f"engine {engine} needs PyTensor, and this is the theano-pymc environment (numpy < 1.24, no "
            f"PyTensor): use train.engine: theano-pymc here, or the main environment (pip install -e .) "
            f"for jax and c"
        )
    return None


class Backend:
    """Compiles graphs (of ``graph``) for one engine on one device.

    ``function(inputs, outputs, updates)`` returns a callable that takes NumPy arrays and returns a
    list of NumPy arrays (one per output), applying ``updates`` to shared variables.
    An engine this environment cannot run is refused here, before any graph is built.
    """

    def __init__(self, engine: str | None = None, device: str = "cpu"):
        engine = DEFAULT_ENGINE if engine is None else engine
        if engine not in ENGINES:
            raise PipelineError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if device not in DEVICES:
            raise PipelineError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
        why = engine_unavailable(engine)
        if why:
            raise PipelineError(why)
        self.engine, self.device = engine, device
        self.cpu_devices = 1  # the devices a training's mini-batch can be shared among
        if engine == "jax":
            self.device_name = _select_jax_device(device)
            self.mode = "JAX"
            if device == "cpu":
                from pipeline.nn.data_parallel import cpu_devices

                self.cpu_devices = cpu_devices()
            return
        if device != "cpu":
            raise PipelineError(
                f"engine {engine} runs on the CPU only (got device {device!r}); use engine jax for a GPU"
            )
        if engine == "theano-pymc":
            from pipeline.nn import theano_engine

            self.device_name = theano_engine.device_name()
            self.mode = None
            return
        import pytensor

        if not pytensor.config.cxx or shutil.which(pytensor.config.cxx) is None:
            raise PipelineError("engine c needs a C++ compiler (g++), and PyTensor found none; use engine jax")
        self.device_name = "cpu (PyTensor C)"
        self.mode = pytensor.compile.mode.Mode(linker="cvm", optimizer="fast_run")

    @property
    def static_shapes(self) -> bool:
        """True when compiled functions need fixed input shapes (JAX: a scan's length must be static)."""
        return self.engine == "jax"

    def function(
        self, inputs: Sequence, outputs: Sequence, updates: Sequence = (), *, sharding=None
    ) -> Callable[..., list[np.ndarray]]:
        """``sharding`` (a ``pipeline.nn.data_parallel.Sharding``; JAX on the CPU): the graph is one
        device's, and the compiled function runs on the devices it names."""
        if self.engine == "theano-pymc":
            from pipeline.nn import theano_engine

            fn = theano_engine.compile_function(inputs, outputs, updates)

            def call(*args) -> list[np.ndarray]:
                return [np.asarray(out) for out in fn(*args)]

            return call
        import pytensor

        with warnings.catch_warnings():
            # JAX cannot raise from inside a compiled program, so PyTensor drops its shape asserts
            # (our shapes are static and checked when the network is built) and says so.
            warnings.filterwarnings("ignore", message="Skipping .* Op .* as JAX tracing would remove it")
            warnings.filterwarnings("ignore", message="PyTensor could not link to a BLAS installation")
            with _temporary_files_removed():
                fn = pytensor.function(
                    list(inputs),
                    list(outputs),
                    updates=list(updates),
                    mode=self.mode if sharding is None else _sharded_mode(sharding),
                    on_unused_input="ignore",
                )
            if sharding is not None:
                # PyTensor would refuse the whole mini-batches, whose shapes are not the graph's
                # (one device's share); the compiled function checks them instead
                fn.trust_input = True

        called = False

        def call(*args) -> list[np.ndarray]:
            nonlocal called
            # the first call compiles what PyTensor leaves until then (JAX traces the graph; on the C
            # engine an inner graph without C code is compiled by Numba), writing files as above
            with warnings.catch_warnings(), contextlib.nullcontext() if called else _temporary_files_removed():
                # PyTensor asks for 64-bit accumulators and indices here and there; JAX in 32-bit
                # mode keeps 32 bits and warns when it traces the graph (first call only).
                warnings.filterwarnings("ignore", message="Explicitly requested dtype (float|int)64")
                outputs = [np.asarray(out) for out in fn(*args)]
            called = True
            return outputs

        return call

    def __repr__(self) -> str:
        return f"Backend(engine={self.engine!r}, device={self.device!r}: {self.device_name})"


def _sharded_mode(sharding):
    """PyTensor's JAX mode with the compiled function run on the CPU devices as ``sharding`` says."""
    from pytensor.compile.mode import Mode, get_mode

    from pipeline.nn.data_parallel import ShardedJAXLinker

    return Mode(ShardedJAXLinker(sharding), get_mode("JAX").provided_optimizer)


@contextlib.contextmanager
def _temporary_files_removed():
    """Delete the temporary files made while compiling (and at a compiled function's first call).

    PyTensor writes the source of every Python function it generates to a temporary file that it
    never deletes (``pytensor.link.utils.compile_function_src``, so that tracebacks can show the
    lines): the JAX linker's functions, and on the C engine the Numba functions of an inner graph
    without C code, compiled at the function's first call; tens per training, thousands in ``/tmp``
    after a sweep. Meanwhile the process's temporary directory is a private one, removed afterwards.
    """
    private = tempfile.mkdtemp(prefix="nndl-compile-")
    previous = tempfile.tempdir
    tempfile.tempdir = private
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(private, ignore_errors=True)


def jax_gpus() -> list:
    """The GPUs JAX can use (none where JAX has no CUDA or the machine no NVIDIA driver)."""
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _select_jax_device(device: str) -> str:
    """Point JAX's default device at the CPU or the first GPU; refuse a GPU that is not there."""
    import jax

    if device == "gpu":
        gpus = jax_gpus()
        if not gpus:
            found = ", ".join(sorted({d.platform for d in jax.devices()}))
            raise PipelineError(
                f"device gpu was asked for, but JAX sees no GPU (it sees: {found}). Install JAX with CUDA "
                "(pip install '.[gpu]') on a machine with an NVIDIA driver, or set train.device: cpu"
            )
        target = gpus[0]
        # float32 as on the CPU (and in the book's Theano): XLA would otherwise multiply float32
        # matrices in TF32 on Ampere and later GPUs, whose 10-bit mantissa moves the gradients by ~1e-3
        jax.config.update("jax_default_matmul_precision", "highest")
    else:
        target = jax.devices("cpu")[0]
    jax.config.update("jax_default_device", target)
    return f"{target.platform}:{target.id} ({target.device_kind})"
