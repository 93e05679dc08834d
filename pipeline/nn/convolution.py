"""Convolution and max-pooling written in the PyTensor graph (PyTensor has no CNN convolution Op).

Used by the PyTensor engines (jax, c); theano-pymc has its own ``conv2d`` and ``pool_2d``, which the
layers take instead (``pipeline.nn.theano_engine``).

Activations are channels-last, ``(batch, height, width, channels)``. A valid convolution is one
matrix multiply: the ``kh*kw`` shifted windows of the input are concatenated along the channel axis
("im2col", built from plain slices), then multiplied by the filters reshaped to
``(kh*kw*channels, filters)``. A one-channel input (the image, the first layer) is the exception: its
windows are stacked along a new first axis instead, ``(kh*kw, N*out_h*out_w)``, the product and the
pooling are done channels-first and only the pooled output goes back to channels-last. Its output
positions are taken in the order (row and column within the pooling window, image, pooled row,
pooled column), each window read from the input's rows and columns taken every ``size``-th, so that
the pooling is the elementwise maximum of ``size*size`` contiguous planes (and its gradient a mask
over them) instead of a maximum over two interleaved axes of length 2. Concatenating
25 windows of one channel each along the last axis writes 4 bytes in every 100, and on the CPU that
copy and the product over the resulting (N*576, 25) matrix cost more than the rest of the layer
(``pipeline.benchmarks.train``; docs/engines.md). Autodiff of the dot gives the windows' gradient
product; the filters' gradient is computed filters-first and then laid out as the filters
(``_filtered``), so that XLA does not read the windows transposed for it. The gradient of the
windows themselves is given by hand (``_windows_gradient``) as the sum of each window's gradient
padded back to its place, which XLA fuses into one pass, where autodiff of the slices gives
``kh*kw`` in-place additions run one after another. Both are plain graph ops, so the same graph runs
on every PyTensor backend, and the additions are the same, in the same order. Measured on 2 CPU cores
this form beats a per-offset sum of small dots and a custom Op dispatched to
``jax.lax.conv_general_dilated`` (see ``pipeline.benchmarks.train --conv-lax``).

Like the book's ``conv.conv2d`` these are cross-correlations of the input with the filters, not
flipped-kernel convolutions; with learned, randomly initialised filters the two are the same model.
"""

from __future__ import annotations

import functools

from pipeline.nn.backend import graph

pt = graph.tensor


def conv2d_valid(x, w):
    """Valid cross-correlation: x (N, H, W, C), w (kh, kw, C, F) -> (N, H-kh+1, W-kw+1, F).

    ``x`` and ``w`` must have static shapes for every axis but the batch (JAX compiles to fixed
    shapes, so every size here is a Python int).
    """
    kh, kw, channels, filters = w.type.shape
    height, width = x.type.shape[1], x.type.shape[2]
    out_h = height - kh + 1
    out_w = width - kw + 1
    patches = _patches(x, kh, kw).reshape((-1, kh * kw * channels))  # (N*out_h*out_w, kh*kw*C)
    y = _filtered(patches, w)  # (N*out_h*out_w, F)
    return y.reshape((-1, out_h, out_w, filters))


def _filtered(patches, w):
    """``patches`` (P, kh*kw*C) times the filters ``w`` (kh, kw, C, F), whose gradient is computed
    filters-first, ``gy.T @ patches`` (F, kh*kw*C), then laid out as ``w``. Autodiff's
    ``patches.T @ gy`` makes XLA read the windows (500 columns in the book's second layer) transposed
    in Eigen; this form reads ``gy`` (one column per filter) transposed instead, 1.6-1.8x faster
    (docs/engines.md). XLA folds a plain 2-D transpose of the filters-first product back into the
    old form, hence the reshape and 4-D transpose."""
    from pytensor.compile.builders import OpFromGraph  # here: theano-pymc's environment has no PyTensor

    kh, kw, channels, filters = w.type.shape
    rows, weights = patches.type(), w.type()

    def gradient(inputs, outputs, output_grads):
        (rows, weights), (gy,) = inputs, output_grads
        g_rows = pt.dot(gy, weights.reshape((kh * kw * channels, filters)).T)
        g_weights = pt.dot(gy.T, rows).reshape((filters, kh, kw, channels)).dimshuffle(1, 2, 3, 0)
        return [g_rows, g_weights]

    product = pt.dot(rows, weights.reshape((kh * kw * channels, filters)))
    return OpFromGraph([rows, weights], [product], pullback=gradient, inline=True)(patches, w)


def _windows(x, kh: int, kw: int):
    """(N, H, W, C) -> (N, out_h, out_w, kh*kw*C): the kh*kw shifted windows along the channel axis."""
    out_h, out_w = x.type.shape[1] - kh + 1, x.type.shape[2] - kw + 1
    return pt.concatenate([x[:, i : i + out_h, j : j + out_w, :] for i in range(kh) for j in range(kw)], axis=3)


def _windows_gradient(kh: int, kw: int):
    """The gradient of ``_windows``: each window's part of the output gradient placed back where the
    window was read, in zeros the input's size, and the kh*kw placed parts summed (one pass that XLA
    fuses; autodiff of the slices would give kh*kw in-place additions one after another)."""

    def gradient(inputs, outputs, output_grads):
        (x,), (g,) = inputs, output_grads
        channels = x.type.shape[3]
        zeros = functools.cache(lambda rows, columns: pt.zeros((g.shape[0], rows, columns, channels), dtype=g.dtype))
        parts = [
            _placed(g[:, :, :, k * channels : (k + 1) * channels], x.type.shape, i, j, zeros)
            for k, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw))
        ]
        return [pt.add(*parts)]

    return gradient


def _placed(part, shape, i: int, j: int, zeros):
    """``part`` (N, out_h, out_w, C), a window's gradient, at rows ``i`` and columns ``j`` onward of
    zeros of ``shape``, the input's, joined on by concatenation (``zeros(rows, columns)``: a block of
    them, shared by all the parts). Not ``pt.pad``, which builds a general symbolic graph at each call
    and so slows down compiling every training (docs/engines.md), nor ``set_subtensor`` into zeros,
    which PyTensor rewrites into in-place additions in another order (other weights)."""
    _, height, width, _ = shape
    out_h, out_w = part.type.shape[1], part.type.shape[2]
    below, right = height - out_h - i, width - out_w - j
    column = _joined([zeros(i, out_w)] if i else [], part, [zeros(below, out_w)] if below else [], axis=1)
    return _joined([zeros(height, j)] if j else [], column, [zeros(height, right)] if right else [], axis=2)


def _joined(before: list, middle, after: list, axis: int):
    pieces = [*before, middle, *after]
    return pt.concatenate(pieces, axis=axis) if len(pieces) > 1 else middle


def _patches(x, kh: int, kw: int):
    """``_windows(x, kh, kw)`` with ``_windows_gradient`` as its gradient (inlined: the compiled graph
    holds the same ops)."""
    from pytensor.compile.builders import OpFromGraph  # here: theano-pymc's environment has no PyTensor

    template = x.type()
    op = OpFromGraph([template], [_windows(template, kh, kw)], pullback=_windows_gradient(kh, kw), inline=True)
    return op(x)


def conv_pool(x, w, size: int):
    """``max_pool(conv2d_valid(x, w), size)``: x (N, H, W, C) -> (N, (H-kh+1)//size, (W-kw+1)//size, F).

    One-channel inputs take the channels-first form (module docstring); the result is the same.
    """
    if w.type.shape[2] != 1:
        return max_pool(conv2d_valid(x, w), size)
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
    y = pt.dot(w.reshape((kh * kw, filters)).T, patches).reshape((filters, size * size, -1))
    pooled = y.max(axis=1).reshape((filters, -1, pooled_h, pooled_w))  # the max of size*size planes
    return pooled.dimshuffle(1, 2, 3, 0)  # (N, H', W', F)


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
