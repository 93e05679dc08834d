"""Update rules against NumPy arithmetic."""

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from pipeline.nn import sgd
from pipeline.nn.backend import Backend


def test_sgd_subtracts_eta_times_gradient():
    p = pt.vector("p", dtype="float32")
    g = pt.vector("g", dtype="float32")
    [(param, new)] = sgd.sgd([g], [p], np.float32(0.1))
    assert param is p
    (out,) = Backend("jax").function([p, g], [new])(np.array([1.0, 2.0], np.float32), np.array([0.5, -1.0], np.float32))
    np.testing.assert_allclose(out, [0.95, 2.1], rtol=1e-6)


def test_momentum_two_steps_match_numpy():
    w = pytensor.shared(np.array([1.0, -2.0], np.float32), shape=(2,))
    v = pytensor.shared(np.zeros(2, np.float32), shape=(2,))
    cost = pt.sum(w**2)  # gradient 2w
    updates = sgd.momentum(pt.grad(cost, [w]), [w], [v], np.float32(0.1), 0.9)
    assert [u[0] for u in updates] == [w, v]
    step = Backend("jax").function([], [], updates=updates)
    ref_w, ref_v = np.array([1.0, -2.0]), np.zeros(2)
    for _ in range(2):
        step()
        ref_v = 0.9 * ref_v - 0.1 * 2 * ref_w
        ref_w = ref_w + ref_v
    np.testing.assert_allclose(w.get_value(), ref_w, rtol=1e-6)
    np.testing.assert_allclose(v.get_value(), ref_v, rtol=1e-6)
    assert ref_w[0] == pytest.approx(0.46)  # by hand: v=-0.2, w=0.8; v=0.9*-0.2-0.1*1.6=-0.34, w=0.46
