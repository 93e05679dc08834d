"""Network costs, L2 term, predictions, shape checks, a finite-difference gradient check, and batch-norm
statistics (measured, saved with the parameters, used by the trainer)."""

import numpy as np
import pytensor.tensor as pt
import pytest

from pipeline.nn.backend import Backend
from pipeline.nn.compiled import INFERENCE_CALL_BATCHES, Inference, Trainer
from pipeline.nn.layers import BatchNorm, ConvPool, FullyConnected, Softmax
from pipeline.nn.network import Network

from reference import np_batch_norm, np_conv

JAX = Backend("jax")


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def dense_net(rng, last="softmax"):
    hidden = FullyConnected(6, 5, "tanh", rng=rng, name="h")
    out = Softmax(5, 3, name="s") if last == "softmax" else FullyConnected(5, 3, "sigmoid", rng=rng, name="o")
    out.w.set_value(rng.normal(size=(5, 3)).astype(np.float32))
    return Network([hidden, out])


def np_forward(net, x):
    h = np.tanh(x @ net.layers[0].w.get_value() + net.layers[0].b.get_value())
    return h @ net.layers[1].w.get_value() + net.layers[1].b.get_value()


def np_probabilities(net, x):
    """``dense_net``'s softmax outputs, in NumPy."""
    logits = np_forward(net, x)
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    return softmax / softmax.sum(axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    return rng, rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, size=8).astype(np.uint8)


def compile_cost(net, cost, lmbda=0.0, batches=1):
    x, y = pt.matrix("x", dtype="float32"), pt.vector("y", dtype="uint8")
    out = net.objective(x, y, cost=cost, lmbda=lmbda, num_training_batches=batches)
    return JAX.function([x, y], [out])


def test_log_likelihood_is_mean_negative_log_probability(data):
    rng, x, y = data
    net = dense_net(rng)
    (c,) = compile_cost(net, "log-likelihood")(x, y)
    z = np_forward(net, x)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    assert c == pytest.approx(-log_p[np.arange(8), y].mean(), rel=1e-5)


def test_cross_entropy_and_quadratic_costs(data):
    rng, x, y = data
    net = dense_net(rng, last="sigmoid")
    a = sigmoid(np_forward(net, x))
    onehot = np.eye(3)[y]
    (ce,) = compile_cost(net, "cross-entropy")(x, y)
    (quad,) = compile_cost(net, "quadratic")(x, y)
    assert ce == pytest.approx(np.mean(np.sum(-onehot * np.log(a) - (1 - onehot) * np.log(1 - a), axis=1)), rel=1e-5)
    assert quad == pytest.approx(np.mean(0.5 * np.sum((a - onehot) ** 2, axis=1)), rel=1e-5)


def test_l2_term_is_the_books_weights_only_formula(data):
    rng, x, y = data
    net = dense_net(rng)
    (plain,) = compile_cost(net, "log-likelihood")(x, y)
    (decayed,) = compile_cost(net, "log-likelihood", lmbda=0.7, batches=40)(x, y)
    squares = sum(float((layer.w.get_value().astype(np.float64) ** 2).sum()) for layer in net.layers)  # no biases
    assert decayed - plain == pytest.approx(0.5 * 0.7 * squares / 40, rel=1e-4)


def test_inference_output_and_accuracy(data):
    rng, x, y = data
    net = dense_net(rng)
    xs = pt.matrix("x", dtype="float32")
    (out,) = JAX.function([xs], [net.output(xs, deterministic=True)])(x)
    np.testing.assert_allclose(out, np_probabilities(net, x), rtol=1e-4, atol=1e-6)
    inference = Inference(net, JAX, batch_size=7)  # a last partial batch too
    assert inference.accuracy(x, y) == pytest.approx(np.mean(np_forward(net, x).argmax(axis=1) == y))


@pytest.mark.parametrize("extra", [-1, 0, 1])  # images: one under a whole call of batches, exactly, one past
def test_inference_runs_calls_of_many_batches_where_there_are_enough_then_one_batch_a_call(data, extra):
    rng, _, _ = data
    net = dense_net(rng)
    images = 2 * INFERENCE_CALL_BATCHES + extra
    x = rng.normal(size=(images, 6)).astype(np.float32)
    inference = Inference(net, JAX, batch_size=2)
    got = inference.probabilities(x)
    # the programs compiled, by the batches each call runs: single batches under a whole call, one
    # call of them all exactly, then a single batch (one image and one of padding) one past
    assert set(inference._fns) == {-1: {1}, 0: {INFERENCE_CALL_BATCHES}, 1: {INFERENCE_CALL_BATCHES, 1}}[extra]
    np.testing.assert_allclose(got, np_probabilities(net, x), rtol=1e-4, atol=1e-6)
    # bit for bit what scoring one batch a call gives: a call of many batches scores each as one
    singles = np.concatenate([inference.probabilities(x[i : i + 2]) for i in range(0, images, 2)])
    np.testing.assert_array_equal(got, singles)


def test_costs_that_do_not_fit_the_output_layer_are_refused(data):
    rng, _, _ = data
    with pytest.raises(ValueError, match="needs a softmax output"):
        dense_net(rng, last="sigmoid").check_cost("log-likelihood")
    with pytest.raises(ValueError, match="needs a sigmoid"):
        dense_net(rng).check_cost("cross-entropy")
    with pytest.raises(ValueError, match="unknown cost"):
        dense_net(rng).check_cost("hinge")


def test_mismatched_layer_sizes_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(
        ValueError, match=r"layer 1 \(softmax\) takes 7 inputs but layer 0 \(fully_connected\) outputs 5"
    ):
        Network([FullyConnected(6, 5, rng=rng), Softmax(7, 3)])


def test_gradients_match_finite_differences():
    """Central differences in float64 around the float32 parameters of a small conv network."""
    rng = np.random.default_rng(5)
    net = Network(
        [
            ConvPool((1, 6, 6), filters=2, kernel=3, pool=2, activation="tanh", rng=rng),
            FullyConnected(8, 4, "sigmoid", rng=rng),
            Softmax(4, 3),
        ]
    )
    for layer in net.layers:  # away from zero so every parameter matters
        layer.w.set_value(rng.normal(size=layer.w.type.shape).astype(np.float32))
    x_val = rng.random((5, 36)).astype(np.float32)
    y_val = rng.integers(0, 3, 5).astype(np.uint8)
    x, y = pt.tensor("x", dtype="float32", shape=(5, 36)), pt.vector("y", dtype="uint8")
    objective = net.objective(x, y, cost="log-likelihood", lmbda=0.3, num_training_batches=2)
    f = JAX.function([x, y], [objective, *pt.grad(objective, net.params)])
    _, *grads = f(x_val, y_val)
    eps = 1e-2
    for param, grad in zip(net.params, grads):
        value = param.get_value()
        for index in list(np.ndindex(value.shape))[:6]:
            shifted = []
            for sign in (1, -1):
                moved = value.copy()
                moved[index] += sign * eps
                param.set_value(moved)
                shifted.append(float(f(x_val, y_val)[0]))
            param.set_value(value)
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            assert grad[index] == pytest.approx(numeric, rel=2e-2, abs=2e-3), (param.name, index)


def bn_net(rng):
    """conv (linear) -> batch norm (relu) -> dense (linear) -> batch norm (tanh) -> softmax"""
    net = Network(
        [
            ConvPool((1, 6, 6), filters=2, kernel=3, pool=1, activation="linear", rng=rng, name="c"),
            BatchNorm((2, 4, 4), "relu", name="n1"),
            FullyConnected(32, 4, "linear", rng=rng, name="f"),
            BatchNorm((4,), "tanh", name="n2"),
            Softmax(4, 3, name="s"),
        ]
    )
    net.layers[1].gamma.set_value(np.float32([1.5, 0.5]))
    net.layers[3].beta.set_value(np.float32([0.1, -0.2, 0.3, 0.0]))
    return net


def test_batch_norm_statistics_are_saved_after_the_parameters_but_not_trained_or_counted():
    net = bn_net(np.random.default_rng(0))
    assert net.param_names() == [
        "c.w",
        "c.b",
        "n1.gamma",
        "n1.beta",
        "f.w",
        "f.b",
        "n2.gamma",
        "n2.beta",
        "s.w",
        "s.b",
        "n1.mean",
        "n1.var",
        "n2.mean",
        "n2.var",
    ]
    assert net.statistics == [net.layers[1].mean, net.layers[1].var, net.layers[3].mean, net.layers[3].var]
    assert net.count_params() == 2 * 9 + 2 + 2 * 2 + 32 * 4 + 4 + 2 * 4 + 4 * 3 + 3  # no mean, no var
    values = [np.full_like(v, i) for i, v in enumerate(net.get_values())]
    net.set_values(values)
    assert net.layers[3].var.get_value().tolist() == [13.0] * 4


def test_batch_moments_normalize_each_layer_by_the_moments_just_measured():
    rng = np.random.default_rng(1)
    net = bn_net(rng)
    x_val = rng.random((7, 36)).astype(np.float32)
    x = pt.matrix("x", dtype="float32")
    moments = JAX.function([x], net.batch_moments(x))(x_val)
    conv = (
        np_conv(x_val.reshape(7, 6, 6, 1).astype(np.float64), net.layers[0].w.get_value()) + net.layers[0].b.get_value()
    )
    assert len(moments) == 4
    np.testing.assert_allclose(moments[0], conv.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments[1], conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    first = np.maximum(np_batch_norm(conv, net.layers[1].gamma.get_value(), net.layers[1].beta.get_value()), 0)
    dense = first.reshape(7, 32) @ net.layers[2].w.get_value() + net.layers[2].b.get_value()
    np.testing.assert_allclose(moments[2], dense.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(moments[3], dense.var(axis=0), rtol=1e-4, atol=1e-5)


def test_the_trainer_sets_the_statistics_to_the_moments_over_all_the_images():
    """Measured in batches of 50 over 130 images: the last 30 are left out; over the 100 used, the mean
    and the variance are those of all 100 at once, not an average of the batches' variances."""
    rng = np.random.default_rng(2)
    net = Network(
        [
            ConvPool((1, 6, 6), filters=3, kernel=3, pool=2, activation="linear", rng=rng),
            BatchNorm((3, 2, 2), "relu"),
            Softmax(12, 3),
        ]
    )
    images = rng.integers(0, 256, (130, 36), dtype=np.uint8)
    images[:50] //= 4  # batches that differ: the variance of the batch means matters
    trainer = Trainer(net, JAX, batch_size=10, eval_batch_size=50)
    trainer.set_statistics(images)
    x = images[:100].reshape(100, 6, 6, 1) / 255.0
    pooled = np_conv(x, net.layers[0].w.get_value())[:, :4, :4].reshape(100, 2, 2, 2, 2, 3).max(axis=(2, 4))
    pooled = pooled + net.layers[0].b.get_value()
    np.testing.assert_allclose(net.layers[1].mean.get_value(), pooled.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.layers[1].var.get_value(), pooled.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least 50 images, got 49"):
        trainer.set_statistics(images[:49])


def test_training_flops_counts_the_book_networks_multiply_adds():
    from pipeline.nn.architecture import build, resolve

    network = build(resolve("conv2_relu"), rng=np.random.default_rng(0))
    # forward multiply-adds: conv 20x5x5 on 28x28 -> 24x24, conv 40x5x5x20 on 12x12 -> 8x8, FC 640x100, 100x10
    forward = [24 * 24 * 20 * 25, 8 * 8 * 40 * 25 * 20, 640 * 100, 100 * 10]
    # backward: the weight gradients as many again, the input gradients too except the first layer's
    assert network.training_flops() == 2 * (3 * sum(forward) - forward[0]) == 9_222_000
