"""A mini-batch shared by the CPU devices (pipeline.nn.data_parallel): each device's share of the
images and masks, the summed gradients, NumPy's whole-batch SGD as the reference, and what is not
shared. The tests run with two XLA CPU devices (tests/conftest.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.nn import compiled
from pipeline.nn.architecture import build, resolve
from pipeline.nn.backend import COPY_ANALYSIS_FLAG, CPU_DEVICES_FLAG, Backend, xla_flags_with_cpu_devices
from pipeline.nn.compiled import INFERENCE_CALL_BATCHES, Inference, Trainer, shards_for, training_shards
from pipeline.nn.layers import BatchNorm, ConvPool, FullyConnected, Softmax
from pipeline.nn.network import Network

from reference import check_trainer_against_numpy_sgd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "batch, devices, shards",
    [
        (10, 2, 2),  # the book's mini-batch: 5 images a device
        (64, 2, 2),
        (9, 2, 1),  # odd: one device
        (1, 2, 1),
        (2, 2, 2),  # exactly one image a device
        (10, 1, 1),
        (10, 4, 2),  # 4 does not divide 10, 3 neither
        (12, 4, 4),
        (10, 16, 10),
    ],
)
def test_the_shards_are_the_most_devices_that_divide_the_batch(batch, devices, shards):
    assert shards_for(batch, devices) == shards


@pytest.fixture
def always_shared(monkeypatch):
    """Share even these small networks' mini-batches, whose steps are too little work to pay for it."""
    monkeypatch.setattr(compiled, "SHARD_MIN_FLOPS_PER_PARAMETER", 0)


@pytest.mark.parametrize(
    "preset, batch, devices, shards",
    [
        ("conv2_relu", 10, 2, 2),  # the default network: 538 FLOPs per parameter on each device
        ("conv2_relu", 64, 2, 2),
        ("conv2_relu", 10, 16, 5),  # 10 devices of one image would have 108 each: 5 of two, 215
        ("conv2_relu", 9, 2, 1),
        ("conv2_relu_2fc300", 10, 2, 2),  # 172
        ("conv2_relu_fc1000", 10, 2, 1),  # 95: the sum of 672,000 gradients costs more than half a step
        ("conv1", 10, 2, 1),  # 50
        ("shallow", 10, 2, 1),  # 20
    ],
)
def test_a_mini_batch_is_shared_only_where_each_devices_work_outweighs_the_gradient_sum(preset, batch, devices, shards):
    assert training_shards(build(resolve(preset), rng=np.random.default_rng(0)), batch, devices) == shards


def test_the_work_per_parameter_is_shared_exactly_at_its_limit(monkeypatch):
    net = build(resolve("conv2_relu"), rng=np.random.default_rng(0))
    at_limit = net.training_flops() * 5 / net.count_params()  # 5 images a device at batch 10
    monkeypatch.setattr(compiled, "SHARD_MIN_FLOPS_PER_PARAMETER", at_limit)
    assert training_shards(net, 10, 2) == 2
    monkeypatch.setattr(compiled, "SHARD_MIN_FLOPS_PER_PARAMETER", np.nextafter(at_limit, np.inf))
    assert training_shards(net, 10, 2) == 1


def tanh_net(seed: int) -> Network:
    rng = np.random.default_rng(seed)
    net = Network([FullyConnected(12, 6, "tanh", p_dropout=0.5, rng=rng), Softmax(6, 4, p_dropout=0.5)])
    net.layers[1].w.set_value(rng.normal(size=(6, 4)).astype(np.float32))  # the softmax starts at zero
    return net


@pytest.mark.parametrize("batch, chunk", [(10, 5), (64, 8)])  # batch 64: four chunks of 8 on each device
def test_two_devices_train_numpys_whole_batch_momentum_sgd_with_dropout_and_l2(batch, chunk, always_shared):
    net = tanh_net(5)
    trainer = Trainer(net, Backend("jax"), batch_size=batch, lmbda=0.5, num_training_batches=10, momentum=0.9)
    assert (trainer.shards, trainer.chunk) == (2, chunk)
    check_trainer_against_numpy_sgd(trainer, np.random.default_rng(6))


def train_conv(devices: int, seed: int = 2):
    """Five steps of a conv network with dropout and L2 at batch 10 on ``devices`` CPU devices, then
    its accuracy through Inference (one device), which reads the weights the training left."""
    rng = np.random.default_rng(seed)
    net = Network(
        [
            ConvPool((1, 12, 12), filters=4, kernel=5, pool=2, activation="relu", rng=rng),
            FullyConnected(64, 16, "relu", p_dropout=0.5, rng=rng),
            Softmax(16, 10),
        ]
    )
    backend = Backend("jax")
    backend.cpu_devices = devices
    trainer = Trainer(net, backend, batch_size=10, lmbda=0.1, num_training_batches=50)
    data = np.random.default_rng(3)
    images = data.integers(0, 256, (5, 10, 144), dtype=np.uint8)
    labels = data.integers(0, 10, (5, 10)).astype(np.uint8)
    keeps = [(data.random((5, 10, 64)) > 0.5).astype(np.uint8)]
    costs = trainer.train_steps(images, labels, keeps, 0.1)
    probabilities = trainer.inference.probabilities(images.reshape(50, 144))
    return trainer.shards, costs, net.get_values(), probabilities


def test_a_conv_network_on_two_devices_trains_one_devices_weights_within_rounding(always_shared):
    shards, costs, weights, probabilities = train_conv(2)
    one, one_costs, one_weights, one_probabilities = train_conv(1)
    assert (shards, one) == (2, 1)
    np.testing.assert_allclose(costs, one_costs, rtol=1e-5)
    for got, want in zip(weights, one_weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probabilities, one_probabilities, rtol=1e-4, atol=1e-6)
    assert not np.array_equal(weights[0], train_conv(2, seed=7)[2][0])  # the comparison can fail


def test_two_devices_repeat_their_weights_bit_for_bit(always_shared):
    first, second = train_conv(2), train_conv(2)
    np.testing.assert_array_equal(first[1], second[1])
    for a, b in zip(first[2], second[2], strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_norm_an_odd_batch_and_the_c_engine_train_on_one_device(always_shared):
    rng = np.random.default_rng(0)
    plain = Network([FullyConnected(12, 6, "relu", rng=rng), Softmax(6, 4)])
    normed = Network([FullyConnected(12, 6, "linear", rng=rng), BatchNorm((6,), "relu"), Softmax(6, 4)])
    assert Trainer(plain, Backend("jax"), batch_size=10).shards == 2
    assert Trainer(plain, Backend("jax"), batch_size=9).shards == 1
    assert Trainer(plain, Backend("c"), batch_size=10).shards == 1
    assert Trainer(normed, Backend("jax"), batch_size=10).shards == 1  # its statistics are the whole batch's


def devices_seen(env: dict, prefix: tuple[str, ...] = ()) -> int:
    """The CPU devices the JAX engine has in a fresh process that imports the backend."""
    code = "from pipeline.nn.backend import Backend; print(Backend('jax').cpu_devices)"
    out = subprocess.run([*prefix, sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_the_backend_gives_jax_one_cpu_device_per_core_unless_xla_flags_says_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cores = len(os.sched_getaffinity(0))
    assert devices_seen(env) == cores
    assert devices_seen({**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) == 1
    assert devices_seen({**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=5"}) == 5
    if cores >= 2:
        assert devices_seen(env, ("taskset", "-c", "0")) == 1  # one core allowed: one device


TRAINED_WEIGHTS = """
import hashlib, os
import numpy as np
from pipeline.nn.backend import Backend
from pipeline.nn.compiled import Trainer
from pipeline.nn.layers import FullyConnected, Softmax
from pipeline.nn.network import Network
rng = np.random.default_rng(0)
net = Network([FullyConnected(784, 64, "relu", rng=rng), FullyConnected(64, 64, "relu", rng=rng), Softmax(64, 10)])
data = np.random.default_rng(1)
images, labels = data.integers(0, 256, (30, 10, 784), dtype=np.uint8), data.integers(0, 10, (30, 10))
Trainer(net, Backend("jax"), batch_size=10).train_steps(images, labels, [], 0.1)
print(os.environ["XLA_FLAGS"])
print(hashlib.sha256(b"".join(p.get_value().tobytes() for p in net.params)).hexdigest())
"""


def flags_and_weights(xla_flags: str) -> tuple[str, str]:
    """$XLA_FLAGS as the backend leaves it, and a hash of the weights after 30 SGD steps, in a fresh
    process started with ``xla_flags``."""
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "XLA_FLAGS": xla_flags}
    out = subprocess.run([sys.executable, "-c", TRAINED_WEIGHTS], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    flags, weights = out.stdout.splitlines()[-2:]
    return flags, weights


def test_xla_copy_analysis_is_on_unless_xla_flags_says_otherwise_and_trains_the_same_weights():
    one = f"{CPU_DEVICES_FLAG}=1"  # one device: each step reads a weight matrix twice, then updates it
    on_flags, on_weights = flags_and_weights(one)
    off_flags, off_weights = flags_and_weights(f"{one} {COPY_ANALYSIS_FLAG}=false")
    assert f"{COPY_ANALYSIS_FLAG}=true" in on_flags.split()
    assert f"{COPY_ANALYSIS_FLAG}=false" in off_flags.split() and f"{COPY_ANALYSIS_FLAG}=true" not in off_flags
    assert on_weights == off_weights


@pytest.mark.parametrize(
    "flags, count, expected",
    [
        ("", 1, "--xla_force_host_platform_device_count=1"),
        ("--xla_cpu_use_xnnpack=false", 3, "--xla_cpu_use_xnnpack=false --xla_force_host_platform_device_count=3"),
        (
            "--xla_force_host_platform_device_count=2 --xla_cpu_use_xnnpack=false",
            1,
            "--xla_cpu_use_xnnpack=false --xla_force_host_platform_device_count=1",
        ),
    ],
)
def test_a_tasks_xla_flags_keep_the_drivers_flags_and_set_its_own_device_count(flags, count, expected):
    assert xla_flags_with_cpu_devices(flags, count) == expected


# a batch of 80 and one of 45, padded; a call of INFERENCE_CALL_BATCHES batches of 80 (a scan), then those two
@pytest.mark.parametrize("count", [125, 80 * INFERENCE_CALL_BATCHES + 125])
def test_inference_on_two_devices_scores_each_image_as_one_device_does(count):
    rng = np.random.default_rng(4)
    net = Network(
        [
            ConvPool((1, 12, 12), filters=4, kernel=5, pool=2, activation="relu", rng=rng),
            FullyConnected(64, 16, "relu", rng=rng),
            Softmax(16, 10),
        ]
    )
    net.layers[2].w.set_value(rng.normal(size=(16, 10)).astype(np.float32))
    images = rng.integers(0, 256, (count, 144), dtype=np.uint8)
    one = Backend("jax")
    one.cpu_devices = 1
    shared, alone = Inference(net, Backend("jax")), Inference(net, one)
    assert (shared.batch_size, shared.shards, alone.shards) == (80, 2, 1)
    assert Inference(net, Backend("jax"), batch_size=7).shards == 1
    got, want = shared.probabilities(images), alone.probabilities(images)
    assert got.shape == (count, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # each image its own probabilities: the devices' halves are not swapped or repeated
    assert len({tuple(row) for row in got.round(5)}) == count
