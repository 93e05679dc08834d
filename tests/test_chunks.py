"""A mini-batch cut into chunks on the CPU (pipeline.nn.compiled.gradient_chunk): the chunks' summed
gradients train the weights that plain NumPy's whole-batch SGD computes, and what is never cut."""

import numpy as np
import pytest

from pipeline.nn.backend import Backend
from pipeline.nn.compiled import CHUNK_LIMIT, Trainer, gradient_chunk
from pipeline.nn.layers import BatchNorm, ConvPool, FullyConnected, Softmax
from pipeline.nn.network import Network

from reference import check_trainer_against_numpy_sgd


@pytest.mark.parametrize(
    "batch, chunk",
    [
        (7, 7),  # one under half the limit: one piece
        (8, 8),  # exactly half the limit: one piece
        (10, 10),  # the book's mini-batch: one piece, not two of 5
        (15, 15),  # one under the limit, no smaller divisor from 8: one piece
        (16, 8),  # exactly at the limit: two chunks of 8, the smallest divisor from 8
        (17, 17),  # one past it, a prime: no divisor from 8 to 16, one piece
        (18, 9),
        (24, 8),  # 8 and 12 both divide it: the smaller
        (30, 10),  # 10 and 15: the smaller
        (32, 8),
        (34, 34),  # 2 x 17: no divisor from 8 to 16
        (40, 8),  # 8 and 10: the smaller
        (64, 8),
        (100, 10),
    ],
)
def test_the_chunk_is_the_smallest_divisor_from_half_the_limit_to_the_limit(batch, chunk):
    assert gradient_chunk(batch, 16) == chunk
    assert gradient_chunk(batch, None) == batch


def test_the_limit_is_the_jax_engine_on_the_cpu_only():
    assert CHUNK_LIMIT == {("jax", "cpu"): 16}


def test_a_network_with_batch_norm_or_the_c_engine_trains_the_whole_batch_at_once():
    rng = np.random.default_rng(0)
    plain = Network([FullyConnected(12, 6, "relu", rng=rng), Softmax(6, 4)])
    normed = Network([FullyConnected(12, 6, "linear", rng=rng), BatchNorm((6,), "relu"), Softmax(6, 4)])
    assert Trainer(plain, Backend("jax"), batch_size=64).chunk == 8
    assert Trainer(plain, Backend("c"), batch_size=64).chunk == 64
    assert Trainer(normed, Backend("jax"), batch_size=64).chunk == 64  # its statistics are the whole batch's


def test_chunked_momentum_sgd_with_dropout_and_l2_matches_numpy_on_whole_batches():
    rng = np.random.default_rng(5)
    net = Network([FullyConnected(12, 6, "tanh", p_dropout=0.5, rng=rng), Softmax(6, 4, p_dropout=0.5)])
    net.layers[1].w.set_value(rng.normal(size=(6, 4)).astype(np.float32))  # the softmax starts at zero
    backend = Backend("jax")
    backend.cpu_devices = 1  # one device: the chunks alone (tests/test_data_parallel.py shares the batch)
    trainer = Trainer(net, backend, batch_size=32, lmbda=0.5, num_training_batches=10, momentum=0.9)
    assert (trainer.shards, trainer.chunk) == (1, 8)  # four chunks a step
    check_trainer_against_numpy_sgd(trainer, rng)


def test_a_conv_network_in_chunks_trains_the_whole_batchs_weights_within_rounding():
    def train(chunk: int | None):
        rng = np.random.default_rng(2)
        net = Network(
            [
                ConvPool((1, 12, 12), filters=4, kernel=5, pool=2, activation="relu", rng=rng),
                FullyConnected(64, 16, "relu", p_dropout=0.5, rng=rng),
                Softmax(16, 10),
            ]
        )
        backend = Backend("jax")
        backend.cpu_devices = 1  # one device: the chunks alone (tests/test_data_parallel.py shares the batch)
        trainer = Trainer(net, backend, batch_size=48, lmbda=0.1, num_training_batches=50)
        if chunk:
            trainer.chunk = chunk  # the whole batch: the graph without the inner scan
        data = np.random.default_rng(3)
        images = data.integers(0, 256, (5, 48, 144), dtype=np.uint8)
        labels = data.integers(0, 10, (5, 48)).astype(np.uint8)
        keeps = [(data.random((5, 48, 64)) > 0.5).astype(np.uint8)]
        return trainer.chunk, trainer.train_steps(images, labels, keeps, 0.1), net.get_values()

    chunk, costs, weights = train(None)
    whole, whole_costs, whole_weights = train(48)
    assert (chunk, whole) == (8, 48)
    np.testing.assert_allclose(costs, whole_costs, rtol=1e-5)
    for got, want in zip(weights, whole_weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
