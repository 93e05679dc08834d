"""A network: a stack of layers, its costs, L2 weight decay, predictions and accuracy (network3.py's Network).

Inputs are batches of flattened images as float32 in [0, 1], shape (N, 784); labels are integers.
The graphs built here are symbolic and backend-free; ``pipeline.nn.backend`` compiles them.

Costs (mean over the mini-batch):

* ``log-likelihood``: -log p(y|x) of a softmax output (network3.py, chapter 6);
* ``cross-entropy``: sum_j -y_j log a_j - (1 - y_j) log(1 - a_j) of a sigmoid output (chapter 3);
* ``quadratic``: 0.5 * ||a - y||^2 of any output (chapter 1's network.py).

The training objective adds the book's L2 term exactly as network3.py writes it:
``0.5 * lmbda * sum(W**2) / num_training_batches``. (network2.py's ``lmbda / (2 n)`` is smaller by
the mini-batch size: network2's lmbda = 5.0 with batches of 10 is network3's lmbda = 0.5.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.nn.backend import graph
from pipeline.nn.layers import BatchNorm, ConvPool, FullyConnected, Softmax

pt = graph.tensor  # pytensor.tensor or theano.tensor (pipeline.nn.backend)
COSTS = ("log-likelihood", "cross-entropy", "quadratic")


class Network:
    """Layers applied in order; ``params`` concatenates the layers' parameters in that order, and
    ``statistics`` their untrained values (BatchNorm's mean and variance)."""

    def __init__(self, layers: Sequence):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("a network needs at least one layer")
        for i in range(1, len(self.layers)):
            before, layer = self.layers[i - 1], self.layers[i]
            if layer.n_in != before.n_out:
                raise ValueError(
                    f"layer {i} ({layer.kind}) takes {layer.n_in} inputs but layer {i - 1} ({before.kind}) "
                    f"outputs {before.n_out}"
                )
        self.params = [p for layer in self.layers for p in layer.params]
        self.weights = [w for layer in self.layers for w in layer.weights]
        self.statistics = [s for layer in self.layers for s in layer.statistics]
        # Layers that drop inputs while training; each needs a keep mask of shape (batch, layer.n_in).
        self.dropout_layers = [i for i, layer in enumerate(self.layers) if layer.p_dropout > 0]
        self.n_in = self.layers[0].n_in
        self.n_out = self.layers[-1].n_out

    # -- forward ---------------------------------------------------------------------------------
    def _hidden(self, x, deterministic: bool, keeps):
        """Run every layer but the last; returns the last layer's input."""
        keeps = self._keep_map(deterministic, keeps)
        for i, layer in enumerate(self.layers[:-1]):
            x = layer.output(x, deterministic=deterministic, keep=keeps.get(i))
        return x, keeps.get(len(self.layers) - 1)

    def _keep_map(self, deterministic: bool, keeps) -> dict:
        if deterministic or not self.dropout_layers:
            return {}
        if keeps is None or len(keeps) != len(self.dropout_layers):
            raise ValueError(f"training with dropout needs {len(self.dropout_layers)} keep masks, got {keeps!r}")
        return dict(zip(self.dropout_layers, keeps))

    def output(self, x, *, deterministic: bool = True, keeps=None):
        """The last layer's activations (class probabilities for a softmax network), (N, n_out)."""
        h, keep = self._hidden(x, deterministic, keeps)
        return self.layers[-1].output(h, deterministic=deterministic, keep=keep)

    def batch_moments(self, x):
        """Each BatchNorm layer's mean and variance over the batch ``x``: [mean, var, mean, var, ...] in
        ``statistics`` order. The other layers run as at inference (no dropout); each BatchNorm layer
        normalizes by the moments it just measured, so with a large batch every layer sees what it
        will see at inference once its statistics are set."""
        moments = []
        for layer in self.layers:
            if not layer.statistics:
                x = layer.output(x, deterministic=True)
                continue
            mean, var = layer.moments(x)
            moments += [mean, var]
            x = layer.normalize(x, mean, var)
        return moments

    # -- costs -----------------------------------------------------------------------------------
    def check_cost(self, cost: str) -> None:
        """Refuse a cost that does not fit the output layer (raises ValueError)."""
        last = self.layers[-1]
        if cost not in COSTS:
            raise ValueError(f"unknown cost {cost!r}; choose one of {', '.join(COSTS)}")
        if cost == "log-likelihood" and not isinstance(last, Softmax):
            raise ValueError(
                f"cost log-likelihood needs a softmax output layer, but the last layer is {last.kind} "
                f"({last.activation}); use cross-entropy or quadratic for a sigmoid output"
            )
        if cost == "cross-entropy" and not (isinstance(last, FullyConnected) and last.activation == "sigmoid"):
            raise ValueError(
                f"cost cross-entropy needs a sigmoid fully_connected output layer, but the last layer is "
                f"{last.kind} ({last.activation}); use log-likelihood for a softmax output"
            )

    def cost(self, x, y, *, cost: str = "log-likelihood", deterministic: bool = False, keeps=None):
        """The data cost of a batch: a float32 scalar (mean over the batch)."""
        self.check_cost(cost)
        h, keep = self._hidden(x, deterministic, keeps)
        last = self.layers[-1]
        onehot = pt.eq(y.dimshuffle(0, "x"), pt.arange(self.n_out).dimshuffle("x", 0))  # (N, n_out) bool
        if cost == "log-likelihood":
            log_p = graph.log_softmax(last.preactivation(h, deterministic=deterministic, keep=keep))
            per_example = -pt.sum(pt.switch(onehot, log_p, np.float32(0.0)), axis=1)
        elif cost == "cross-entropy":
            # -log(sigmoid(z)) = softplus(-z) and -log(1 - sigmoid(z)) = softplus(z): finite when saturated
            z = last.preactivation(h, deterministic=deterministic, keep=keep)
            per_example = pt.sum(pt.switch(onehot, graph.softplus(-z), graph.softplus(z)), axis=1)
        else:
            a = last.output(h, deterministic=deterministic, keep=keep)
            per_example = np.float32(0.5) * pt.sum(pt.sqr(a - pt.cast(onehot, a.dtype)), axis=1)
        return pt.mean(per_example)

    def objective(self, x, y, *, cost: str, lmbda: float, num_training_batches: int, keeps=None):
        """What SGD minimises: data cost (dropout on) + 0.5*lmbda*||W||^2/num_training_batches."""
        data = self.cost(x, y, cost=cost, deterministic=False, keeps=keeps)
        if lmbda == 0:
            return data
        return data + self.l2_penalty(self.weights, lmbda, num_training_batches)

    @staticmethod
    def l2_penalty(weights, lmbda: float, num_training_batches: int):
        """The objective's L2 term for ``weights``: 0.5*lmbda*||W||^2/num_training_batches."""
        return np.float32(0.5 * lmbda / num_training_batches) * sum(pt.sum(pt.sqr(w)) for w in weights)

    # -- parameters ------------------------------------------------------------------------------
    def _values(self) -> list:
        """What a saved model holds: the parameters, then the statistics."""
        return [*self.params, *self.statistics]

    def get_values(self) -> list[np.ndarray]:
        """Copies of the parameters and statistics as float32 NumPy arrays, in ``param_names`` order."""
        return [np.array(p.get_value(), dtype=np.float32) for p in self._values()]

    def set_values(self, values: Sequence[np.ndarray]) -> None:
        targets = self._values()
        if len(values) != len(targets):
            raise ValueError(f"expected {len(targets)} arrays, got {len(values)}")
        for p, v in zip(targets, values):
            v = np.asarray(v, dtype=np.float32)
            shape = p.get_value(borrow=True).shape
            if v.shape != shape:
                raise ValueError(f"parameter {p.name} has shape {shape}, got an array of shape {v.shape}")
            p.set_value(v)

    def param_names(self) -> list[str]:
        """The names of ``get_values``' arrays (``layer{i}.w``, ``layer{i}.mean``, ...)."""
        return [p.name for p in self._values()]

    def spec(self) -> list[dict]:
        """The layer dicts that rebuild this architecture (see ``pipeline.nn.architecture``)."""
        return [layer.spec() for layer in self.layers]

    def count_params(self) -> int:
        """The number of trained values (statistics not included)."""
        return int(sum(p.get_value(borrow=True).size for p in self.params))

    def training_flops(self) -> float:
        """Floating-point operations of one SGD step per image: 2 x the multiply-adds of the forward
        pass, of the weight gradients (as many) and of the input gradients (as many, but none for the
        first layer, whose input is the image). Biases, pooling and activations are left out."""
        macs = []
        for layer in self.layers:
            if hasattr(layer, "kernel"):  # conv: every output position is a kernel x kernel x channels dot
                channels = layer.input_shape[0]
                conv_h, conv_w = (size - layer.kernel + 1 for size in layer.input_shape[1:])
                macs.append(conv_h * conv_w * layer.filters * layer.kernel**2 * channels)
            elif hasattr(layer, "w"):
                macs.append(layer.n_in * layer.n_out)
        return 2.0 * (3 * sum(macs) - macs[0])


__all__ = ["COSTS", "Network", "BatchNorm", "ConvPool", "FullyConnected", "Softmax"]
