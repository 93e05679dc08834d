"""The theano-pymc engine, in its own environment, against plain NumPy; and its clear absence elsewhere.

theano-pymc (numpy < 1.24) and PyTensor (numpy >= 2) cannot share a process, so the engine's cost
and gradients are checked against a NumPy float64 forward pass and its central differences, the
same references the PyTensor engines are held to. In the main environment only the last tests run
(asking for the engine gives the command that makes its environment); in the theano-pymc
environment (pipeline/requirements-theano.txt) the others do:

    .venv-theano/bin/pytest tests/test_theano_engine.py
"""

import json

import numpy as np
import pytest

from pipeline.core.config import ConfigError, PipelineError
from pipeline.nn.backend import THEANO_INSTALL, Backend, graph
from pipeline.nn.compiled import Trainer
from pipeline.nn.config import TrainConfig
from pipeline.nn.layers import BatchNorm, ConvPool, FullyConnected, Softmax
from pipeline.nn.network import Network

from reference import np_batch_norm, np_conv, np_pool, sigmoid
from synthetic import digit_images, stage_evaluation_in, stage_training_in, write_prepared

# theano-pymc 1.1.2 builds graphs with NumPy aliases deprecated since numpy 1.20 (np.complex)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:theano.*")
theano_only = pytest.mark.skipif(
    graph.library != "theano-pymc",
    reason=f"theano-pymc is not installed in this environment; make its own with: {THEANO_INSTALL}",
)


# -- NumPy reference (float64) --------------------------------------------------------------------
def np_objective(params, x, y, keep, lmbda, batches):
    """conv 3x3x3 + pool 2 (ReLU) -> FC 6 (sigmoid, dropout keep) -> softmax, log-likelihood + the book's L2."""
    cw, cb, fw, fb, sw, sb = params
    h = np.maximum(np_pool(np_conv(x.reshape(-1, 8, 8, 1), cw), 2) + cb, 0).reshape(len(x), -1)  # (N, 27)
    h = sigmoid((h * keep) @ fw + fb)  # (N, 6)
    z = h @ sw + sb  # (N, 4)
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    data = -np.mean(log_p[np.arange(len(y)), y])
    return data + 0.5 * lmbda * sum(np.sum(w**2) for w in (cw, fw, sw)) / batches


def central_differences(f, params, eps=1e-6):
    grads = []
    for p in params:
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            keep = p[i]
            p[i] = keep + eps
            up = f(params)
            p[i] = keep - eps
            down = f(params)
            p[i] = keep
            g[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


# -- in the theano-pymc environment ---------------------------------------------------------------
@theano_only
def test_native_conv_and_pool_match_numpy_with_several_channels_and_an_odd_border():
    T = graph.tensor
    rng = np.random.default_rng(0)
    x_val = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    w_val = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
    x, w = graph.variable("x", "float32", (2, 7, 6, 3)), graph.variable("w", "float32", (3, 2, 3, 4))
    y = graph.conv2d_valid(x, w)  # (2, 5, 5, 4): the pool drops the last row and column
    pooled = graph.max_pool(y, 2)
    g_val = rng.normal(size=(2, 2, 2, 4)).astype(np.float32)
    conv_out, pool_out, gx, gw = Backend("theano-pymc").function(
        [x, w], [y, pooled, *graph.grad(T.sum(pooled * g_val), [x, w])]
    )(x_val, w_val)
    np.testing.assert_allclose(conv_out, np_conv(x_val, w_val), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pool_out, np_pool(np_conv(x_val, w_val), 2), rtol=1e-5, atol=1e-5)
    # gradients: the loss is linear in w for fixed max positions, so finite differences are exact up to rounding
    params = [x_val.astype(np.float64), w_val.astype(np.float64)]
    ref_gx, ref_gw = central_differences(lambda p: np.sum(np_pool(np_conv(*p), 2) * g_val), params)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-3, atol=1e-4)


@theano_only
def test_same_weights_and_batch_give_numpys_cost_and_gradients():
    rng = np.random.default_rng(11)
    net = Network(
        [
            ConvPool((1, 8, 8), filters=3, kernel=3, pool=2, activation="relu", rng=rng),
            FullyConnected(27, 6, "sigmoid", p_dropout=0.5, rng=rng),
            Softmax(6, 4),
        ]
    )
    net.layers[-1].w.set_value(rng.normal(size=(6, 4)).astype(np.float32))
    x = graph.variable("x", "float32", (5, 64))
    y = graph.variable("y", "uint8", (5,))
    keep = graph.variable("keep", "float32", (5, 27))
    objective = net.objective(x, y, cost="log-likelihood", lmbda=0.2, num_training_batches=3, keeps=[keep])
    x_val, y_val = rng.random((5, 64)).astype(np.float32), rng.integers(0, 4, 5).astype(np.uint8)
    keep_val = (rng.random((5, 27)) > 0.5).astype(np.float32)
    cost, *grads = Backend("theano-pymc").function([x, y, keep], [objective, *graph.grad(objective, net.params)])(
        x_val, y_val, keep_val
    )

    params = [v.astype(np.float64) for v in net.get_values()]

    def f(p):
        return np_objective(p, x_val.astype(np.float64), y_val, keep_val, 0.2, 3)

    assert cost.dtype == np.float32
    np.testing.assert_allclose(cost, f(params), rtol=1e-5)
    for name, g, ref in zip(net.param_names(), grads, central_differences(f, params)):
        assert g.dtype == np.float32 and g.shape == ref.shape, name
        np.testing.assert_allclose(g, ref, rtol=1e-3, atol=1e-5, err_msg=name)


@theano_only
def test_batch_norm_trains_on_batch_moments_and_infers_with_the_statistics_the_trainer_sets():
    rng = np.random.default_rng(12)
    net = Network(
        [
            ConvPool((1, 8, 8), filters=3, kernel=3, pool=2, activation="linear", rng=rng),
            BatchNorm((3, 3, 3), "relu"),
            Softmax(27, 4),
        ]
    )
    net.layers[1].gamma.set_value(np.float32([0.5, 1.0, 2.0]))
    x_val = rng.random((6, 64)).astype(np.float32)
    x = graph.variable("x", "float32", (6, 64))
    hidden = net.layers[0].output(x)
    conv, training, inference = Backend("theano-pymc").function(
        [x], [hidden, net.layers[1].output(hidden, deterministic=False), net.layers[1].output(hidden)]
    )(x_val)
    gamma = net.layers[1].gamma.get_value()
    np.testing.assert_allclose(
        training, np.maximum(np_batch_norm(conv.astype(np.float64), gamma, 0.0), 0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(inference, np.maximum(gamma * conv / np.sqrt(1 + 1e-5), 0), rtol=1e-5, atol=1e-6)
    # set from 6 images in one batch, the statistics are their moments: inference then equals training
    Trainer(net, Backend("theano-pymc"), batch_size=2, eval_batch_size=6).set_statistics(x_val)
    np.testing.assert_allclose(net.layers[1].mean.get_value(), conv.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.layers[1].var.get_value(), conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


@theano_only
def test_a_small_conv_network_learns_the_synthetic_digits():
    from pipeline.nn.compiled import Trainer

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 800).astype(np.uint8)
    images = digit_images(labels, rng)
    net = Network(
        [
            ConvPool((1, 28, 28), filters=4, kernel=5, pool=2, activation="relu", rng=rng, init="corrected"),
            Softmax(4 * 12 * 12, 10),
        ]
    )
    trainer = Trainer(net, Backend("theano-pymc"), batch_size=10, num_training_batches=60)
    train_x, train_y = images[:600].reshape(60, 10, 784), labels[:600].reshape(60, 10)
    for _ in range(3):
        costs = trainer.train_steps(train_x, train_y, [], 0.05)
    assert np.all(np.isfinite(costs)) and costs.mean() < 0.5
    assert trainer.accuracy(images[600:], labels[600:]) > 0.9  # chance is 0.1


@theano_only
def test_the_train_stage_mlflow_and_evaluate_work_with_the_engine(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.evaluation.evaluate import EvaluateConfig
    from pipeline.nn.model_io import load_model
    from pipeline.tracking.tracked import train_tracked

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_prepared(tmp_path / "prepared")
    architecture = [
        {"type": "fully_connected", "n_in": 784, "n_out": 30, "activation": "sigmoid", "p_dropout": 0.1},
        {"type": "softmax", "n_in": 30, "n_out": 10},
    ]
    params = {
        "train": {
            "architecture": architecture,
            "epochs": 2,
            "eta": 0.5,
            "lmbda": 0.1,
            "seed": 3,
            "steps_per_call": 25,
            "engine": "theano-pymc",
        },
        "tracking": {"experiment": "theano"},
    }
    summary = train_tracked(stage_training_in(params, tmp_path / "prepared", tmp_path))
    assert summary["engine"] == "theano-pymc" and summary["device"].startswith("cpu (theano-pymc 1.1.2")
    assert summary["best_validation_accuracy"] > 0.8
    metrics = stage_evaluation_in(
        tmp_path, EvaluateConfig(gallery_size=3), tracking.TrackingConfig(experiment="theano")
    )
    test = np.load(tmp_path / "prepared/test.npz")
    predicted = load_model(tmp_path / "model").predict(test["images"])  # this environment's default engine
    assert metrics["test_accuracy"] == pytest.approx(np.mean(predicted == test["labels"]))
    # evaluate.json: the one number of dvc exp show; the accuracy per digit beside the plots
    assert json.loads((tmp_path / "metrics/evaluate.json").read_text()) == {"test_accuracy": metrics["test_accuracy"]}
    assert json.loads((tmp_path / "evaluate" / "per_class_accuracy.json").read_text()) == metrics["per_class_accuracy"]

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("theano").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["engine"] == "theano-pymc"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "validation_accuracy")] == [1, 2]
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


@theano_only
def test_the_pytensor_engines_point_back_to_the_main_environment():
    with pytest.raises(PipelineError, match="engine jax needs PyTensor.*use train.engine: theano-pymc"):
        Backend("jax")
    with pytest.raises(ConfigError, match="train.engine='c'.*needs PyTensor"):
        TrainConfig(engine="c")


# -- in the main (PyTensor) environment ----------------------------------------------------------
@pytest.mark.skipif(graph.library != "pytensor", reason="theano-pymc is this environment's engine")
def test_choosing_theano_pymc_without_it_names_the_command_that_installs_it():
    assert "pip install -r pipeline/requirements-theano.txt" in THEANO_INSTALL
    with pytest.raises(ConfigError) as config_error:  # at validation, before any data is read
        TrainConfig(engine="theano-pymc")
    with pytest.raises(PipelineError) as backend_error:
        Backend("theano-pymc")
    for error in (config_error, backend_error):
        assert THEANO_INSTALL in str(error.value) and ".venv-theano/bin/python -m pipeline train" in str(error.value)
    assert str(config_error.value).startswith("Got train.engine='theano-pymc': engine theano-pymc is not installed")
