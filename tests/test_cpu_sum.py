"""The devices' sum (pipeline.nn.cpu_sum): NumPy's sums, XLA's psum bit for bit on two devices, the
order of the devices on three, a meeting that never completes, the build kept in the cache folder, and
the fallback to psum where nothing can be built. The tests run with two XLA CPU devices (conftest)."""

import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from pipeline.core.config import PipelineError
from pipeline.nn import compiled, cpu_sum
from pipeline.nn.backend import Backend
from pipeline.nn.compiled import Trainer
from pipeline.nn.layers import ConvPool, FullyConnected, Softmax
from pipeline.nn.network import Network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_devices(how, values: np.ndarray) -> np.ndarray:
    """``how(row, axis)`` run by shard_map on one CPU device per row of ``values``: each device's result."""
    mesh = Mesh(jax.devices("cpu")[: len(values)], ("d",))
    spec = PartitionSpec("d")
    program = jax.shard_map(lambda x: how(x[0], "d")[None], mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return np.asarray(jax.jit(program)(values))


def spread(rng: np.random.Generator, shape) -> np.ndarray:
    """float32 values over many orders of magnitude, so that a wrong order of addition shows."""
    return (rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 4, size=shape)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 1001, 85_671])  # odd sizes: the devices' shares differ by one
def test_two_devices_sum_as_numpy_and_as_xlas_psum_bit_for_bit(n):
    assert cpu_sum.library() is not None
    values = spread(np.random.default_rng(n), (2, n))
    got = on_devices(cpu_sum.cpu_sum, values)
    want = values[0] + values[1]
    np.testing.assert_array_equal(got, np.stack([want, want]))
    np.testing.assert_array_equal(got, on_devices(jax.lax.psum, values))


THREE_DEVICES = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, PartitionSpec
from pipeline.nn import cpu_sum
assert len(jax.devices("cpu")) == 3 and cpu_sum.library() is not None
values = np.load(sys.argv[1])
spec = PartitionSpec("d")
program = jax.shard_map(lambda x: cpu_sum.cpu_sum(x[0], "d")[None], mesh=Mesh(jax.devices("cpu"), ("d",)),
                        in_specs=spec, out_specs=spec, check_vma=False)
np.save(sys.argv[2], np.asarray(jax.jit(program)(values)))
"""


def test_three_devices_add_each_element_in_the_order_of_the_devices(tmp_path):
    values = spread(np.random.default_rng(3), (3, 7))  # shares of 2, 2 and 3 elements
    values[:, 0] = [1e8, 4.0, 4.0]  # in float32 (1e8 + 4) + 4 is 1e8 (ties to even), 1e8 + (4 + 4) is not
    np.save(tmp_path / "in.npy", values)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    run = [sys.executable, "-c", THREE_DEVICES, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")]
    done = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = (values[0] + values[1]) + values[2]
    assert want[0] == 1e8 and values[0, 0] + (values[1, 0] + values[2, 0]) == 1e8 + 8  # the order shows
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.stack([want] * 3))


def test_a_meeting_that_never_completes_fails_after_the_limit_and_leaves_the_place_usable():
    values = spread(np.random.default_rng(4), (2, 5))
    start = time.monotonic()
    with pytest.raises(Exception, match=r"cpu_sum: device [01] of 3 waited 0\.3 s for the others"):
        # both devices wait for a third that does not exist
        on_devices(lambda x, axis: cpu_sum.cpu_sum(x, axis, devices=3, limit_s=0.3), values)
    assert time.monotonic() - start >= 0.3
    # exactly the devices there are: the meeting completes, on a place that the failed one left empty
    np.testing.assert_array_equal(on_devices(cpu_sum.cpu_sum, values), np.stack([values.sum(axis=0)] * 2))


def test_a_device_that_never_spins_still_sums():
    values = spread(np.random.default_rng(5), (2, 300))
    got = on_devices(lambda x, axis: cpu_sum.cpu_sum(x, axis, spin_us=0), values)
    np.testing.assert_array_equal(got, np.stack([values[0] + values[1]] * 2))


def conv_weights(monkeypatch, choice: str) -> list[np.ndarray]:
    """A conv network with dropout and L2, four steps at batch 10 on the two devices, the devices'
    sums made as $NNDL_DEVICE_SUM says."""
    monkeypatch.setenv(cpu_sum.CHOICE_ENV, choice)
    monkeypatch.setattr(compiled, "SHARD_MIN_FLOPS_PER_PARAMETER", 0)  # too little work to share, else
    rng = np.random.default_rng(2)
    net = Network(
        [
            ConvPool((1, 12, 12), filters=4, kernel=5, pool=2, activation="relu", rng=rng),
            FullyConnected(64, 16, "relu", p_dropout=0.5, rng=rng),
            Softmax(16, 10),
        ]
    )
    trainer = Trainer(net, Backend("jax"), batch_size=10, lmbda=0.1, num_training_batches=50)
    assert trainer.shards == 2
    data = np.random.default_rng(3)
    images, labels = data.integers(0, 256, (4, 10, 144), dtype=np.uint8), data.integers(0, 10, (4, 10))
    trainer.train_steps(images, labels, [(data.random((4, 10, 64)) > 0.5).astype(np.uint8)], 0.1)
    return net.get_values()


def test_a_training_with_the_spinning_sum_trains_xlas_weights_bit_for_bit(monkeypatch):
    spun = []
    real = cpu_sum.cpu_sum
    monkeypatch.setattr(cpu_sum, "cpu_sum", lambda x, axis: spun.append(x.shape) or real(x, axis))
    spinning = conv_weights(monkeypatch, "spin")
    assert spun  # the training's program holds the handler
    spun.clear()
    with_psum = conv_weights(monkeypatch, "xla")
    assert not spun
    for a, b in zip(spinning, with_psum, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_choice_other_than_spin_or_xla_is_named(monkeypatch):
    monkeypatch.setenv(cpu_sum.CHOICE_ENV, "fast")
    with pytest.raises(PipelineError, match=r"NNDL_DEVICE_SUM='fast': expected one of spin, xla"):
        cpu_sum.spin_sum_chosen()


BUILD = """
import logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from pipeline.nn import cpu_sum
print("built" if cpu_sum.library() is not None else "none")
print(cpu_sum.spin_sum_chosen())
"""


def build_in_fresh_process(tmp_path, compiler: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NNDL_CACHE_DIR": str(tmp_path / "cache"), "CXX": compiler}
    env.pop(cpu_sum.CHOICE_ENV, None)
    return subprocess.run([sys.executable, "-c", BUILD], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_handler_is_built_once_into_the_cache_folder_and_loaded_from_it(tmp_path):
    log = tmp_path / "compiler.log"
    compiler = tmp_path / "cxx"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec g++ "$@"\n')
    compiler.chmod(0o755)
    for _ in range(2):
        done = build_in_fresh_process(tmp_path, str(compiler))
        assert done.returncode == 0 and done.stdout.split() == ["built", "True"], done.stderr
    assert len(log.read_text().splitlines()) == 1  # the second process found the library
    built = list((tmp_path / "cache" / "xla-ffi").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"


@pytest.mark.parametrize(
    "compiler, said",
    [
        ("no-such-compiler", "no C++ compiler (g++) to build cpu_sum.cc: the devices' sums use jax.lax.psum"),
        ("false", "exited with status 1"),  # a compiler that fails
    ],
)
def test_without_a_working_compiler_the_sums_are_xlas_and_the_log_says_why(tmp_path, compiler, said):
    done = build_in_fresh_process(tmp_path, compiler)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["none", "False"]
    assert said in done.stderr and done.stderr.count("jax.lax.psum") == 1
    cache = tmp_path / "cache" / "xla-ffi"
    assert not cache.exists() or list(cache.iterdir()) == []  # no half-built library left behind
