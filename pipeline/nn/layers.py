"""The book's three layer types (network3.py): FullyConnected, ConvPool and Softmax; and, beyond the
book, BatchNorm.

Every layer has the same interface:

* the constructor takes the shapes, an activation, a dropout probability, a NumPy ``rng`` and an
  ``init`` choice, and creates its parameters as float32 shared variables;
* ``output(x, deterministic=True, keep=None)`` maps a symbolic input batch to the output batch;
* ``params`` (what SGD updates), ``weights`` (what L2 decays: the weights, not the biases),
  ``statistics`` (values a model keeps that SGD does not train: BatchNorm's population mean and
  variance; empty for the book's layers), ``n_in`` / ``n_out`` (values per example) and ``spec()``
  (the dict that rebuilds the layer).

**Initialisation.** The book draws weights from N(0, 1/n_out) (for a conv layer n_out =
filters*kh*kw/pool**2) and biases from N(0, 1); its own footnote calls the 1/n_out scale a mistake
for 1/n_in. ``init="book"`` (the default, so the chapter 6 numbers are reproduced with the book's
exact recipe) keeps N(0, 1/n_out); ``init="corrected"`` uses N(0, 1/n_in) (n_in = C*kh*kw for a conv
layer). Both keep the book's N(0, 1) biases. The softmax layer starts at zero either way, as the book.

**Dropout.** As the book: during training a layer's *input* is multiplied by a 0/1 ``keep`` mask
(keep probability 1 - p_dropout); at inference the input is left alone and ``W x`` is scaled by
(1 - p_dropout) instead. Inverted dropout (scaling by 1/(1-p) during training) would give the same
expected output; we keep the book's form so its weights mean the same thing. The masks are inputs,
not drawn inside the graph: the trainer draws them with NumPy from the params seed, so a run is
exactly repeatable and resumable on every backend.

Activations flow channels-last: a conv layer reads (N, H, W, C) and writes (N, H', W', F); a fully
connected layer flattens whatever it gets to (N, n_in). Weight arrays are stored in that layout
(conv filters as (kh, kw, C, F), dense weights as (n_in, n_out)). Inside, a conv layer computes
channels-first, (F, N, H', W'), and adds its bias and activation there before its dimshuffle to
channels-last, which the next conv layer's dimshuffle to channels-first cancels
(``pipeline.nn.convolution``).
"""

from __future__ import annotations

import numpy as np

from pipeline.nn import convolution
from pipeline.nn.backend import graph

pt = graph.tensor  # pytensor.tensor or theano.tensor: the engine's environment decides (pipeline.nn.backend)


def conv_pool(x, w, size: int):
    """Valid convolution then max-pooling, x (N, H, W, C) -> (F, N, H', W') channels-first: the
    engine's own where it has faster ones (theano-pymc), else the graph form
    (``pipeline.nn.convolution``)."""
    if graph.conv2d_valid is not None:
        return graph.max_pool(graph.conv2d_valid(x, w), size).dimshuffle(3, 0, 1, 2)
    return convolution.conv_pool_channels_first(x, w, size)


ACTIVATIONS = {
    "sigmoid": graph.sigmoid,
    "tanh": pt.tanh,
    "relu": lambda z: pt.maximum(z, np.float32(0.0)),  # the book's ReLU: T.maximum(0.0, z)
    "linear": lambda z: z,
}
INITS = ("book", "corrected")


def _shared(value: np.ndarray, name: str):
    """A float32 shared variable with a static shape (JAX compiles to fixed shapes)."""
    return graph.shared(np.asarray(value, dtype=np.float32), name)


def _normal(rng: np.random.Generator, shape, variance: float) -> np.ndarray:
    return rng.normal(0.0, np.sqrt(variance), size=shape).astype(np.float32)


def _check(activation: str, p_dropout: float, init: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if not 0.0 <= p_dropout < 1.0:
        raise ValueError(f"p_dropout={p_dropout!r} must be in [0, 1)")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def keep_mask(rng: np.random.Generator, shape: tuple[int, ...], p_dropout: float) -> np.ndarray:
    """A dropout keep mask, uint8 of ``shape``: each input kept with probability 1 - p_dropout, as the
    book's binomial(n=1, p=1-p_dropout), drawn as a uniform float32 that is not below p_dropout."""
    return (rng.random(shape, dtype=np.float32) >= p_dropout).astype(np.uint8)


def _dropped(x, p_dropout: float, deterministic: bool, keep):
    """The input the training graph sees: ``x * keep`` while training with dropout, else ``x``."""
    if deterministic or p_dropout == 0.0:
        return x
    if keep is None:
        raise ValueError("a dropout layer needs its keep mask when deterministic=False")
    return x * keep


def _affine(layer, x, deterministic: bool, keep):
    """``x W + b`` of a dense layer, with the book's dropout: masked inputs in training, outputs
    scaled by (1 - p) at inference."""
    x = x.reshape((-1, layer.n_in))  # (N, n_in)
    x = _dropped(x, layer.p_dropout, deterministic, keep)
    z = pt.dot(x, layer.w)  # (N, n_out)
    if deterministic and layer.p_dropout:
        z = np.float32(1.0 - layer.p_dropout) * z
    return z + layer.b


class FullyConnected:
    """``activation(x W + b)``, with the book's dropout on the input."""

    kind = "fully_connected"
    statistics = ()

    def __init__(
        self,
        n_in: int,
        n_out: int,
        activation: str = "sigmoid",
        p_dropout: float = 0.0,
        *,
        rng: np.random.Generator,
        init: str = "book",
        name: str = "fc",
    ):
        _check(activation, p_dropout, init)
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.activation, self.p_dropout = activation, float(p_dropout)
        fan = self.n_out if init == "book" else self.n_in
        self.w = _shared(_normal(rng, (self.n_in, self.n_out), 1.0 / fan), f"{name}.w")
        self.b = _shared(_normal(rng, (self.n_out,), 1.0), f"{name}.b")
        self.params = [self.w, self.b]
        self.weights = [self.w]

    def preactivation(self, x, *, deterministic: bool = True, keep=None):
        """``x W + b`` (the weighted input z), before the activation."""
        return _affine(self, x, deterministic, keep)

    def output(self, x, *, deterministic: bool = True, keep=None):
        return ACTIVATIONS[self.activation](self.preactivation(x, deterministic=deterministic, keep=keep))

    def spec(self) -> dict:
        return {
            "type": self.kind,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "activation": self.activation,
            "p_dropout": self.p_dropout,
        }


class Softmax:
    """``softmax(x W + b)``, zero-initialised, with the book's dropout on the input."""

    kind = "softmax"
    activation = "softmax"
    statistics = ()

    def __init__(
        self,
        n_in: int,
        n_out: int,
        p_dropout: float = 0.0,
        *,
        rng: np.random.Generator | None = None,
        init: str = "book",
        name: str = "softmax",
    ):
        _check("linear", p_dropout, init)
        self.n_in, self.n_out, self.p_dropout = int(n_in), int(n_out), float(p_dropout)
        self.w = _shared(np.zeros((self.n_in, self.n_out)), f"{name}.w")
        self.b = _shared(np.zeros((self.n_out,)), f"{name}.b")
        self.params = [self.w, self.b]
        self.weights = [self.w]

    def preactivation(self, x, *, deterministic: bool = True, keep=None):
        """The logits ``x W + b``."""
        return _affine(self, x, deterministic, keep)

    def output(self, x, *, deterministic: bool = True, keep=None):
        return graph.softmax(self.preactivation(x, deterministic=deterministic, keep=keep))

    def spec(self) -> dict:
        return {"type": self.kind, "n_in": self.n_in, "n_out": self.n_out, "p_dropout": self.p_dropout}


class ConvPool:
    """Valid convolution, max-pooling, then ``activation(pooled + b)`` (bias after pooling, as the book).

    ``input_shape`` is (channels, height, width), the book's ``image_shape`` without the batch;
    ``filters`` and ``kernel`` give its ``filter_shape`` = (filters, channels, kernel, kernel).
    No dropout: the book applies none to convolutional layers.
    """

    kind = "conv_pool"
    p_dropout = 0.0
    statistics = ()

    def __init__(
        self,
        input_shape,
        filters: int,
        kernel: int = 5,
        pool: int = 2,
        activation: str = "sigmoid",
        *,
        rng: np.random.Generator,
        init: str = "book",
        name: str = "conv",
    ):
        _check(activation, 0.0, init)
        channels, height, width = (int(v) for v in input_shape)
        self.input_shape = (channels, height, width)
        self.filters, self.kernel, self.pool, self.activation = int(filters), int(kernel), int(pool), activation
        conv_h, conv_w = height - self.kernel + 1, width - self.kernel + 1
        if conv_h < self.pool or conv_w < self.pool:
            raise ValueError(f"a {kernel}x{kernel} kernel and {pool}x{pool} pool do not fit a {height}x{width} input")
        self.output_shape = (self.filters, conv_h // self.pool, conv_w // self.pool)
        self.n_in = channels * height * width
        self.n_out = int(np.prod(self.output_shape))
        fan = self.filters * self.kernel**2 / self.pool**2 if init == "book" else channels * self.kernel**2
        self.w = _shared(_normal(rng, (self.kernel, self.kernel, channels, self.filters), 1.0 / fan), f"{name}.w")
        self.b = _shared(_normal(rng, (self.filters,), 1.0), f"{name}.b")
        self.params = [self.w, self.b]
        self.weights = [self.w]

    def output(self, x, *, deterministic: bool = True, keep=None):
        channels, height, width = self.input_shape
        x = x.reshape((-1, height, width, channels))  # (N, H, W, C)
        y = conv_pool(x, self.w, self.pool)  # (F, N, H', W')
        return ACTIVATIONS[self.activation](y + self.b.dimshuffle(0, "x", "x", "x")).dimshuffle(1, 2, 3, 0)

    def spec(self) -> dict:
        return {
            "type": self.kind,
            "input": list(self.input_shape),
            "filters": self.filters,
            "kernel": self.kernel,
            "pool": self.pool,
            "activation": self.activation,
        }


class BatchNorm:
    """Batch normalization (Ioffe and Szegedy 2015), beyond the book: ``activation(gamma * x_hat + beta)``
    with ``x_hat = (x - mean) / sqrt(var + EPSILON)`` per unit of a dense layer's output (``shape`` =
    (units,)) or per channel of a conv layer's (``shape`` = (channels, height, width); the mean and
    variance run over the batch, height and width).

    Put it after a layer with ``activation: linear`` and give it that layer's activation, so the
    normalization comes before the nonlinearity, as the paper does. While training, a batch is
    normalized by its own mean and variance (the gradient flows through both). At inference it is
    normalized by ``mean`` and ``var``, the ``statistics``: SGD does not train them; the trainer sets
    them after every epoch from a pass over training images (``Network.batch_moments``), so they
    describe the network as it is, not an average over the epoch's changing weights.
    """

    kind = "batch_norm"
    p_dropout = 0.0
    EPSILON = np.float32(1e-5)

    def __init__(
        self,
        shape,
        activation: str = "linear",
        *,
        rng: np.random.Generator | None = None,
        init: str = "book",
        name: str = "bn",
    ):
        _check(activation, 0.0, init)
        self.shape = tuple(int(v) for v in shape)
        if len(self.shape) not in (1, 3) or min(self.shape) < 1:
            raise ValueError(
                f"Got shape={list(shape)!r} for a batch_norm layer: expected [units] or "
                "[channels, height, width], positive integers"
            )
        self.activation = activation
        self.n_in = self.n_out = int(np.prod(self.shape))
        units = self.shape[0]  # what is normalized separately: dense units, or conv channels
        self.gamma = _shared(np.ones(units), f"{name}.gamma")
        self.beta = _shared(np.zeros(units), f"{name}.beta")
        self.mean = _shared(np.zeros(units), f"{name}.mean")
        self.var = _shared(np.ones(units), f"{name}.var")
        self.params = [self.gamma, self.beta]
        self.weights = []  # gamma and beta are not decayed, as biases
        self.statistics = [self.mean, self.var]

    def _units_last(self, x):
        """``x`` with the normalized units on the last axis, and the axes the moments run over."""
        if len(self.shape) == 3:
            channels, height, width = self.shape
            return x.reshape((-1, height, width, channels)), (0, 1, 2)  # (N, H, W, C)
        return x.reshape((-1, self.n_in)), (0,)  # (N, units)

    def moments(self, x):
        """The batch's mean and (biased) variance per unit, each (units,)."""
        x, axes = self._units_last(x)
        return pt.mean(x, axis=axes), pt.var(x, axis=axes)

    def normalize(self, x, mean, var):
        """``activation(gamma * (x - mean) / sqrt(var + EPSILON) + beta)``, units last."""
        x, _ = self._units_last(x)
        x_hat = (x - mean) / pt.sqrt(var + self.EPSILON)
        return ACTIVATIONS[self.activation](self.gamma * x_hat + self.beta)

    def output(self, x, *, deterministic: bool = True, keep=None):
        if deterministic:
            return self.normalize(x, self.mean, self.var)
        return self.normalize(x, *self.moments(x))

    def spec(self) -> dict:
        return {"type": self.kind, "shape": list(self.shape), "activation": self.activation}
