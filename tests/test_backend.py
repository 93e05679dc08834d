"""Engine/device selection, and the same cost and gradients on the JAX and C engines."""

import tempfile

import numpy as np
import pytensor.tensor as pt
import pytest

from pipeline.core.config import PipelineError
from pipeline.nn.backend import Backend, jax_gpus
from pipeline.nn.compiled import Trainer
from pipeline.nn.layers import ConvPool, FullyConnected, Softmax
from pipeline.nn.network import Network

# These run where JAX has CUDA and a GPU (the device machine); CI has none, so there they skip.
requires_gpu = pytest.mark.skipif(not jax_gpus(), reason="JAX sees no GPU (pip install '.[gpu]')")


def test_unknown_engine_and_device_are_refused():
    with pytest.raises(PipelineError, match="unknown engine 'numba'"):
        Backend("numba")
    with pytest.raises(PipelineError, match="unknown device 'tpu'"):
        Backend("jax", "tpu")
    with pytest.raises(PipelineError, match="CPU only"):
        Backend("c", "gpu")


def test_gpu_without_a_gpu_is_an_error_not_a_fallback():
    if jax_gpus():
        assert Backend("jax", "gpu").device_name.startswith("gpu")
    else:
        with pytest.raises(PipelineError, match="JAX sees no GPU"):
            Backend("jax", "gpu")


def test_functions_return_numpy_arrays_in_float32():
    x = pt.vector("x", dtype="float32")
    (out,) = Backend("jax").function([x], [x * 2.5])(np.arange(3, dtype=np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [0, 2.5, 5])


def _cost_and_gradients(backends: list[Backend]) -> tuple[list[str], list[list[np.ndarray]]]:
    """One network's cost and gradients (dropout masks given) on a batch, compiled for each backend in
    turn; returns the outputs' names and each backend's outputs."""
    rng = np.random.default_rng(11)
    net = Network(
        [
            ConvPool((1, 8, 8), filters=3, kernel=3, pool=2, activation="relu", rng=rng),
            FullyConnected(27, 6, "sigmoid", p_dropout=0.5, rng=rng),
            Softmax(6, 4),
        ]
    )
    net.layers[-1].w.set_value(rng.normal(size=(6, 4)).astype(np.float32))
    x = pt.tensor("x", dtype="float32", shape=(5, 64))
    y = pt.vector("y", dtype="uint8")
    keep = pt.tensor("keep", dtype="float32", shape=(5, 27))
    objective = net.objective(x, y, cost="log-likelihood", lmbda=0.2, num_training_batches=3, keeps=[keep])
    outputs = [objective, *pt.grad(objective, net.params)]
    args = (
        rng.random((5, 64)).astype(np.float32),
        rng.integers(0, 4, 5).astype(np.uint8),
        (rng.random((5, 27)) > 0.5).astype(np.float32),
    )
    return ["cost", *net.param_names()], [backend.function([x, y, keep], outputs)(*args) for backend in backends]


def _assert_same(names: list[str], outputs: list[list[np.ndarray]]) -> None:
    first, second = outputs
    for name, a, b in zip(names, first, second, strict=True):
        assert a.dtype == b.dtype == np.float32, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_jax_and_c_give_the_same_cost_and_gradients():
    _assert_same(*_cost_and_gradients([Backend("jax"), Backend("c")]))


@requires_gpu
def test_gpu_and_cpu_give_the_same_cost_and_gradients():
    # float32 on the GPU means float32: without the backend's "highest" matmul precision, XLA would
    # use TF32 (10-bit mantissa) on Ampere and later GPUs, and the gradients would differ by ~1e-3
    _assert_same(*_cost_and_gradients([Backend("jax", "gpu"), Backend("jax", "cpu")]))


def _compiled_training_graph(backend: Backend) -> str:
    """The rewritten graph of a 20-step training program of a conv net with dropout, as text."""
    import re

    import pytensor

    rng = np.random.default_rng(5)
    net = Network(
        [
            ConvPool((1, 12, 12), filters=3, kernel=3, pool=2, activation="relu", rng=rng),
            ConvPool((3, 5, 5), filters=4, kernel=2, pool=2, activation="relu", rng=rng),
            FullyConnected(16, 6, "sigmoid", p_dropout=0.5, rng=rng),
            Softmax(6, 4),
        ]
    )
    compiled = []

    def function(*args, **kwargs):
        compiled.append(pytensor.compile.function(*args, **kwargs))
        return compiled[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytensor, "function", function)
        Trainer(net, backend, batch_size=4, momentum=0.5)._compile_train(20 if backend.static_shapes else None)
    text = pytensor.dprint(compiled[0].maker.fgraph, file="str", print_type=True)
    return re.sub(r"\[id [A-Z]+\]", "", text)  # node ids count every variable made while compiling


@pytest.mark.parametrize("engine", ["jax", "c"])
def test_inner_graph_shapes_read_from_types_compile_the_same_graph_with_fewer_walks(engine, monkeypatch):
    """pipeline.nn.backend._inner_shapes_from_types: a scan's or OpFromGraph's output whose type fixes
    every dimension gets its shape from the type, not from walking the graph behind it."""
    import pytensor.compile.builders as builders
    from pytensor.scan import op as scan_op

    reads_types = builders.infer_shape
    assert reads_types.reads_static_types and scan_op.infer_shape is reads_types
    walk = reads_types.walk
    walked = []

    def counted(outs, inputs, input_shapes):
        walked.append(len(outs))
        return walk(outs, inputs, input_shapes)

    monkeypatch.setattr(reads_types, "walk", counted)
    fast = _compiled_training_graph(Backend(engine))
    fast_walks, walked[:] = sum(walked), []
    for module in (builders, scan_op):
        monkeypatch.setattr(module, "infer_shape", counted)
    assert _compiled_training_graph(Backend(engine)) == fast
    assert fast_walks == 0 < sum(walked)


def test_inner_graph_shapes_are_constants_for_static_outputs_and_walked_for_the_others():
    import pytensor
    import pytensor.compile.builders as builders
    from pytensor.graph.basic import Constant

    static, length = pt.tensor("a", shape=(3, 2)), pt.scalar("n", dtype="int64")
    free = pt.vector("b")
    outs = [static * 2, pt.outer(free, static.sum(axis=1)), pt.arange(length)]
    input_shapes = [(static.shape[0], static.shape[1]), (free.shape[0],), ()]
    shapes = builders.infer_shape(outs, [static, free, length], input_shapes)
    assert all(isinstance(s, Constant) for s in shapes[0]) and [int(s.data) for s in shapes[0]] == [3, 2]
    walked = builders.infer_shape.walk(outs, [static, free, length], input_shapes)
    evaluate = pytensor.function([free, length], [*shapes[1], *shapes[2], *walked[1], *walked[2]])
    assert [int(v) for v in evaluate(np.zeros(5, dtype="float32"), 7)] == [5, 3, 7, 5, 3, 7]


@pytest.mark.parametrize("engine", ["jax", "c"])
def test_compiling_and_training_leave_no_temporary_files(engine, tmp_path, monkeypatch):
    # PyTensor writes each generated function's source to a temporary file it never deletes: the JAX
    # linker when it compiles and traces, and on the C engine Numba for an inner graph at its first call
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x = pt.matrix("x", dtype="float32", shape=(None, 3))
    f = Backend(engine).function([x], [pt.sigmoid(x).sum(axis=1) * 2])
    assert np.allclose(f(np.zeros((2, 3), np.float32))[0], [3.0, 3.0])
    net = _small_conv_net(0)
    trainer = Trainer(net, Backend(engine), batch_size=10, num_training_batches=5)
    data = np.random.default_rng(1)
    images, labels = data.integers(0, 256, (2, 10, 144), dtype=np.uint8), data.integers(0, 10, (2, 10))
    keeps = [(data.random((2, 10, net.layers[i].n_in)) > 0.5).astype(np.uint8) for i in net.dropout_layers]
    for _ in range(2):
        trainer.train_steps(images, labels, keeps, 0.1)
    assert list(tmp_path.iterdir()) == []
    assert tempfile.gettempdir() == str(tmp_path)  # the process's own setting is back


def _small_conv_net(seed: int) -> Network:
    rng = np.random.default_rng(seed)
    return Network(
        [
            ConvPool((1, 12, 12), filters=4, kernel=5, pool=2, activation="relu", rng=rng),
            FullyConnected(64, 16, "relu", p_dropout=0.5, rng=rng),
            Softmax(16, 10, p_dropout=0.5, rng=rng),
        ]
    )


def _train_on(device: str, steps: int = 30) -> tuple[np.ndarray, list[np.ndarray], list]:
    """30 SGD steps with dropout from the same start; returns costs, final weights and where they live."""
    net = _small_conv_net(3)
    trainer = Trainer(net, Backend("jax", device), batch_size=10, lmbda=0.1, num_training_batches=50)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (steps, 10, 144), dtype=np.uint8)
    labels = rng.integers(0, 10, (steps, 10)).astype(np.uint8)
    keeps = [(rng.random((steps, 10, net.layers[i].n_in)) > 0.5).astype(np.uint8) for i in net.dropout_layers]
    costs = trainer.train_steps(images, labels, keeps, 0.1)
    raw = [p.get_value(borrow=True) for p in net.params]
    places = [sorted(d.platform for d in value.devices()) for value in raw if hasattr(value, "devices")]
    return costs, [np.asarray(value) for value in raw], places


@requires_gpu
def test_gpu_training_repeats_exactly_and_stays_close_to_the_cpu():
    gpu_costs, gpu_weights, places = _train_on("gpu")
    assert places and all(p == ["gpu"] for p in places)  # the parameters stay on the GPU between calls
    again_costs, again_weights, _ = _train_on("gpu")
    cpu_costs, cpu_weights, _ = _train_on("cpu")
    np.testing.assert_array_equal(gpu_costs, again_costs)  # same seed, same run
    for a, b in zip(gpu_weights, again_weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(gpu_costs, cpu_costs, rtol=1e-4)
    for a, b in zip(gpu_weights, cpu_weights):  # 30 steps of SGD amplify float32 rounding differences
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
