"""The train stage end to end on a small synthetic digit set: learning, files, determinism, resume
(in process and after SIGKILL), divergence, early stopping and params validation."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.config import ConfigError, from_section
from pipeline.core.files import load_npz
from pipeline.nn.compiled import Trainer
from pipeline.nn.config import TrainConfig, TrainPaths
from pipeline.nn.fit import TrainingDiverged, call_length, train
from pipeline.nn.model_io import load_model

REPO = Path(__file__).resolve().parents[1]
SMALL_NET = [
    {"type": "conv_pool", "input": [1, 28, 28], "filters": 4, "kernel": 5, "pool": 4, "activation": "relu"},
    {"type": "fully_connected", "n_in": 144, "n_out": 20, "activation": "relu", "p_dropout": 0.2},
    {"type": "softmax", "n_in": 20, "n_out": 10, "p_dropout": 0.1},
]


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten fixed random blob patterns, one per class, each image noisy and shifted by up to 2 pixels."""
    prototypes = (np.random.default_rng(99).random((10, 28, 28)) > 0.7) * 200.0
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.empty((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        shifted = np.roll(prototypes[label], rng.integers(-2, 3, 2), axis=(0, 1))
        images[i] = np.clip(shifted + rng.normal(0, 40, (28, 28)), 0, 255)
    return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "prepared").mkdir()
    for name, n, seed in [("train", 1000, 1), ("validation", 300, 2)]:
        images, labels = synthetic_digits(n, seed)
        np.savez(root / "prepared" / f"{name}.npz", images=images, labels=labels)
    return root


def config(**overrides) -> TrainConfig:
    settings = dict(architecture=SMALL_NET, epochs=3, batch_size=10, eta=0.1, lmbda=0.1, seed=7, steps_per_call=40)
    settings.update(overrides)
    return TrainConfig(**settings)


def run(tmp: Path, data_dir: Path, cfg: TrainConfig, **kwargs) -> dict:
    paths = TrainPaths.of(
        cfg,
        prepared=data_dir / "prepared",
        expanded=None,
        model=tmp / "model",
        checkpoints=tmp / "checkpoints",
        metrics=tmp / "metrics",
    )
    return train(cfg, paths, progress=False, **kwargs)


def weights(tmp: Path) -> dict:
    return load_npz(tmp / "model" / "model.npz")


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, data_dir) -> Path:
    """One epoch of config(), trained once for the module: its model, checkpoint and metrics."""
    directory = tmp_path_factory.mktemp("one-epoch")
    run(directory, data_dir, config(epochs=1))
    return directory


def continue_from(one_epoch: Path, tmp: Path) -> Path:
    """``tmp`` holding a copy of the one-epoch training, to continue or restart."""
    shutil.copytree(one_epoch, tmp, dirs_exist_ok=True)
    return tmp


def test_a_small_network_learns_and_the_stage_writes_its_files(tmp_path, data_dir):
    summary = run(tmp_path, data_dir, config())
    assert summary["best_validation_accuracy"] > 0.9  # chance is 0.1
    assert summary["epochs_run"] == 3 and summary["stopped"] == "completed"
    saved = json.loads((tmp_path / "metrics" / "train.json").read_text())
    info = json.loads((tmp_path / "metrics" / "train_info.json").read_text())
    timings = json.loads((tmp_path / "metrics" / "train_timings.json").read_text())
    per_epoch = timings.pop("epochs")
    assert {**saved, **info, **timings} == {k: v for k, v in summary.items() if k != "history"}
    assert per_epoch == [{k: r[k] for k in ("epoch", "seconds", "images_per_second")} for r in summary["history"]]
    # dvc exp show: one numeric column; the rest apart; what changes from run to run in neither
    assert saved == {"best_validation_accuracy": summary["best_validation_accuracy"]}
    assert info["stopped"] == "completed" and info["engine"] == "jax"
    assert not {"seconds", "images_per_second", "peak_rss_mb", "resumed_from_epoch"} & set(info)
    with open(tmp_path / "metrics" / "train_epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "train_cost", "validation_accuracy", "eta"}
    assert float(rows[-1]["train_cost"]) < float(rows[0]["train_cost"])
    best = max(rows[::-1], key=lambda r: float(r["validation_accuracy"]))
    assert summary["best_epoch"] == int(best["epoch"])
    # the saved model is the best epoch's and reproduces its validation accuracy
    model = load_model(tmp_path / "model")
    val = load_npz(data_dir / "prepared" / "validation.npz")
    accuracy = np.mean(model.predict(val["images"]) == val["labels"])
    assert accuracy == pytest.approx(summary["best_validation_accuracy"])
    assert model.description["metadata"]["best_epoch"] == summary["best_epoch"]


def test_same_seed_gives_identical_weights_whatever_the_steps_per_call(tmp_path, data_dir, one_epoch, monkeypatch):
    compiled = []  # the length of each training program compiled: one per training (100 steps an epoch)
    compile_train = Trainer._compile_train
    monkeypatch.setattr(
        Trainer, "_compile_train", lambda self, steps: compiled.append(steps) or compile_train(self, steps)
    )
    run(tmp_path / "b", data_dir, config(epochs=1, steps_per_call=7))
    run(tmp_path / "c", data_dir, config(epochs=1, seed=8))
    assert compiled == [5, 25]
    a, b, c = weights(one_epoch), weights(tmp_path / "b"), weights(tmp_path / "c")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[name], c[name]) for name in a if name.endswith(".w"))


def test_resuming_in_process_matches_an_uninterrupted_run_and_replays_epochs(tmp_path, data_dir):
    straight = run(tmp_path / "straight", data_dir, config(epochs=3, momentum=0.5, lr_decay=0.9))
    run(tmp_path / "resumed", data_dir, config(epochs=2, momentum=0.5, lr_decay=0.9))
    seen = []
    resumed = run(
        tmp_path / "resumed",
        data_dir,
        config(epochs=3, momentum=0.5, lr_decay=0.9),
        on_epoch=lambda epoch, metrics: seen.append((epoch, metrics["resumed"], metrics["best_epoch"])),
    )
    assert resumed["resumed_from_epoch"] == 2
    assert [(e, r) for e, r, _ in seen] == [(1, True), (2, True), (3, False)]

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rows]

    assert strip(resumed["history"]) == strip(straight["history"])
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


BN_NET = [
    {"type": "conv_pool", "input": [1, 28, 28], "filters": 4, "kernel": 5, "pool": 4, "activation": "linear"},
    {"type": "batch_norm", "shape": [4, 6, 6], "activation": "relu"},
    {"type": "fully_connected", "n_in": 144, "n_out": 20, "activation": "linear", "p_dropout": 0.2},
    {"type": "batch_norm", "shape": [20], "activation": "relu"},
    {"type": "softmax", "n_in": 20, "n_out": 10, "p_dropout": 0.1},
]


def test_a_batch_norm_network_learns_saves_its_best_epochs_statistics_and_resumes_exactly(tmp_path, data_dir):
    cfg = dict(architecture=BN_NET, lmbda=0.0, init="corrected")
    straight = run(tmp_path / "straight", data_dir, config(epochs=3, **cfg))
    assert straight["best_validation_accuracy"] > 0.9
    # the saved statistics are the best epoch's network's own: measured again from its weights, the same
    model = load_model(tmp_path / "straight" / "model")
    val = load_npz(data_dir / "prepared" / "validation.npz")
    assert np.mean(model.predict(val["images"]) == val["labels"]) == pytest.approx(straight["best_validation_accuracy"])
    saved = model.network.get_values()
    assert not np.allclose(model.network.layers[1].mean.get_value(), 0)  # not the initial mean
    train_images = load_npz(data_dir / "prepared" / "train.npz")["images"]
    Trainer(model.network, model.backend, batch_size=10).set_statistics(train_images)
    for name, before, after in zip(model.network.param_names(), saved, model.network.get_values()):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6, err_msg=name)
    # a run stopped after epoch 2 and resumed ends where the straight one did
    run(tmp_path / "resumed", data_dir, config(epochs=2, **cfg))
    resumed = run(tmp_path / "resumed", data_dir, config(epochs=3, **cfg))
    assert resumed["resumed_from_epoch"] == 2
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert {"layer1.mean", "layer1.var", "layer3.mean", "layer3.var"} <= set(a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


DISTORTED = dict(distort_rotation=10.0, distort_scale=0.1, distort_alpha=20.0, distort_sigma=4.0)


def test_each_epoch_distorts_every_image_afresh_and_reproducibly(data_dir):
    from pipeline.nn.fit import _epoch_images

    images = load_npz(data_dir / "prepared" / "train.npz")["images"].reshape(-1, 784)
    cfg = config(**DISTORTED)
    one, order = _epoch_images(cfg, images, 1)
    again, order_again = _epoch_images(cfg, images, 1)
    two, _ = _epoch_images(cfg, images, 2)
    np.testing.assert_array_equal(one, again)
    np.testing.assert_array_equal(order, order_again)
    assert one.shape == images.shape and one.dtype == np.uint8
    assert not np.array_equal(one, images) and not np.array_equal(one, two)
    # image i of the epoch is a distortion of training image i: blurred (the distortion moves pixels by
    # a pixel or two), nearer to it than to the next one
    from scipy import ndimage

    def blur(a):
        return ndimage.gaussian_filter(a.reshape(-1, 28, 28).astype(float), (0, 1.5, 1.5)).reshape(len(a), -1)

    distorted, original = blur(one), blur(images)
    own = np.abs(distorted - original).mean(axis=1)
    other = np.abs(distorted - np.roll(original, 1, axis=0)).mean(axis=1)
    assert np.mean(own < other) > 0.95
    plain, plain_order = _epoch_images(config(), images, 1)
    assert plain is images  # off: no copy
    np.testing.assert_array_equal(plain_order, order)  # the shuffle does not depend on distortion


def test_distorted_training_resumes_exactly_and_ignores_steps_per_call(tmp_path, data_dir):
    straight = run(tmp_path / "straight", data_dir, config(epochs=2, **DISTORTED))
    run(tmp_path / "resumed", data_dir, config(epochs=1, **DISTORTED))
    resumed = run(tmp_path / "resumed", data_dir, config(epochs=2, **DISTORTED))
    run(tmp_path / "grouped", data_dir, config(epochs=2, steps_per_call=7, **DISTORTED))
    run(tmp_path / "plain", data_dir, config(epochs=2))
    assert resumed["resumed_from_epoch"] == 1 and straight["epochs_run"] == 2
    a, b, c, plain = (weights(tmp_path / name) for name in ("straight", "resumed", "grouped", "plain"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])
    assert any(not np.array_equal(a[name], plain[name]) for name in a)


def test_a_checkpoint_from_other_params_is_not_resumed(tmp_path, data_dir, one_epoch):
    summary = run(continue_from(one_epoch, tmp_path), data_dir, config(epochs=2, lmbda=0.2))
    assert summary["resumed_from_epoch"] == 0 and summary["epochs_run"] == 2


def test_a_checkpoint_from_other_training_code_is_not_resumed(tmp_path, data_dir, monkeypatch, one_epoch):
    """DVC re-runs the stage when the code changes; the old code's weights must not be continued."""
    from pipeline.nn import checkpoint

    continue_from(one_epoch, tmp_path)
    assert run(tmp_path, data_dir, config(epochs=2))["resumed_from_epoch"] == 1  # same code: resumed
    edited = tmp_path / "package"
    shutil.copytree(checkpoint.PACKAGE_DIR, edited, ignore=shutil.ignore_patterns("__pycache__"))
    with open(edited / "nn" / "layers.py", "a") as f:
        f.write("\n# an edit\n")
    monkeypatch.setattr(checkpoint, "PACKAGE_DIR", edited)
    summary = run(tmp_path, data_dir, config(epochs=2))
    assert summary["resumed_from_epoch"] == 0 and summary["epochs_run"] == 2


def test_resume_after_sigkill_ends_with_the_same_metrics(tmp_path, data_dir, migrated_store):
    """Kill the stage process with SIGKILL just after its first checkpoint, rerun it, compare."""
    epochs = 8
    (tmp_path / "params.yaml").write_text(
        json.dumps(
            {
                "train": {
                    "architecture": SMALL_NET,
                    "epochs": epochs,
                    "eta": 0.1,
                    "lmbda": 0.1,
                    "seed": 7,
                    "steps_per_call": 40,
                }
            }
        )
    )
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--params",
        str(tmp_path / "params.yaml"),
        "--prepared",
        str(data_dir / "prepared"),
        "--model",
        str(tmp_path / "killed" / "model"),
        "--checkpoints",
        str(tmp_path / "killed" / "checkpoints"),
        "--metrics",
        str(tmp_path / "killed" / "metrics"),
        "--no-progress",
    ]
    # the stage logs to the MLflow store at the root of its repository: make that tmp_path
    (tmp_path / ".dvc").mkdir()
    migrated_store(tmp_path / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PYTHONPATH"] = str(REPO)
    checkpoint = tmp_path / "killed" / "checkpoints" / "checkpoint.npz"
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not checkpoint.exists() and process.poll() is None:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    state = json.loads(str(load_npz(checkpoint)["__state__"]))
    assert 1 <= state["epochs_done"] < epochs, "the kill should land mid-run"
    assert not (tmp_path / "killed" / "metrics" / "train.json").exists()

    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    resumed = {
        name: value
        for file in ("train.json", "train_info.json", "train_timings.json")
        for name, value in json.loads((tmp_path / "killed" / "metrics" / file).read_text()).items()
    }
    assert resumed["resumed_from_epoch"] == state["epochs_done"]

    # the resumed training continued the killed MLflow run: one run, every epoch once, finished
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("nndl-chapter6").experiment_id])
    assert logged.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(logged.info.run_id, "validation_accuracy")]
    assert sorted(steps) == list(range(1, epochs + 1))

    straight = run(tmp_path / "straight", data_dir, config(epochs=epochs))
    for key in ("best_validation_accuracy", "best_epoch", "epochs_run", "final_train_cost"):
        assert resumed[key] == straight[key], key
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "straight")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_nan_cost_stops_with_the_epoch_and_keeps_the_best_model(tmp_path, data_dir, monkeypatch):
    real_steps = Trainer.train_steps
    calls = {"n": 0}

    def poisoned_after_first_epoch(self, *args):
        calls["n"] += 1
        costs = real_steps(self, *args)
        return costs * np.nan if calls["n"] > 4 else costs  # 100 batches = 4 calls of 25 steps per epoch

    monkeypatch.setattr(Trainer, "train_steps", poisoned_after_first_epoch)
    with pytest.raises(
        TrainingDiverged, match=r"epoch 2: the training cost became NaN.*model of epoch 1.*smaller train.eta"
    ):
        run(tmp_path, data_dir, config(epochs=3))
    info = json.loads((tmp_path / "metrics" / "train_info.json").read_text())
    assert info["stopped"] == "diverged" and info["epochs_run"] == 1
    assert (tmp_path / "model" / "model.npz").exists()


def test_a_huge_learning_rate_diverges_in_the_first_epoch_without_a_model(tmp_path, data_dir):
    with pytest.raises(TrainingDiverged, match=r"epoch 1: .*no epoch finished.*now 1e\+30"):
        run(tmp_path, data_dir, config(epochs=2, eta=1e30))
    assert not (tmp_path / "model").exists()


def test_early_stopping_waits_for_a_strict_improvement(tmp_path, data_dir):
    summary = run(tmp_path, data_dir, config(epochs=6, eta=1e-12, early_stopping_patience=2))
    assert summary["stopped"] == "early_stopping" and summary["epochs_run"] == 3
    assert summary["best_epoch"] == 3  # ties move the best epoch later, as the book


@pytest.mark.parametrize(
    "n_batches, steps_per_call, length",
    [
        (500, 500, 500),  # the whole epoch in one call, exactly at the limit
        (501, 500, 167),  # 3 x 167
        (100, 40, 25),
        (100, 7, 5),
        (31558, 500, 62),  # 2 x 31 x 509: the divisor 62 is exactly 500 // 8
        (31049, 500, 500),  # 61 x 509: 61 is one under 500 // 8, so calls of 500 and a shorter last one
        (29, 16, 16),  # a prime: 16 then 13
        (29, 8, 1),  # 8 // 8 is 1, which divides everything
        (1, 500, 1),
    ],
)
def test_an_epochs_calls_have_one_length_where_one_divides_it(n_batches, steps_per_call, length):
    assert call_length(n_batches, steps_per_call) == length


@pytest.mark.parametrize(
    "n_batches, steps_per_call, calls", [(29, 16, [16, 13]), (100, 40, [25] * 4), (40, 40, [40]), (41, 40, [40, 1])]
)
def test_an_epoch_visits_every_mini_batch_once_in_its_calls(n_batches, steps_per_call, calls):
    """``_train_epoch`` with a trainer that records what it is given (the grouping is all that is tested)."""
    from types import SimpleNamespace

    from pipeline.nn.fit import _train_epoch

    seen = []

    def train_steps(x, y, keeps, eta):
        seen.append((x.copy(), y.copy()))
        return np.ones(len(x), dtype=np.float32)

    trainer = SimpleNamespace(network=SimpleNamespace(dropout_layers=[]), train_steps=train_steps)
    images = np.arange(n_batches * 10 * 2, dtype=np.int32).reshape(-1, 2)  # image i holds 2i, 2i + 1: each its own
    order = np.random.default_rng(0).permutation(len(images))
    labels = (np.arange(len(images)) % 10).astype(np.uint8)
    cost_sum, diverged = _train_epoch(
        config(steps_per_call=steps_per_call), trainer, images, order, labels, 1, n_batches, 0.1, False
    )
    assert [len(x) for x, _ in seen] == calls and diverged is None and cost_sum == n_batches
    np.testing.assert_array_equal(np.concatenate([x for x, _ in seen]).reshape(-1, 2), images[order])
    np.testing.assert_array_equal(np.concatenate([y for _, y in seen]).ravel(), labels[order])


@pytest.mark.parametrize(
    "section, message",
    [
        ({"dataset": "mnist"}, r"train.dataset='mnist'"),
        ({"architecture": "chapter1"}, r"train.cost='log-likelihood'.*softmax output"),
        ({"architecture": "conv2_relu", "cost": "quadratic", "epochs": 0}, r"train.epochs=0"),
        ({"eta": 0}, r"train.eta=0.0"),
        ({"engine": "c", "device": "gpu"}, r"train.device='gpu'.*engine: jax"),
        ({"momentum": 1.0}, r"train.momentum=1.0"),
        ({"lr_decay": 1.5}, r"train.lr_decay=1.5"),
        ({"architecture": [{"type": "softmax", "n_in": 100}]}, r"train.architecture\[0\].n_in=100"),
        ({"distort_rotation": -5}, r"train.distort_rotation=-5.0: the largest rotation"),
        ({"distort_scale": 1.0}, r"train.distort_scale=1.0: .*\[0, 1\)"),
        ({"distort_alpha": -1}, r"train.distort_alpha=-1.0"),
        ({"distort_sigma": 0}, r"train.distort_sigma=0.0: the width"),
        ({"learning_rate": 0.1}, r"unknown key train.learning_rate"),
    ],
)
def test_bad_train_params_are_refused(section, message):
    with pytest.raises(ConfigError, match=message):
        from_section(TrainConfig, {"train": section}, "train", "params.yaml")


def test_peak_memory_is_the_processs_own_not_its_parents():
    # ru_maxrss would report the parent's peak in a child: fork copies it and exec keeps it
    parent = np.ones(768 * 2**20, dtype=np.uint8)  # every page touched: the parent holds >= 768 MB
    child = (
        "import numpy as np; from pipeline.nn.outputs import peak_rss_mb; "
        "own = np.ones(64 * 2**20, dtype=np.uint8); print(peak_rss_mb())"
    )
    out = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout
    parent_rss = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    assert parent_rss >= 768 and parent.sum() == parent.size
    assert 64 <= float(out) < parent_rss - 512, (float(out), parent_rss)
