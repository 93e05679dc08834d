"""Plain NumPy (float64) references for the layers; NumPy only, so both engines' environments import it."""

import numpy as np


def np_conv(x, w):
    """Direct loops: x (N,H,W,C), w (kh,kw,C,F) -> (N,H-kh+1,W-kw+1,F), a cross-correlation as the book's."""
    kh, kw, _, f = w.shape
    n, h, wd, _ = x.shape
    out = np.zeros((n, h - kh + 1, wd - kw + 1, f))
    for i in range(h - kh + 1):
        for j in range(wd - kw + 1):
            out[:, i, j, :] = np.einsum("nabc,abcf->nf", x[:, i : i + kh, j : j + kw, :], w)
    return out


def np_pool(x, s):
    """Max over non-overlapping s x s windows, taken one window offset at a time (no reshape trick)."""
    n, h, w, c = x.shape
    oh, ow = h // s, w // s
    out = np.full((n, oh, ow, c), -np.inf)
    for a in range(s):
        for b in range(s):
            out = np.maximum(out, x[:, a : oh * s : s, b : ow * s : s, :][:, :oh, :ow])
    return out


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_batch_norm(x, gamma, beta, mean=None, var=None, eps=1e-5):
    """Batch normalization of x (..., units) per unit (the last axis): by the batch's own mean and
    biased variance over every other axis, or by the given ``mean`` and ``var``."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes) if mean is None else mean
    var = x.var(axis=axes) if var is None else var
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def np_shift(images, dy, dx):
    """(N, 28, 28) images moved dy pixels down and dx right, zeros coming in: a one-pixel zero border,
    then the 28x28 window that starts dy rows above and dx columns left of the original one."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))  # (N, 30, 30)
    return padded[:, 1 - dy : 29 - dy, 1 - dx : 29 - dx]


def python_vote(probabilities):
    """pipeline.evaluation.ensemble's plurality vote, one image at a time in plain Python: most votes, then most
    summed probability, then the lowest digit. ``probabilities``: (networks, images, classes)."""
    networks, images, _ = probabilities.shape
    answers = probabilities.argmax(axis=2)
    chosen = []
    for image in range(images):
        counts = [int(np.sum(answers[:, image] == d)) for d in range(10)]
        tied = [d for d in range(10) if counts[d] == max(counts)]
        chosen.append(max(tied, key=lambda d: (probabilities[:, image, d].sum(), -d)))
    return np.array(chosen)


def numpy_momentum_sgd(values, images, labels, keeps, *, eta, mu, lmbda, batches):
    """The book's momentum SGD with L2 and dropout on tanh -> softmax, in float64 over whole mini-batches."""
    w1, b1, w2, b2 = (v.astype(np.float64) for v in values)
    params, velocities, costs = [w1, b1, w2, b2], [np.zeros_like(v) for v in values], []
    for x_u8, y, keep0, keep1 in zip(images, labels, *keeps):
        w1, b1, w2, b2 = params
        a0 = x_u8 / 255.0 * keep0
        h = np.tanh(a0 @ w1 + b1)
        a1 = h * keep1
        z = a1 @ w2 + b2
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        decay = lmbda / batches
        costs.append(-log_p[np.arange(len(y)), y].mean() + 0.5 * decay * ((w1**2).sum() + (w2**2).sum()))
        dz = (np.exp(log_p) - np.eye(z.shape[1])[y]) / len(y)
        dz1 = (dz @ w2.T) * keep1 * (1 - h**2)
        grads = [a0.T @ dz1 + decay * w1, dz1.sum(axis=0), a1.T @ dz + decay * w2, dz.sum(axis=0)]
        velocities = [mu * v - eta * g for v, g in zip(velocities, grads)]
        params = [p + v for p, v in zip(params, velocities)]
    return params, np.array(costs)


def check_trainer_against_numpy_sgd(trainer, rng, *, steps: int = 3):
    """Train ``trainer`` (a 12-6-4 network with dropout on both layers, momentum 0.9, lmbda 0.5 over 10
    batches) on ``steps`` random mini-batches whose dropout masks differ from image to image, so that
    a device or a chunk given another's masks fails; its costs and weights must be those of
    ``numpy_momentum_sgd`` on the whole mini-batches."""
    net, batch = trainer.network, trainer.batch_size
    images = rng.integers(0, 256, (steps, batch, 12), dtype=np.uint8)
    labels = rng.integers(0, 4, (steps, batch)).astype(np.uint8)
    keeps = [(rng.random((steps, batch, n)) > 0.5).astype(np.uint8) for n in (12, 6)]
    start = net.get_values()

    costs = trainer.train_steps(images, labels, keeps, 0.2)

    expected, expected_costs = numpy_momentum_sgd(start, images, labels, keeps, eta=0.2, mu=0.9, lmbda=0.5, batches=10)
    np.testing.assert_allclose(costs, expected_costs, rtol=1e-5)
    for name, got, want in zip(net.param_names(), net.get_values(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
