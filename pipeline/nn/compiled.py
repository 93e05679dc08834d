"""Compiled training and inference functions for one network on one backend.

The book calls a compiled Theano function once per mini-batch of 10; at that size the per-call
overhead costs more than the arithmetic. Here one call runs K SGD steps: a ``scan`` over
K mini-batches carries the parameters (and momentum velocities) from step to step and writes them
back to the shared variables at the end. Images travel as uint8 and become float32 in [0, 1] inside
the graph, one mini-batch at a time, so a 250,000-image training set stays 196 MB of uint8.

Dropout keep masks are inputs (uint8, one per dropout layer and step) drawn by the caller with
NumPy, so a run is the same on every engine and can be resumed exactly.

On the CPU, with the JAX engine, the devices (one per core) share each mini-batch: each computes the
gradient of its share of the images, and one sum over the devices (``pipeline.nn.data_parallel``)
gives every device the mini-batch's gradient, where that sum (one value per parameter) is small
against a device's share of the step (``training_shards``: the convolutional nets with small dense
layers; not the dense-only nets, nor FC 1000 layers). A device's share of 16 images or more is cut
into the smallest chunks of 8 to 16 images that divide it, where one does (``gradient_chunk``): an
inner ``scan`` sums the chunks' gradients, so each chunk's convolution windows stay in the caches
while they are used, but for the dense layers' weight matrices: the scan keeps their inputs and
output gradients, and one product after it gives each matrix's gradient (docs/engines.md). Both
sums are the mini-batch's gradient in another order of addition, the same within float rounding. A network
with BatchNorm is neither shared nor cut: its batch statistics are over the whole mini-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.nn import sgd
from pipeline.nn.backend import Backend, graph
from pipeline.nn.network import Network

pt = graph.tensor  # pytensor.tensor or theano.tensor (pipeline.nn.backend)

IMAGE_SCALE = np.float32(1.0 / 255.0)
# Inference batches (validation, evaluation, serving), per device: on the CPU a small batch keeps the
# convolution windows in the caches (on 2 cores, 40 images a CPU device); a GPU wants large ones
# (docs/engines.md has the measurements).
INFERENCE_BATCH = {"cpu": 80, "gpu": 500}
# Inference batches per compiled call where there are that many: a scan runs them one after another,
# so that scoring a validation set takes a few calls, not one per batch (docs/engines.md).
INFERENCE_CALL_BATCHES = 25
# The largest chunk of a training mini-batch, per (engine, device); unlisted ones are never cut. Chunks
# are as small as half of it: small enough that their convolution windows stay in a core's cache, large
# enough to pay for a chunk's own work (docs/engines.md has the measurements).
CHUNK_LIMIT = {("jax", "cpu"): 16}


def gradient_chunk(batch_size: int, limit: int | None) -> int:
    """The images per chunk of a mini-batch of ``batch_size``: the smallest divisor of the batch from
    ``limit // 2`` to ``limit``, so that a chunk's windows stay in a core's cache, the batch itself when
    it has none (smaller chunks cost more than they save) or when ``limit`` is None."""
    if limit is None:
        return batch_size
    divisors = [size for size in range(limit // 2, limit + 1) if batch_size % size == 0]
    return divisors[0] if divisors else batch_size


def _products_of(output, matrices) -> list[tuple]:
    """For each of ``matrices``, ``(x, x @ w)``: the product that multiplies by it in the graph of
    ``output`` (a dense layer's weighted input, before its bias), found in the graph."""
    from pytensor.graph.traversal import graph_inputs, io_toposort  # here: only chunked JAX trainings come here
    from pytensor.tensor.math import Dot

    found = {id(w): [] for w in matrices}
    for node in io_toposort(list(graph_inputs([output])), [output]):
        if isinstance(node.op, Dot) and id(node.inputs[1]) in found:
            found[id(node.inputs[1])].append((node.inputs[0], node.outputs[0]))
    for w in matrices:
        if len(found[id(w)]) != 1:
            raise ValueError(f"expected one product by {w.name} in the training graph, found {len(found[id(w)])}")
    return [found[id(w)][0] for w in matrices]


def _transposed_copy(matrix):
    """``matrix`` (rows, columns) as (columns, rows), by a transpose of three axes, which XLA copies. A
    2-D transpose it would fold into the product that follows, as a product contracted over its left
    operand's first axis, which its CPU runtime leaves to Eigen, slower (docs/engines.md)."""
    rows, columns = matrix.type.shape
    return matrix.reshape((rows, columns, 1)).dimshuffle(1, 0, 2).reshape((columns, rows))


def shards_for(batch_size: int, devices: int) -> int:
    """How many devices share a mini-batch of ``batch_size`` (``pipeline.nn.data_parallel``): the most,
    up to ``devices``, that divide it evenly (1: the whole mini-batch on one device)."""
    return max(d for d in range(1, max(devices, 1) + 1) if batch_size % d == 0)


# Sharing a training mini-batch pays only where each device's part of a step is large against the
# sum that joins the devices' gradients, one value per parameter (docs/engines.md: the measurements)
SHARD_MIN_FLOPS_PER_PARAMETER = 150


def training_shards(network: Network, batch_size: int, devices: int) -> int:
    """How many devices share a training mini-batch of ``batch_size``: the most, up to ``devices``,
    that divide it evenly and leave each at least ``SHARD_MIN_FLOPS_PER_PARAMETER`` floating-point
    operations per parameter of the step; 1 for a network with BatchNorm (its statistics are the
    whole mini-batch's)."""
    if network.statistics:
        return 1
    work, limit = network.training_flops() * batch_size, SHARD_MIN_FLOPS_PER_PARAMETER * network.count_params()
    return max(d for d in range(1, max(devices, 1) + 1) if batch_size % d == 0 and (d == 1 or work / d >= limit))


def _sharding(devices: int, inputs: int, axis: int, outputs: bool):
    """A ``pipeline.nn.data_parallel.Sharding``, or None for one device."""
    if devices == 1:
        return None
    from pipeline.nn.data_parallel import Sharding  # here: theano-pymc's environment has no JAX

    return Sharding(devices, inputs, axis, outputs)


def as_float_images(images: np.ndarray) -> np.ndarray:
    """Flatten a batch of images to float32 (N, n_in) in [0, 1]: uint8 is divided by 255, floats kept."""
    images = np.asarray(images)
    flat = images.reshape(len(images), -1)
    if flat.dtype == np.uint8:
        return flat.astype(np.float32) * IMAGE_SCALE
    return flat.astype(np.float32, copy=False)


class Trainer:
    """``train_steps`` (K SGD steps in one call) and ``probabilities`` (inference) for ``network``."""

    def __init__(
        self,
        network: Network,
        backend: Backend,
        *,
        batch_size: int,
        cost: str = "log-likelihood",
        lmbda: float = 0.0,
        num_training_batches: int = 1,
        momentum: float = 0.0,
        eval_batch_size: int = 500,
    ):
        network.check_cost(cost)
        self.network, self.backend = network, backend
        self.batch_size, self.cost, self.lmbda = batch_size, cost, lmbda
        self.num_training_batches, self.momentum = num_training_batches, momentum
        self.eval_batch_size = eval_batch_size
        self.velocities = (
            [graph.shared(np.zeros_like(p.get_value(borrow=True)), f"{p.name}.velocity") for p in network.params]
            if momentum
            else []
        )
        self.shards = training_shards(network, batch_size, backend.cpu_devices)
        # BatchNorm's statistics are over the whole mini-batch: such a network is not cut either
        limit = None if network.statistics else CHUNK_LIMIT.get((backend.engine, backend.device))
        self.chunk = gradient_chunk(batch_size // self.shards, limit)
        self._train_fns: dict = {}
        self._moments_fn = None
        self.inference = Inference(network, backend)

    # -- training --------------------------------------------------------------------------------
    def _compile_train(self, steps: int | None):
        net, bs = self.network, self.batch_size
        n_params, n_drop = len(net.params), len(net.dropout_layers)
        images = bs // self.shards  # the graph is one device's: it sees its share of each mini-batch
        xs = graph.variable("images", "uint8", (steps, images, net.n_in))  # (K, bs, 784)
        ys = graph.variable("labels", "uint8", (steps, images))  # (K, bs)
        keeps = [
            graph.variable(f"keep{i}", "uint8", (steps, images, net.layers[i].n_in)) for i in net.dropout_layers
        ]  # (K, bs, n_in) each
        eta = pt.scalar("eta", dtype="float32")

        def step(x_u8, y, *rest):
            keep_now, state, eta_now = rest[:n_drop], rest[n_drop:-1], rest[-1]
            params_now, velocities_now = state[:n_params], state[n_params:]
            objective, grads = self._gradients(x_u8, y, keep_now, params_now)
            if self.momentum:
                updates = sgd.momentum(grads, params_now, velocities_now, eta_now, self.momentum)
            else:
                updates = sgd.sgd(grads, params_now, eta_now)
            return [new for _, new in updates] + [objective]

        outputs = graph.scan(
            step, sequences=[xs, ys, *keeps], outputs_info=[*net.params, *self.velocities, None], non_sequences=[eta]
        )
        finals = [out[-1] for out in outputs[:-1]]
        costs = outputs[-1]  # (K,)
        updates = list(zip([*net.params, *self.velocities], finals))
        return self.backend.function(
            [xs, ys, *keeps, eta], [costs], updates=updates, sharding=_sharding(self.shards, 2 + n_drop, 1, False)
        )

    def _gradients(self, x_u8, y, keeps, params):
        """The objective of one mini-batch and its gradients at ``params``, summed over the devices
        that share the mini-batch (``self.shards``)."""
        objective, grads = self._device_gradients(x_u8, y, keeps, params)
        if self.shards == 1:
            return objective, grads
        from pipeline.nn.data_parallel import device_sum  # here: theano-pymc's environment has no JAX

        # one sum of everything: each sum makes the devices wait for one another
        total = device_sum(pt.concatenate([objective.reshape((1,)), *(g.ravel() for g in grads)]))
        ends = np.cumsum([1, *(int(np.prod(p.type.shape)) for p in params)])
        return total[0], [total[a:b].reshape(p.shape) for a, b, p in zip(ends[:-1], ends[1:], params)]

    def _device_gradients(self, x_u8, y, keeps, params):
        """One device's share of the objective and gradients: over its images in one piece, or as
        the sums over their chunks of ``self.chunk`` images (an inner scan, one after another). A dense
        layer's weight gradient is not summed chunk by chunk: the scan keeps each chunk's inputs to
        the layer's product and the objective's gradient at its output, and one product of all the
        chunks' makes the gradient after it (docs/engines.md)."""
        parts = self.batch_size // self.shards // self.chunk
        if parts == 1:
            objective, grads, _ = self._objective_and_gradients(x_u8, y, keeps, params, self.shards)
            return objective, grads
        net, n_drop = self.network, len(keeps)
        dense = [i for i, p in enumerate(net.params) if p.type.ndim == 2 and any(p is w for w in net.weights)]
        summed = [i for i in range(len(params)) if i not in dense]

        def chunk_step(x_chunk, y_chunk, *rest):
            keep_chunk, sums, params_now = (
                rest[:n_drop],
                rest[n_drop : n_drop + len(summed)],
                rest[n_drop + len(summed) :],
            )
            objective, grads, products = self._objective_and_gradients(
                x_chunk, y_chunk, keep_chunk, params_now, parts * self.shards, dense=dense
            )
            return [total + grad for total, grad in zip(sums, grads)] + [objective] + products

        def split(v):
            return v.reshape((parts, self.chunk, *v.type.shape[1:]))

        outputs = graph.scan(
            chunk_step,
            sequences=[split(x_u8), split(y), *map(split, keeps)],
            outputs_info=[*(pt.zeros_like(params[i]) for i in summed), None, *([None] * 2 * len(dense))],
            non_sequences=list(params),
        )
        sums, objective, products = outputs[: len(summed)], outputs[len(summed)], outputs[len(summed) + 1 :]
        grads = dict(zip(summed, (total[-1] for total in sums)))
        decay = self._weight_decay([params[i] for i in dense])
        for k, i in enumerate(dense):
            inputs, output_grads = (
                v.reshape((parts * self.chunk, v.type.shape[-1])) for v in products[2 * k : 2 * k + 2]
            )
            grads[i] = pt.dot(_transposed_copy(inputs), output_grads) + decay[k]
        return objective.sum(), [grads[i] for i in range(len(params))]

    def _weight_decay(self, weights):
        """The L2 term's gradient at ``weights`` (zeros without one), a device's share of it."""
        if not self.lmbda:
            return [pt.zeros_like(w) for w in weights]
        penalty = self.network.l2_penalty(weights, self.lmbda, self.num_training_batches) / np.float32(self.shards)
        return graph.grad(penalty, list(weights))

    def _objective_and_gradients(self, x_u8, y, keeps, params, parts: int, dense: Sequence[int] = ()):
        """The objective of ``parts``-th of a mini-batch (the images ``x_u8``, uint8) and its gradients,
        at ``params``: divided by ``parts``, so that the parts' sums are the mini-batch's. With
        ``dense`` (indices of dense weight matrices in ``params``): the gradients of the other
        parameters, without the L2 term's part for those matrices, and for each matrix its product's
        input and the gradient at its output, [x, d objective / d (x @ w), ...]."""
        net = self.network
        x = pt.cast(x_u8, "float32") * IMAGE_SCALE  # (images, 784) in [0, 1]
        masks = [pt.cast(k, "float32") for k in keeps]
        objective = net.objective(
            x, y, cost=self.cost, lmbda=self.lmbda, num_training_batches=self.num_training_batches, keeps=masks
        )
        if parts > 1:
            objective = objective / np.float32(parts)
        matrices = [net.params[i] for i in dense]
        products = _products_of(objective, matrices) if matrices else []  # [(x, x @ w)] per matrix
        others = [p for i, p in enumerate(net.params) if i not in dense]
        grads = graph.grad(objective, [*others, *(z for _, z in products)])
        taken = [
            *grads[: len(others)],
            *(v for (x_in, _), gz in zip(products, grads[len(others) :]) for v in (x_in, gz)),
        ]
        # The graph was built on the shared parameters; run it on this step's state instead.
        objective, *taken = graph.clone_replace([objective, *taken], replace=dict(zip(net.params, params)))
        return objective, taken[: len(others)], taken[len(others) :]

    def train_steps(
        self, images: np.ndarray, labels: np.ndarray, keeps: Sequence[np.ndarray], eta: float
    ) -> np.ndarray:
        """Run one SGD step per mini-batch: images uint8 (K, bs, n_in), labels (K, bs), keeps uint8
        (K, bs, n_in) per dropout layer. Updates the network's parameters; returns the K step costs."""
        steps = len(images)
        key = steps if self.backend.static_shapes else None
        if key not in self._train_fns:
            self._train_fns[key] = self._compile_train(key)
        (costs,) = self._train_fns[key](images, labels.astype(np.uint8, copy=False), *keeps, np.float32(eta))
        return costs

    def set_statistics(self, images: np.ndarray) -> None:
        """Set every BatchNorm layer's mean and variance to those of its input over ``images``,
        measured in batches of ``eval_batch_size`` (fewer if there are fewer images; a last partial
        batch is left out) by ``Network.batch_moments``. Nothing to do for a network without BatchNorm."""
        net = self.network
        if not net.statistics:
            return
        if self._moments_fn is None:
            if len(images) == 0:
                raise ValueError("setting the batch-norm statistics needs images, got none")
            self._moments_batch = min(self.eval_batch_size, len(images))
            x = graph.variable("x", "float32", (self._moments_batch, net.n_in))
            self._moments_fn = self.backend.function([x], net.batch_moments(x))
        batch = self._moments_batch
        n_batches = len(images) // batch
        if n_batches == 0:
            raise ValueError(f"setting the batch-norm statistics needs at least {batch} images, got {len(images)}")
        batches = [
            self._moments_fn(as_float_images(images[start : start + batch]))
            for start in range(0, n_batches * batch, batch)
        ]
        values = []
        for i in range(0, len(net.statistics), 2):
            means = np.stack([moments[i] for moments in batches]).astype(np.float64)  # (n_batches, units)
            variances = np.stack([moments[i + 1] for moments in batches]).astype(np.float64)
            # over all the images: the mean within-batch variance plus the variance of the batch means
            values += [means.mean(axis=0), variances.mean(axis=0) + means.var(axis=0)]
        for statistic, value in zip(net.statistics, values, strict=True):
            statistic.set_value(value.astype(np.float32))

    def velocity_values(self) -> list[np.ndarray]:
        return [np.array(v.get_value(), dtype=np.float32) for v in self.velocities]

    def set_velocity_values(self, values: Sequence[np.ndarray]) -> None:
        for v, value in zip(self.velocities, values, strict=True):
            v.set_value(np.asarray(value, dtype=np.float32))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return self.inference.accuracy(images, labels)


class Inference:
    """The network's outputs at inference (no dropout) for any number of images."""

    def __init__(self, network: Network, backend: Backend, *, batch_size: int | None = None):
        """``batch_size``: the images of a batch, shared among the CPU devices (a compiled call runs
        ``INFERENCE_CALL_BATCHES`` batches, or one); None: the device's ``INFERENCE_BATCH``."""
        self.network, self.backend = network, backend
        self.batch_size = INFERENCE_BATCH[backend.device] if batch_size is None else batch_size
        self.shards = shards_for(self.batch_size, backend.cpu_devices)  # each image is scored on its own
        self._fns: dict[int, object] = {}

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Outputs (class probabilities for a softmax network), float32 (N, n_out).

        ``images``: uint8 (values 0-255) or float (already in [0, 1]), shape (N, 28, 28) or (N, 784).
        Runs in calls of ``INFERENCE_CALL_BATCHES`` batches while that many are left, then of one
        batch, the last one padded with zeros, so JAX compiles two programs at most.
        """
        n, batch = len(images), self.batch_size
        out = np.empty((n, self.network.n_out), dtype=np.float32)
        start = 0
        while start < n:
            batches = INFERENCE_CALL_BATCHES if n - start >= INFERENCE_CALL_BATCHES * batch else 1
            x = as_float_images(images[start : start + batches * batch])
            real = len(x)
            if real < batches * batch:
                x = np.concatenate([x, np.zeros((batches * batch - real, x.shape[1]), dtype=np.float32)])
            (p,) = self._function(batches)(x.reshape(batches, batch, -1))
            out[start : start + real] = p.reshape(batches * batch, -1)[:real]
            start += real
        return out

    def _function(self, batches: int):
        """The compiled outputs of ``batches`` batches, (batches, batch, n_in) -> (batches, batch, n_out):
        a scan over them, each batch shared among the devices."""
        if batches not in self._fns:
            net = self.network
            xs = graph.variable("x", "float32", (batches, self.batch_size // self.shards, net.n_in))
            (outputs,) = graph.scan(
                lambda x: net.output(x, deterministic=True), sequences=[xs], outputs_info=[None], non_sequences=[]
            )
            sharding = _sharding(self.shards, 1, 1, True)
            self._fns[batches] = self.backend.function([xs], [outputs], sharding=sharding)
        return self._fns[batches]

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of ``images`` whose most likely class equals ``labels``."""
        predictions = self.probabilities(images).argmax(axis=1)
        return float(np.mean(predictions == np.asarray(labels)))
