"""The theano-pymc engine (``train.engine: theano-pymc``): the book's own library, CPU only.

Imported by ``pipeline.nn.backend`` only, and only in an environment without PyTensor: theano-pymc
1.1.2 (its last release) needs numpy < 1.24 and PyTensor needs numpy >= 2, so it lives in a second
virtual environment (``pipeline/requirements-theano.txt``; the command is ``backend.THEANO_INSTALL``).

The graph API is PyTensor's ancestor, so the model code runs unchanged on ``pipeline.nn.backend.graph``;
the few differences are absorbed here:

* Theano's types carry no static shapes (only broadcastable flags), so inputs and shared variables
  are plain N-d tensors, and nothing is marked broadcastable: a size-1 axis (a one-channel filter
  bank) must keep the same type through the scan over mini-batches;
* softmax and log-softmax are ``tensor.nnet``'s row-wise ops, scan returns ``(outputs, updates)``;
* convolution and pooling use Theano's own ``conv2d`` (CorrMM: im2col in C, then an OpenBLAS GEMM)
  and ``pool_2d``. Measured on the 2-core machine, training the book's two-conv ReLU network (images/s;
  the im2col/reshape graph forms of ``pipeline.nn.convolution`` written out with explicit shapes):

  ==============================  ==========  ==========
  convolution / pooling           batch 10    batch 64
  ==============================  ==========  ==========
  conv2d / pool_2d (used)         3,086       2,577
  conv2d / graph max              1,929       877
  graph im2col / pool_2d          1,000       1,122
  graph im2col / graph max        932         2,055
  ==============================  ==========  ==========

* scan's Cython loop does not build on Python 3.11, so its loop runs in Python (see below).

Theano flags: ``floatX=float32`` and, when the linker can find ``libopenblas.so`` (Debian's
``libopenblas-dev``), ``blas__ldflags=-lopenblas``; without it Theano falls back to NumPy's dot
(slower, and it says so). ``THEANO_FLAGS`` set by the user are kept and win.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

log = logging.getLogger(__name__)


def _openblas_linkable() -> bool:
    """True when ``-lopenblas`` links: libopenblas-dev's ``libopenblas.so`` is in the linker cache."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return False
    return any(line.split()[:1] == ["libopenblas.so"] for line in listing.splitlines())


def _set_flags() -> None:
    """Our defaults before ``import theano`` reads ``THEANO_FLAGS``; the user's own flags come last and win."""
    user = os.environ.get("THEANO_FLAGS", "")
    ours = ["floatX=float32"]
    if "blas__ldflags" not in user and "blas.ldflags" not in user:
        if _openblas_linkable():
            ours.append("blas__ldflags=-lopenblas")
        else:
            log.warning(
                "libopenblas.so not found (apt-get install libopenblas-dev): theano-pymc's dot products "
                "fall back to NumPy and training is slower"
            )
    os.environ["THEANO_FLAGS"] = ",".join(ours + ([user] if user else []))


_set_flags()
# theano-pymc calls NumPy aliases deprecated since 1.20 (np.complex, np.bool) while building graphs
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"theano(\.|$)")
# Scan's compiled inner loop is C that Cython 0.29.21 generated for Python <= 3.10: it does not compile
# on 3.11 (PyCode_New changed, longintrepr.h moved). A failed import of it makes Theano run scan's loop
# in Python (``Scan.perform``), which calls the compiled step function K times per call.
sys.modules.setdefault("theano.scan.scan_perform_ext", None)
import theano  # noqa: E402  (after the flags and the scan module above)
import theano.tensor as T  # noqa: E402
from theano.tensor.signal.pool import pool_2d  # noqa: E402


def variable(name: str, dtype: str, shape) -> T.TensorVariable:
    """A symbolic input with ``len(shape)`` axes (Theano has no static sizes; none is broadcastable)."""
    return T.TensorType(dtype, (False,) * len(shape))(name)


def shared(value, name: str):
    return theano.shared(value, name=name)


def softmax(z):
    return T.nnet.softmax(z)  # row-wise on a matrix (N, classes)


def log_softmax(z):
    return T.nnet.logsoftmax(z)


def scan(fn, *, sequences, outputs_info, non_sequences) -> list:
    outputs, _ = theano.scan(
        fn, sequences=sequences, outputs_info=outputs_info, non_sequences=non_sequences, return_list=True
    )
    return outputs


def clone_replace(outputs, replace):
    return theano.clone(outputs, replace=replace)


def conv2d_valid(x, w):
    """Valid cross-correlation with Theano's conv2d: x (N, H, W, C), w (kh, kw, C, F) -> (N, H-kh+1, W-kw+1, F).

    Theano works channels-first: the layouts are transposed in and out (the optimizer cancels a
    transpose out followed by the pooling's transpose in). ``filter_flip=False``: a cross-correlation,
    as the graph form, so the same weights give the same outputs on every engine.
    """
    y = T.nnet.conv2d(x.dimshuffle(0, 3, 1, 2), w.dimshuffle(3, 2, 0, 1), filter_flip=False)  # (N, F, H', W')
    return y.dimshuffle(0, 2, 3, 1)


def max_pool(x, size: int):
    """Theano's pool_2d, ignore_border=True as the book: x (N, H, W, C) -> (N, H//size, W//size, C)."""
    y = pool_2d(x.dimshuffle(0, 3, 1, 2), ws=(size, size), ignore_border=True)  # (N, C, H', W')
    return y.dimshuffle(0, 2, 3, 1)


def compile_function(inputs, outputs, updates):
    mode = theano.compile.mode.Mode(linker="cvm", optimizer="fast_run")
    return theano.function(list(inputs), list(outputs), updates=list(updates), mode=mode, on_unused_input="ignore")


def graph_entries() -> dict:
    """The ``pipeline.nn.backend.Graph`` fields for theano-pymc."""
    return {
        "library": "theano-pymc",
        "tensor": T,
        "shared": shared,
        "variable": variable,
        "sigmoid": T.nnet.sigmoid,
        "softplus": T.nnet.softplus,
        "softmax": softmax,
        "log_softmax": log_softmax,
        "grad": theano.grad,
        "scan": scan,
        "clone_replace": clone_replace,
        "conv2d_valid": conv2d_valid,
        "max_pool": max_pool,
    }


def device_name() -> str:
    """What ``Backend`` reports; refuses to go on without a C++ compiler (Theano's Python-only mode is far too slow)."""
    if not theano.config.cxx:
        from pipeline.core.config import PipelineError

        raise PipelineError("engine theano-pymc needs a C++ compiler (g++), and Theano found none")
    blas = theano.config.blas__ldflags or "no BLAS: NumPy's dot"
    return f"cpu (theano-pymc {theano.__version__}, {blas})"
