"""A convolution Op that JAX lowers to ``jax.lax.conv_general_dilated`` (benchmark comparison only).

Same contract as ``pipeline.nn.convolution.conv2d_valid``: x (N, H, W, C), w (kh, kw, C, F), valid
cross-correlation. Its gradients are the same Op on padded/transposed arguments. Measured slower
than the im2col graph on CPU (XLA's CPU convolution is slow for these shapes), so the pipeline
does not use it; ``python -m pipeline.benchmarks.train --conv-lax`` reproduces the comparison.
It has no C/Python implementation: JAX engine only.
"""

from __future__ import annotations

import pytensor.tensor as pt
from pytensor.graph import Apply, Op
from pytensor.link.jax.dispatch import jax_funcify


class Corr2dLax(Op):
    __props__ = ()

    def make_node(self, x, w):
        x, w = pt.as_tensor_variable(x), pt.as_tensor_variable(w)
        (n, h, wd, _), (kh, kw, _, f) = x.type.shape, w.type.shape
        out = pt.tensor(dtype=x.dtype, shape=(n, h - kh + 1, wd - kw + 1, f))
        return Apply(self, [x, w], [out])

    def perform(self, node, inputs, outputs):
        raise NotImplementedError("Corr2dLax runs on the JAX engine only")

    def pullback(self, inputs, outputs, output_grads):
        x, w = inputs
        (gy,) = output_grads
        kh, kw = w.type.shape[0], w.type.shape[1]
        gy_padded = pt.pad(gy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
        gx = corr2d_lax(gy_padded, w[::-1, ::-1].dimshuffle(0, 1, 3, 2))  # full correlation with flipped filters
        gw = corr2d_lax(x.dimshuffle(3, 1, 2, 0), gy.dimshuffle(1, 2, 0, 3)).dimshuffle(1, 2, 0, 3)
        return [gx, gw]


corr2d_lax = Corr2dLax()


def conv2d_lax(x, w):
    return corr2d_lax(x, w)


@jax_funcify.register(Corr2dLax)
def _jax_corr2d(op, **kwargs):
    import jax

    def corr2d(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return corr2d
