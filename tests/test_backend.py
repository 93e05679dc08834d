"""Engine/device selection, and the same cost and gradients on the JAX and C engines."""

import tempfile

import numpy as np
import pytensor.tensor as pt
import pytest

from pipeline.backend import Backend
from pipeline.config import PipelineError
from pipeline.layers import ConvPool, FullyConnected, Softmax
from pipeline.network import Network


def test_unknown_engine_and_device_are_refused():
    with pytest.raises(PipelineError, match="unknown engine 'numba'"):
        Backend("numba")
    with pytest.raises(PipelineError, match="unknown device 'tpu'"):
        Backend("jax", "tpu")
    with pytest.raises(PipelineError, match="CPU only"):
        Backend("c", "gpu")


def test_gpu_without_a_gpu_is_an_error_not_a_fallback():
    import jax

    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        assert Backend("jax", "gpu").device_name.startswith("gpu")
    else:
        with pytest.raises(PipelineError, match="JAX sees no GPU"):
            Backend("jax", "gpu")


def test_functions_return_numpy_arrays_in_float32():
    x = pt.vector("x", dtype="float32")
    (out,) = Backend("jax").function([x], [x * 2.5])(np.arange(3, dtype=np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [0, 2.5, 5])


def test_jax_and_c_give_the_same_cost_and_gradients():
    rng = np.random.default_rng(11)
    net = Network([ConvPool((1, 8, 8), filters=3, kernel=3, pool=2, activation="relu", rng=rng),
                   FullyConnected(27, 6, "sigmoid", p_dropout=0.5, rng=rng), Softmax(6, 4)])
    net.layers[-1].w.set_value(rng.normal(size=(6, 4)).astype(np.float32))
    x = pt.tensor("x", dtype="float32", shape=(5, 64))
    y = pt.vector("y", dtype="uint8")
    keep = pt.tensor("keep", dtype="float32", shape=(5, 27))
    objective = net.objective(x, y, cost="log-likelihood", lmbda=0.2, num_training_batches=3, keeps=[keep])
    outputs = [objective, *pt.grad(objective, net.params)]
    args = (rng.random((5, 64)).astype(np.float32), rng.integers(0, 4, 5).astype(np.uint8),
            (rng.random((5, 27)) > 0.5).astype(np.float32))
    jax_out = Backend("jax").function([x, y, keep], outputs)(*args)
    c_out = Backend("c").function([x, y, keep], outputs)(*args)
    for name, a, b in zip(["cost", *net.param_names()], jax_out, c_out):
        assert a.dtype == b.dtype == np.float32, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_compiling_for_jax_leaves_no_temporary_files(tmp_path, monkeypatch):
    # PyTensor's JAX linker writes each generated function's source to a temporary file it never deletes
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x = pt.matrix("x", dtype="float32", shape=(None, 3))
    f = Backend("jax").function([x], [pt.sigmoid(x).sum(axis=1) * 2])
    assert np.allclose(f(np.zeros((2, 3), np.float32))[0], [3.0, 3.0])
    assert list(tmp_path.iterdir()) == []
    assert tempfile.gettempdir() == str(tmp_path)  # the process's own setting is back
