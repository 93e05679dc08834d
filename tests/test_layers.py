"""Layers and the graph convolution against plain NumPy references (outputs and gradients)."""

import functools
import re

import numpy as np
import pytensor.tensor as pt
import pytest

from pipeline.nn import convolution
from pipeline.nn.backend import Backend
from pipeline.nn.convolution import conv2d_valid, conv_pool, max_pool
from pipeline.nn.layers import BatchNorm, ConvPool, FullyConnected, Softmax, keep_mask

from reference import np_batch_norm, np_conv, np_pool, sigmoid

JAX = Backend("jax")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("engine", ["jax", "c"])
@pytest.mark.parametrize("channels", [1, 2])  # one channel: the first layer's case
def test_conv2d_valid_matches_direct_loops(rng, channels, engine):
    x_val = rng.normal(size=(3, 7, 6, channels)).astype(np.float32)
    w_val = rng.normal(size=(3, 2, channels, 4)).astype(np.float32)
    x = pt.tensor("x", dtype="float32", shape=(None, 7, 6, channels))
    w = pt.tensor("w", dtype="float32", shape=(3, 2, channels, 4))
    (y,) = Backend(engine).function([x, w], [conv2d_valid(x, w)])(x_val, w_val)
    np.testing.assert_allclose(y, np_conv(x_val, w_val), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["jax", "c"])  # the windows' gradient is written by hand: check it on both
@pytest.mark.parametrize("channels", [1, 3])
def test_conv2d_gradients_match_numpy(rng, channels, engine):
    x_val = rng.normal(size=(2, 6, 5, channels)).astype(np.float32)
    w_val = rng.normal(size=(3, 2, channels, 4)).astype(np.float32)
    g_val = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)  # d loss / d output
    x = pt.tensor("x", dtype="float32", shape=(2, 6, 5, channels))  # JAX needs a static batch to reshape gradients
    w = pt.tensor("w", dtype="float32", shape=(3, 2, channels, 4))
    loss = pt.sum(conv2d_valid(x, w) * g_val)
    gx, gw = Backend(engine).function([x, w], pt.grad(loss, [x, w]))(x_val, w_val)
    # d/dw[a,b,c,f] = sum_{n,i,j} x[n,i+a,j+b,c] g[n,i,j,f];  d/dx scatters g back through every window
    ref_gw = np.zeros_like(w_val)
    ref_gx = np.zeros_like(x_val)
    for a in range(3):
        for b in range(2):
            window = x_val[:, a : a + 4, b : b + 4, :]
            ref_gw[a, b] = np.einsum("nijc,nijf->cf", window, g_val)
            ref_gx[:, a : a + 4, b : b + 4, :] += np.einsum("nijf,cf->nijc", g_val, w_val[a, b])
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ["jax", "c"])
@pytest.mark.parametrize("channels", [1, 2])  # one channel takes the channels-first form
@pytest.mark.parametrize("size", [3, 4])  # conv 6x6 -> pool 3 -> 2x2, or pool 4 -> 1x1 and a border of 2 dropped
def test_conv_pool_matches_numpy_with_its_gradients(rng, channels, engine, size):
    pooled, kept = 6 // size, 6 // size * size
    x_val = rng.normal(size=(3, 8, 7, channels)).astype(np.float32)
    w_val = rng.normal(size=(3, 2, channels, 4)).astype(np.float32)
    g_val = rng.normal(size=(3, pooled, pooled, 4)).astype(np.float32)  # d loss / d output
    x = pt.tensor("x", dtype="float32", shape=(3, 8, 7, channels))
    w = pt.tensor("w", dtype="float32", shape=(3, 2, channels, 4))
    y = conv_pool(x, w, size)
    out, gx, gw = Backend(engine).function([x, w], [y, *pt.grad(pt.sum(y * g_val), [x, w])])(x_val, w_val)
    np.testing.assert_allclose(out, np_pool(np_conv(x_val, w_val), size), rtol=1e-5, atol=1e-5)
    # the pool sends each output's gradient to its window's maximum, then the convolution spreads it
    conv = np_conv(x_val, w_val)[:, :kept, :kept]
    is_max = conv == np.repeat(np.repeat(np_pool(conv, size), size, axis=1), size, axis=2)
    g_conv = is_max * np.repeat(np.repeat(g_val, size, axis=1), size, axis=2)  # (3, kept, kept, 4)
    ref_gw = np.zeros_like(w_val)
    ref_gx = np.zeros_like(x_val)
    for a in range(3):
        for b in range(2):
            ref_gw[a, b] = np.einsum("nijc,nijf->cf", x_val[:, a : a + kept, b : b + kept, :], g_conv)
            ref_gx[:, a : a + kept, b : b + kept, :] += np.einsum("nijf,cf->nijc", g_conv, w_val[a, b])
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-4)


def test_max_pool_matches_numpy_and_drops_the_border(rng):
    x_val = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)  # 5x7 -> 2x3, last row/column dropped
    x = pt.tensor("x", dtype="float32", shape=(None, 5, 7, 3))
    (y,) = JAX.function([x], [max_pool(x, 2)])(x_val)
    assert y.shape == (2, 2, 3, 3)
    np.testing.assert_allclose(y, np_pool(x_val, 2))


def test_max_pool_gradient_goes_to_the_maximum_of_each_window(rng):
    x_val = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
    x = pt.tensor("x", dtype="float32", shape=(1, 4, 4, 2))
    (gx,) = JAX.function([x], [pt.grad(pt.sum(max_pool(x, 2)), x)])(x_val)
    is_max = x_val == np.repeat(np.repeat(np_pool(x_val, 2), 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(gx, is_max.astype(np.float32))


@pytest.mark.parametrize(
    "activation, fn",
    [("sigmoid", sigmoid), ("tanh", np.tanh), ("relu", lambda z: np.maximum(z, 0)), ("linear", lambda z: z)],
)
def test_conv_pool_layer_is_conv_then_pool_then_bias_and_activation(rng, activation, fn):
    layer = ConvPool((2, 9, 9), filters=3, kernel=4, pool=2, activation=activation, rng=rng)
    assert layer.output_shape == (3, 3, 3) and layer.n_out == 27
    x_val = rng.normal(size=(4, 2 * 9 * 9)).astype(np.float32)  # flat input, reshaped channels-last
    x = pt.matrix("x", dtype="float32")
    (y,) = JAX.function([x], [layer.output(x)])(x_val)
    ref = fn(np_pool(np_conv(x_val.reshape(4, 9, 9, 2), layer.w.get_value()), 2) + layer.b.get_value())
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_softmax_layer_rows_are_probabilities(rng):
    layer = Softmax(5, 4)
    layer.w.set_value(rng.normal(size=(5, 4)).astype(np.float32))
    layer.b.set_value(rng.normal(size=4).astype(np.float32))
    x_val = rng.normal(size=(3, 5)).astype(np.float32)
    x = pt.matrix("x", dtype="float32")
    (p,) = JAX.function([x], [layer.output(x)])(x_val)
    z = x_val @ layer.w.get_value() + layer.b.get_value()
    ref = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-5)


def test_dropout_keeps_masked_inputs_in_training_and_scales_at_inference(rng):
    layer = FullyConnected(6, 3, "sigmoid", p_dropout=0.25, rng=rng)
    w, b = layer.w.get_value(), layer.b.get_value()
    x_val = rng.normal(size=(4, 6)).astype(np.float32)
    keep_val = (rng.random((4, 6)) > 0.25).astype(np.float32)
    x, keep = pt.matrix("x", dtype="float32"), pt.matrix("keep", dtype="float32")
    f = JAX.function([x, keep], [layer.output(x, deterministic=True), layer.output(x, deterministic=False, keep=keep)])
    inference, training = f(x_val, keep_val)
    np.testing.assert_allclose(inference, sigmoid(0.75 * (x_val @ w) + b), rtol=1e-5)
    np.testing.assert_allclose(training, sigmoid((x_val * keep_val) @ w + b), rtol=1e-5)
    with pytest.raises(ValueError, match="keep mask"):
        layer.output(x, deterministic=False)


@pytest.mark.parametrize("p_dropout", [0.0, 0.25, 0.5])
def test_keep_masks_keep_each_input_with_probability_one_minus_p(p_dropout):
    masks = keep_mask(np.random.default_rng(3), (40, 10, 500), p_dropout)
    assert masks.dtype == np.uint8 and masks.shape == (40, 10, 500)
    assert set(np.unique(masks)) <= {0, 1}
    kept = masks.mean()  # 200,000 draws: a binomial's standard deviation under 0.0012
    assert abs(kept - (1 - p_dropout)) < 0.005, kept
    if p_dropout == 0.0:
        assert masks.all()  # a uniform draw is never below 0: nothing dropped
    again = keep_mask(np.random.default_rng(3), (40, 10, 500), p_dropout)
    np.testing.assert_array_equal(masks, again)  # a run is repeatable from its seed


@pytest.mark.parametrize("init, fan", [("book", 400), ("corrected", 200)])
def test_initialisation_scales(init, fan):
    rng = np.random.default_rng(1)
    fc = FullyConnected(200, 400, rng=rng, init=init)
    assert fc.w.get_value().std() == pytest.approx(np.sqrt(1 / fan), rel=0.02)
    assert fc.b.get_value().std() == pytest.approx(1.0, rel=0.2)
    conv = ConvPool((3, 28, 28), filters=50, kernel=5, pool=2, rng=rng, init=init)
    conv_fan = 50 * 25 / 4 if init == "book" else 3 * 25
    assert conv.w.get_value().std() == pytest.approx(np.sqrt(1 / conv_fan), rel=0.05)
    assert not Softmax(10, 4).w.get_value().any()


def test_bad_layer_arguments_are_refused(rng):
    with pytest.raises(ValueError, match="activation"):
        FullyConnected(3, 2, "swish", rng=rng)
    with pytest.raises(ValueError, match="p_dropout"):
        FullyConnected(3, 2, p_dropout=1.0, rng=rng)
    with pytest.raises(ValueError, match="init"):
        FullyConnected(3, 2, rng=rng, init="xavier")
    with pytest.raises(ValueError, match="do not fit"):
        ConvPool((1, 4, 4), filters=2, kernel=5, rng=rng)


def _bn_layer(shape, activation, rng):
    layer = BatchNorm(shape, activation, name="bn")
    units = shape[0]
    layer.gamma.set_value(rng.uniform(0.5, 2.0, units).astype(np.float32))
    layer.beta.set_value(rng.normal(size=units).astype(np.float32))
    layer.mean.set_value(rng.normal(size=units).astype(np.float32))
    layer.var.set_value(rng.uniform(0.5, 3.0, units).astype(np.float32))
    return layer


@pytest.mark.parametrize("shape", [(3, 4, 5), (6,)])  # after a conv layer (per channel) and a dense one (per unit)
@pytest.mark.parametrize("activation, fn", [("relu", lambda z: np.maximum(z, 0)), ("linear", lambda z: z)])
def test_batch_norm_uses_the_batch_moments_in_training_and_its_statistics_at_inference(rng, shape, activation, fn):
    layer = _bn_layer(shape, activation, rng)
    assert layer.n_in == layer.n_out == int(np.prod(shape))
    x_val = rng.normal(2.0, 3.0, size=(8, layer.n_in)).astype(np.float32)
    x = pt.matrix("x", dtype="float32")
    training, inference = JAX.function([x], [layer.output(x, deterministic=False), layer.output(x)])(x_val)
    units_last = x_val.reshape(8, *shape[1:], shape[0]).astype(np.float64)  # channels-last, as the layers flow
    gamma, beta = layer.gamma.get_value(), layer.beta.get_value()
    np.testing.assert_allclose(
        training.reshape(units_last.shape), fn(np_batch_norm(units_last, gamma, beta)), rtol=1e-4, atol=1e-4
    )
    stored = fn(np_batch_norm(units_last, gamma, beta, mean=layer.mean.get_value(), var=layer.var.get_value()))
    np.testing.assert_allclose(inference.reshape(units_last.shape), stored, rtol=1e-4, atol=1e-4)
    assert layer.params == [layer.gamma, layer.beta] and layer.statistics == [layer.mean, layer.var]
    assert layer.weights == [] and layer.spec() == {
        "type": "batch_norm",
        "shape": list(shape),
        "activation": activation,
    }


def test_batch_norm_gradients_match_the_papers_backward_pass(rng):
    layer = _bn_layer((3, 2, 2), "linear", rng)
    x_val = rng.normal(1.0, 2.0, size=(5, 12)).astype(np.float32)
    g_val = rng.normal(size=(5, 2, 2, 3)).astype(np.float32)  # d loss / d output, channels-last
    x = pt.tensor("x", dtype="float32", shape=(5, 12))
    loss = pt.sum(layer.output(x, deterministic=False) * g_val)
    gx, ggamma, gbeta = JAX.function([x], pt.grad(loss, [x, layer.gamma, layer.beta]))(x_val)
    # Ioffe and Szegedy (2015), section 3, over the m = N*H*W values of each channel
    xs = x_val.reshape(5, 2, 2, 3).reshape(-1, 3).astype(np.float64)
    dy = g_val.reshape(-1, 3).astype(np.float64)
    m, gamma = len(xs), layer.gamma.get_value().astype(np.float64)
    mu, var = xs.mean(axis=0), xs.var(axis=0)
    x_hat = (xs - mu) / np.sqrt(var + 1e-5)
    ref_gx = gamma / np.sqrt(var + 1e-5) / m * (m * dy - dy.sum(axis=0) - x_hat * (dy * x_hat).sum(axis=0))
    np.testing.assert_allclose(ggamma, (dy * x_hat).sum(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gbeta, dy.sum(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx.reshape(-1, 3), ref_gx, rtol=1e-3, atol=1e-4)


def test_batch_norm_refuses_a_shape_that_is_not_units_or_an_image():
    with pytest.raises(ValueError, match=r"Got shape=\[4, 5\] for a batch_norm layer"):
        BatchNorm([4, 5])
    with pytest.raises(ValueError, match="activation"):
        BatchNorm([4], "swish")


def test_the_benchmarks_lax_convolution_op_agrees_with_the_graph_form(rng):
    from pipeline.benchmarks.conv_lax import conv2d_lax

    x_val = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    w_val = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
    g_val = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
    x = pt.tensor("x", dtype="float32", shape=(2, 7, 6, 3))
    w = pt.tensor("w", dtype="float32", shape=(3, 2, 3, 4))
    outs = []
    for conv in (conv2d_valid, conv2d_lax):
        y = conv(x, w)
        outs.append(JAX.function([x, w], [y, *pt.grad(pt.sum(y * g_val), [x, w])])(x_val, w_val))
    for graph, lax in zip(*outs):
        np.testing.assert_allclose(lax, graph, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ["jax", "c"])
def test_the_windows_gradient_is_each_windows_part_put_back_and_summed(rng, engine):
    # the second layer's shapes in the book, channels-first: 5x5 windows of 20 channels, 12x12 in, 8x8 out
    planes = pt.tensor("planes", dtype="float32", shape=(20, 3, 12, 12))
    g_val = rng.normal(size=(25, 20, 3, 8, 8)).astype(np.float32)  # d loss / d windows
    windows = convolution._windows(planes, 5, 5)
    (gx,) = Backend(engine).function([planes], [pt.grad(pt.sum(windows * g_val), planes)])(
        np.zeros((20, 3, 12, 12), np.float32)
    )
    # NumPy: for each row offset i, the windows (i, 0..4) padded to their columns and added; then the
    # five rows padded to their place and added (XLA may add a row's five parts in another order)
    rows = [
        functools.reduce(np.add, [np.pad(g_val[5 * i + j], ((0, 0), (0, 0), (0, 0), (j, 4 - j))) for j in range(5)])
        for i in range(5)
    ]
    placed = [np.pad(row, ((0, 0), (0, 0), (i, 4 - i), (0, 0))) for i, row in enumerate(rows)]
    np.testing.assert_allclose(gx, functools.reduce(np.add, placed), rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", ["jax", "c"])
@pytest.mark.parametrize("static", [True, False])  # the length of the rows known when the graph is built, or not
def test_the_planes_maximum_gradient_is_autodiffs_bit_for_bit_ties_included(rng, engine, static):
    # the first layer's pooling: 4 planes of 2 images' 12x12 outputs for 20 filters; the hand-written
    # gradient must give what autodiff of the plain maximum gives, every tied maximum included
    y_val = rng.normal(size=(20, 4 * 288)).astype(np.float32)
    y_val[:, 288:576] = y_val[:, :288]  # planes 0 and 1 tie everywhere
    y_val[0, [5, 288 + 5]] = 10.0  # ... and are the maximum there
    y_val[3, 2 * 288 + 7] = y_val[3, 7] + 1  # one maximum alone in plane 2
    g_val = rng.normal(size=(20, 288)).astype(np.float32)
    y = pt.tensor("y", dtype="float32", shape=y_val.shape if static else (20, None))
    pooled, plain = convolution._planes_max(y, 4), y.reshape((20, 4, 288)).max(axis=1)
    outputs = [pooled, plain, pt.grad(pt.sum(pooled * g_val), y), pt.grad(pt.sum(plain * g_val), y)]
    out, plain_out, gy, plain_gy = Backend(engine).function([y], outputs)(y_val)
    np.testing.assert_array_equal(out, y_val.reshape(20, 4, 288).max(axis=1))
    np.testing.assert_array_equal(out, plain_out)
    np.testing.assert_array_equal(gy, plain_gy)
    is_max = y_val.reshape(20, 4, 288) == out[:, None, :]
    np.testing.assert_array_equal(gy, (is_max * g_val[:, None, :]).reshape(y_val.shape))
    assert gy[3, 7] == 0 and gy[3, 2 * 288 + 7] == g_val[3, 7] and gy[0, 5] == gy[0, 288 + 5] == g_val[0, 5]


@pytest.mark.parametrize("images", [5, 8])  # a device's share of a mini-batch of 10, a chunk of 64's
def test_every_product_of_a_convolution_contracts_its_left_operand_over_its_last_axis(rng, images):
    # the second layer's shapes in the book; the output and both gradients, as in a training step. A
    # product whose left operand is contracted over another axis (autodiff's windows.T @ gy channels-last,
    # or the filters reshaped and transposed) is left by XLA to Eigen, slower (docs/engines.md).
    import jax
    import pytensor

    x_val = rng.normal(size=(images, 12, 12, 20)).astype(np.float32)
    w_val = rng.normal(size=(5, 5, 20, 40)).astype(np.float32)
    g_val = rng.normal(size=(images, 8, 8, 40)).astype(np.float32)
    x, w, g = (pt.tensor(name, dtype="float32", shape=v.shape) for name, v in zip("xwg", (x_val, w_val, g_val)))
    y = conv2d_valid(x, w)
    function = pytensor.function([x, w, g], [y, *pt.grad(pt.sum(y * g), [x, w])], mode="JAX")
    program = jax.jit(function.vm.jit_fn).lower(x_val, w_val, g_val).compile().as_text()
    shapes = dict(re.findall(r"%(\S+) = f32\[([\d,]*)\]", program))
    products = re.findall(r"f32\[([\d,]*)\]\S* dot\(%([^,]+), %[^)]+\), lhs_contracting_dims=\{(\d+)\}", program)
    assert len(products) == 3  # the output, the windows' gradient, the filters' gradient
    assert all(int(axis) == shapes[lhs].count(",") for _, lhs, axis in products), products
    # the filters' gradient windows first, laid out as the filters: the operand it reads transposed is
    # the output gradient (40 rows), not the windows (500)
    assert sorted(shape for shape, _, _ in products) == sorted([f"40,{images * 64}", "500,40", f"500,{images * 64}"])
    # XLA's CPU compiler fuses no concatenation of more than 8 pieces: the 25 windows stacked at once
    # were 25 slices written out and then copied, stacked a row at a time they are one pass
    joins = re.findall(r"= f32\[[\d,]*\]\S* concatenate\(([^)]*)\)", program)
    assert all(join.count("%") <= 8 for join in joins), joins
    out, gx, gw = function(x_val, w_val, g_val)
    np.testing.assert_allclose(out, np_conv(x_val, w_val), rtol=1e-4, atol=1e-4)
    windows = np.stack([x_val[:, a : a + 8, b : b + 8, :] for a in range(5) for b in range(5)], axis=3)
    reference_gw = np.einsum("nijkc,nijf->kcf", windows, g_val).reshape(w_val.shape)
    np.testing.assert_allclose(gw, reference_gw, rtol=1e-4, atol=1e-3)
    reference_gx = np.zeros_like(x_val)
    for a in range(5):
        for b in range(5):
            reference_gx[:, a : a + 8, b : b + 8, :] += np.einsum("nijf,cf->nijc", g_val, w_val[a, b])
    np.testing.assert_allclose(gx, reference_gx, rtol=1e-4, atol=1e-3)
