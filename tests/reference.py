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
