"""Convolution and max-pooling written in the PyTensor graph (PyTensor has no CNN convolution Op).

Used by the PyTensor engines (jax, c); theano-pymc has its own ``conv2d`` and ``pool_2d``, which the
layers take instead (``pipeline.nn.theano_engine``).

Layers hand each other channels-last activations, ``(batch, height, width, channels)``, but a
convolution is computed channels-first, ``(channels, batch, height, width)``: the layer's input is
dimshuffled to it (which cancels the previous layer's dimshuffle to channels-last, so no copy is
made), and the pooled result comes back channels-first (``conv_pool_channels_first``; the layer adds
its bias and activation there and then dimshuffles to channels-last). A valid convolution is one
matrix product: the ``kh*kw`` shifted windows of the input are stacked on a new first axis
("im2col", built from plain slices), ``(kh*kw*C, N*out_h*out_w)``, and the filters reshaped to
``(kh*kw*C, F)`` multiply it from the left, so that each window is a contiguous block, the product
comes out channels-first, and all three products of a training step (the output, the windows'
gradient, the filters' gradient) contract an operand over its last axis, which XLA's CPU runtime
gives to its fast matrix library (docs/engines.md).

A one-channel input (the image, the first layer) takes its output positions in the order (row and
column within the pooling window, image, pooled row, pooled column), each window read from the
input's rows and columns taken every ``size``-th, so that the pooling is the elementwise maximum of
``size*size`` contiguous planes (and its gradient a mask over them) instead of a maximum over two
interleaved axes. Its input needs no gradient. For a many-channel input the windows are contiguous
and the pooling a maximum over interleaved axes; the windows' gradient is given by hand
(``_windows_gradient``): each row of windows is summed placed along the columns, in one pass, and
the ``kh`` rows are then added in place. Both are plain graph ops, so the same graph runs on every
PyTensor backend.

Like the book's ``conv.conv2d`` these are cross-correlations of the input with the filters, not
flipped-kernel convolutions; with learned, randomly initialised filters the two are the same model.
"""

from __future__ import annotations

import functools

from pipeline.nn.backend import graph

__all__ = ["conv2d_valid", "conv_pool", "conv_pool_channels_first", "max_pool"]

pt = graph.tensor


def conv2d_valid(x, w):
    """Valid cross-correlation: x (N, H, W, C), w (kh, kw, C, F) -> (N, H-kh+1, W-kw+1, F).

    ``x`` and ``w`` must have static shapes for every axis but the batch (JAX compiles to fixed
    shapes, so every size here is a Python int).
    """
    return conv_pool(x, w, 1)


def conv_pool(x, w, size: int):
    """``max_pool(conv2d_valid(x, w), size)``: x (N, H, W, C) -> (N, (H-kh+1)//size, (W-kw+1)//size, F)."""
    return conv_pool_channels_first(x, w, size).dimshuffle(1, 2, 3, 0)


def conv_pool_channels_first(x, w, size: int):
    """``conv_pool`` with the result channels-first: x (N, H, W, C) -> (F, N, H', W') (module docstring)."""
    kh, kw, channels, filters = w.type.shape
    if channels == 1:
        return _image_conv_pool(x, w, size)
    height, width = x.type.shape[1], x.type.shape[2]
    out_h, out_w = height - kh + 1, width - kw + 1
    planes = x.dimshuffle(3, 0, 1, 2)  # (C, N, H, W)
    patches = _windows(planes, kh, kw).reshape((kh * kw * channels, -1))  # (kh*kw*C, N*out_h*out_w)
    y = _filtered(w, patches).reshape((filters, -1, out_h, out_w))
    if size == 1:
        return y
    pooled_h, pooled_w = out_h // size, out_w // size
    y = y[:, :, : pooled_h * size, : pooled_w * size].reshape((filters, -1, pooled_h, size, pooled_w, size))
    return y.max(axis=(3, 5))


def _filtered(w, patches):
    """The filters ``w`` (kh, kw, C, F) times the windows ``patches`` (kh*kw*C, P) -> (F, P), with
    each of the three products of a training step written so that its left operand is contracted over
    its last axis: XLA's CPU runtime leaves a product whose left operand is contracted over its first
    axis to Eigen, slower (docs/engines.md). So the filters are a (F, kh*kw*C) matrix for the product
    and a (kh*kw*C, F) one for the windows' gradient. The (F, kh*kw*C) matrix is made by a 4-D
    transpose, which XLA copies: a 2-D transpose it would fold into the product. The filters' gradient
    is ``patches @ gy.T``, which comes out laid out as ``w``, where the input has several channels:
    the product then reads the output gradient transposed, (F, P), not the windows, (kh*kw*C, P), and
    runs faster; for a one-channel input (25 windows against 20 filters) ``gy @ patches.T``, filters
    first, was as fast or faster (docs/engines.md)."""
    from pytensor.compile.builders import OpFromGraph  # here: theano-pymc's environment has no PyTensor

    kh, kw, channels, filters = w.type.shape
    weights, rows = w.type(), patches.type()

    def gradient(inputs, outputs, output_grads):
        (weights, rows), (gy,) = inputs, output_grads
        if channels > 1:
            g_weights = pt.dot(rows, gy.T).reshape((kh, kw, channels, filters))
        else:
            g_weights = pt.dot(gy, rows.T).reshape((filters, kh, kw, channels)).dimshuffle(1, 2, 3, 0)
        return [g_weights, pt.dot(weights.reshape((kh * kw * channels, filters)), gy)]

    product = pt.dot(weights.dimshuffle(3, 0, 1, 2).reshape((filters, kh * kw * channels)), rows)
    return OpFromGraph([weights, rows], [product], pullback=gradient, inline=True)(w, patches)


def _image_conv_pool(x, w, size: int):
    """The one-channel form (module docstring): x (N, H, W, 1) -> (F, N, H', W')."""
    kh, kw, _, filters = w.type.shape
    height, width = x.type.shape[1], x.type.shape[2]
    pooled_h, pooled_w = (height - kh + 1) // size, (width - kw + 1) // size
    images = x.reshape((-1, height, width))
    # The output position (size*r + a, size*c + b), window offset (i, j), reads input row
    # size*r + a + i: the rows from a + i taken every size-th, the same for columns (one strided
    # slice each: a slice of a strided slice makes PyTensor's rewrites slow to compile).
    windows = [
        images[:, a + i : a + i + size * (pooled_h - 1) + 1 : size, b + j : b + j + size * (pooled_w - 1) + 1 : size]
        for i in range(kh)
        for j in range(kw)
        for a in range(size)
        for b in range(size)
    ]
    patches = pt.stack(windows, axis=0).reshape((kh * kw, -1))  # (kh*kw, size*size*N*H'*W'), ordered like w
    pooled = _planes_max(_filtered(w, patches), size * size)  # (F, N*H'*W')
    return pooled.reshape((filters, -1, pooled_h, pooled_w))


def _planes_max(y, planes: int):
    """(F, planes*K) -> (F, K): the elementwise maximum of the ``planes`` contiguous planes of each row,
    with its gradient written by hand as each plane's mask times the output gradient, joined along the
    rows. Autodiff gives the same values as one (F, planes, K) mask reshaped to (F, planes*K), which
    XLA compiles into a loop that indexes each element through both shapes, several times slower
    (docs/engines.md)."""
    from pytensor.compile.builders import OpFromGraph  # here: theano-pymc's environment has no PyTensor

    if planes == 1:
        return y
    filters, rows = y.type.shape[0], y.type()

    def gradient(inputs, outputs, output_grads):
        (rows,), (top,), (g_top,) = inputs, outputs, output_grads
        stacked = rows.reshape((filters, planes, -1))
        return [pt.concatenate([pt.eq(stacked[:, p], top) * g_top for p in range(planes)], axis=1)]

    top = rows.reshape((filters, planes, -1)).max(axis=1)
    return OpFromGraph([rows], [top], pullback=gradient, inline=True)(y)


def _windows(planes, kh: int, kw: int):
    """(C, N, H, W) -> (kh*kw, C, N, out_h, out_w): the shifted windows stacked on a new first axis,
    with ``_windows_gradient`` as their gradient (inlined: the compiled graph holds the same ops).
    They are stacked a row of ``kw`` at a time and the ``kh`` rows then stacked: XLA's CPU compiler
    fuses no concatenation of more than 8 pieces, so one stack of 25 windows was 25 slices written out
    and then copied, where this is one pass (docs/engines.md)."""
    from pytensor.compile.builders import OpFromGraph  # here: theano-pymc's environment has no PyTensor

    out_h, out_w = planes.type.shape[2] - kh + 1, planes.type.shape[3] - kw + 1
    template = planes.type()
    rows = [pt.stack([template[:, :, i : i + out_h, j : j + out_w] for j in range(kw)], axis=0) for i in range(kh)]
    windows = pt.stack(rows, axis=0).reshape((kh * kw, planes.type.shape[0], -1, out_h, out_w))
    return OpFromGraph([template], [windows], pullback=_windows_gradient(kh, kw), inline=True)(planes)


def _windows_gradient(kh: int, kw: int):
    """The gradient of ``_windows``: for each row offset ``i``, the ``kw`` windows' parts of the output
    gradient placed at their columns in zeros the input's width and summed (one pass that XLA fuses),
    then the ``kh`` rows added in place at their rows. Autodiff of the slices would give ``kh*kw``
    in-place additions, and placing all ``kh*kw`` parts in one pass makes XLA test every part's
    bounds at every element: both are several times slower (docs/engines.md)."""

    def gradient(inputs, outputs, output_grads):
        (x,), (g,) = inputs, output_grads
        channels, _, height, width = x.type.shape
        out_h = height - kh + 1
        zeros = functools.cache(lambda columns: pt.zeros((channels, x.shape[1], out_h, columns), dtype=g.dtype))
        total = pt.zeros_like(x)
        for i in range(kh):
            parts = [_placed(g[i * kw + j], width, j, zeros) for j in range(kw)]
            total = pt.inc_subtensor(total[:, :, i : i + out_h, :], pt.add(*parts) if kw > 1 else parts[0])
        return [total]

    return gradient


def _placed(part, width: int, j: int, zeros):
    """``part`` (C, N, out_h, out_w), a window's gradient, at columns ``j`` onward of zeros ``width``
    wide, joined on by concatenation (``zeros(columns)``: a block of them, shared by all the parts). Not
    ``pt.pad``, which builds a general symbolic graph at each call and so slows down compiling every
    training (docs/engines.md)."""
    right = width - part.type.shape[3] - j
    pieces = [*([zeros(j)] if j else []), part, *([zeros(right)] if right else [])]
    return pt.concatenate(pieces, axis=3) if len(pieces) > 1 else part


def max_pool(x, size: int):
    """Non-overlapping ``size`` x ``size`` max-pooling of x (N, H, W, C) -> (N, H//size, W//size, C).

    Rows and columns that do not fill a whole window are dropped, as Theano's
    ``pool_2d(ignore_border=True)`` in the book.
    """
    height, width, channels = x.type.shape[1], x.type.shape[2], x.type.shape[3]
    out_h = height // size
    out_w = width // size
    x = x[:, : out_h * size, : out_w * size, :]
    x = x.reshape((-1, out_h, size, out_w, size, channels))
    return x.max(axis=(2, 4))  # (N, out_h, out_w, C)
