"""Update rules as pure functions (in the style of Lasagne's ``updates.py``).

Each takes the gradients and the current parameter variables (shared variables, or the state
variables of a scan) and returns a list of ``(variable, new_value)`` pairs; it changes nothing.
The learning-rate schedule and early stopping are decided per epoch by the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sgd(grads: Sequence, params: Sequence, eta) -> list[tuple]:
    """The book's plain mini-batch SGD: ``param <- param - eta * grad``."""
    return [(p, p - eta * g) for p, g in zip(params, grads)]


def momentum(grads: Sequence, params: Sequence, velocities: Sequence, eta, mu: float) -> list[tuple]:
    """Momentum SGD as the book's chapter 3 describes it: ``v <- mu v - eta grad``; ``param <- param + v``.

    Returns the new parameters first, then the new velocities (same order as the inputs).
    """
    mu = np.float32(mu)
    new_velocities = [mu * v - eta * g for v, g in zip(velocities, grads)]
    return [(p, p + v) for p, v in zip(params, new_velocities)] + list(zip(velocities, new_velocities))
