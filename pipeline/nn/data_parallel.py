"""Data parallelism over the CPU's cores for the JAX engine: one XLA CPU device per core.

XLA runs a CPU program's operations one after another on one thread; only its matrix products use a
second core. So a training step on 2 cores runs about 1.4x one core (docs/engines.md). Here JAX gets
one CPU device per core (``--xla_force_host_platform_device_count``, set in ``pipeline.nn.backend``
before JAX starts), and a training function runs on all of them at once with ``jax.shard_map``: each
device takes its share of every mini-batch's images, computes their gradient, and ``device_sum``
adds the shares' gradients, so every device makes the same SGD update. The sum is the mini-batch's
gradient in another order of addition, the same within float rounding. The devices meet at that sum
once a step; ``pipeline.nn.cpu_sum`` makes it with a device that arrives first spinning for a while
rather than sleeping at once as ``jax.lax.psum`` does (the same sums).

Only the PyTensor JAX engine on the CPU uses it; the graph is otherwise the one every engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from pytensor.graph import Apply, Op
from pytensor.link.jax.dispatch import jax_funcify
from pytensor.link.jax.linker import JAXLinker

from pipeline.nn import cpu_sum

__all__ = ["AXIS", "ShardedJAXLinker", "Sharding", "cpu_devices", "device_sum"]

AXIS = "images"  # the mesh axis: images of a mini-batch


def cpu_devices() -> int:
    """The CPU devices JAX has (one per core that this process may use; ``pipeline.nn.backend``)."""
    return len(jax.devices("cpu"))


class DeviceSum(Op):
    """The sum of a value over the devices of the mesh axis ``AXIS`` (inside ``ShardedJAXLinker``'s
    programs only; on one device, where there is nothing to add, the identity)."""

    __props__ = ()

    def make_node(self, x):
        return Apply(self, [x], [x.type()])

    def perform(self, node, inputs, outputs):
        outputs[0][0] = inputs[0]


device_sum = DeviceSum()


@jax_funcify.register(DeviceSum)
def _jax_device_sum(op, **kwargs):
    spin = cpu_sum.spin_sum_chosen()  # when the function is compiled: $NNDL_DEVICE_SUM may change between

    def device_sum(x):
        if spin and x.dtype == np.float32:
            return cpu_sum.cpu_sum(x, AXIS)
        return jax.lax.psum(x, AXIS)

    return device_sum


@dataclass(frozen=True)
class Sharding:
    """How a function's images are shared among ``devices`` CPU devices: its first ``inputs`` inputs
    are split along ``axis`` (the images); its outputs too when ``outputs`` is True, else they are
    the same on every device (values summed by ``device_sum``)."""

    devices: int
    inputs: int
    axis: int
    outputs: bool

    def spec(self, split: bool) -> PartitionSpec:
        return PartitionSpec(*([None] * self.axis), AXIS) if split else PartitionSpec()


class ShardedJAXLinker(JAXLinker):
    """PyTensor's JAX linker, with the compiled function run by ``jax.shard_map`` as ``sharding``
    says. The graph is one device's: its split inputs hold ``1/devices`` of the images, and the
    values that must be whole-batch (gradients, costs) go through ``device_sum``."""

    def __init__(self, sharding: Sharding, **kwargs):
        self.sharding = sharding
        super().__init__(**kwargs)

    def accept(self, fgraph, no_recycling=None, profile=None):
        if self.fgraph is not None and self.fgraph is not fgraph:  # the base class would drop our argument
            return type(self)(self.sharding, allow_gc=self.allow_gc).accept(fgraph, no_recycling, profile)
        return super().accept(fgraph, no_recycling, profile)

    def jit_compile(self, fn):
        how = self.sharding
        mesh = Mesh(jax.devices("cpu")[: how.devices], (AXIS,))
        in_specs = tuple(how.spec(i < how.inputs) for i in range(len(self.fgraph.inputs)))
        # check_vma off: outputs that are not split are equal on every device (they come from device_sum)
        on_devices = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=how.spec(how.outputs), check_vma=False)
        sharded = jax.jit(on_devices)

        def run(*args):
            # NumPy out, so that the parameters (shared variables) are not left on all the devices for
            # the single-device functions (inference) that read them next
            return [np.asarray(out) for out in sharded(*args)]

        return run
