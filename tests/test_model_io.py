"""Saving a model without pickle, loading it, and the predict / predict_proba API."""

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from pipeline.core.config import PipelineError
from pipeline.nn.architecture import build, resolve
from pipeline.nn.model_io import load_model, save_model

from reference import np_conv, np_pool
from synthetic import write_prepared

LAYERS = [
    {"type": "conv_pool", "input": [1, 28, 28], "filters": 3, "kernel": 5, "pool": 4, "activation": "tanh"},
    {"type": "fully_connected", "n_in": 108, "n_out": 12, "activation": "sigmoid", "p_dropout": 0.5},
    {"type": "softmax", "n_in": 12, "n_out": 10},
]


def np_probabilities(net, images):
    """An independent NumPy forward pass of LAYERS (channels-last, inference-time dropout scaling)."""
    conv, fc, soft = [[p.get_value() for p in layer.params] for layer in net.layers]
    x = images.reshape(-1, 28, 28, 1).astype(np.float64) / 255
    w, b = conv
    y = np.zeros((len(x), 24, 24, 3))
    for i in range(5):
        for j in range(5):
            y += np.einsum("nhwc,cf->nhwf", x[:, i : i + 24, j : j + 24, :], w[i, j])
    y = y.reshape(len(x), 6, 4, 6, 4, 3).max(axis=(2, 4))
    h = np.tanh(y + b).reshape(len(x), -1)
    h = 1 / (1 + np.exp(-(0.5 * h @ fc[0] + fc[1])))
    z = h @ soft[0] + soft[1]
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(4)
    net = build(resolve(LAYERS), rng=rng)
    net.layers[-1].w.set_value(rng.normal(size=(12, 10)).astype(np.float32))
    model_dir = tmp_path_factory.mktemp("model")
    save_model(model_dir, net, metadata={"note": "test"})
    return net, model_dir


def test_files_are_plain_npz_and_json(saved):
    net, model_dir = saved
    with np.load(model_dir / "model.npz", allow_pickle=False) as arrays:
        assert sorted(arrays.files) == sorted(net.param_names())
        assert all(arrays[name].dtype == np.float32 for name in arrays.files)
    description = json.loads((model_dir / "architecture.json").read_text())
    assert description["layers"] == resolve(LAYERS)
    assert description["metadata"] == {"note": "test"}


def test_loaded_model_predicts_like_a_numpy_forward_pass(saved):
    net, model_dir = saved
    model = load_model(model_dir)
    images = np.random.default_rng(5).integers(0, 256, (501, 28, 28), dtype=np.uint8)  # a padded last batch
    probabilities = model.predict_proba(images)
    assert probabilities.shape == (501, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, np_probabilities(net, images), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(model.predict(images), probabilities.argmax(axis=1))


def test_predict_takes_any_number_of_uint8_or_float_images(saved):
    _, model_dir = saved
    model = load_model(model_dir)
    images = np.random.default_rng(6).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    as_float = (images.astype(np.float32) / 255).reshape(7, 784)
    np.testing.assert_allclose(model.predict_proba(as_float), model.predict_proba(images), rtol=1e-6)
    assert model.predict(images[:1]).shape == (1,)
    assert model.predict(images[:0]).shape == (0,)
    with pytest.raises(PipelineError, match="images\\[None\\]"):
        model.predict(images[0])
    with pytest.raises(PipelineError, match=r"got \(3, 10\)"):
        model.predict(np.zeros((3, 10)))


def test_loading_a_missing_or_mismatched_model_is_a_clear_error(saved, tmp_path):
    with pytest.raises(PipelineError, match="model.npz is missing"):
        load_model(tmp_path)
    _, model_dir = saved
    (tmp_path / "architecture.json").write_text((model_dir / "architecture.json").read_text())
    np.savez(tmp_path / "model.npz", other=np.zeros(3, np.float32))
    with pytest.raises(PipelineError, match="no array named 'layer0.w'"):
        load_model(tmp_path)


def test_a_batch_norm_model_keeps_its_statistics_and_predicts_with_them(tmp_path):
    layers = resolve(
        [
            {"type": "conv_pool", "input": [1, 28, 28], "filters": 2, "kernel": 5, "pool": 4, "activation": "linear"},
            {"type": "batch_norm", "shape": [2, 6, 6], "activation": "relu"},
            {"type": "softmax", "n_in": 72, "n_out": 10},
        ]
    )
    rng = np.random.default_rng(6)
    net = build(layers, rng=rng)
    values = [rng.normal(size=v.shape).astype(np.float32) for v in net.get_values()]
    values[-1] = np.abs(values[-1])  # the variance
    net.set_values(values)
    save_model(tmp_path, net)
    with np.load(tmp_path / "model.npz", allow_pickle=False) as arrays:
        assert {"layer1.gamma", "layer1.beta", "layer1.mean", "layer1.var"} <= set(arrays.files)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    conv_w, conv_b, gamma, beta, soft_w, soft_b, mean, var = (v.astype(np.float64) for v in values)
    y = np_pool(np_conv(images.reshape(-1, 28, 28, 1) / 255, conv_w), 4) + conv_b  # (7, 6, 6, 2)
    h = np.maximum(gamma * (y - mean) / np.sqrt(var + 1e-5) + beta, 0).reshape(7, -1)
    z = h @ soft_w + soft_b
    reference = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(
        load_model(tmp_path).predict_proba(images),
        reference / reference.sum(axis=1, keepdims=True),
        rtol=1e-4,
        atol=1e-6,
    )


# -- tampered model directories: one clear PipelineError naming the file -----------------------------
def tampered(model_dir, tmp_path, *, architecture=None, arrays=None, raw_weights=None):
    """A copy of ``model_dir`` whose architecture.json text, or model.npz arrays / bytes, are replaced."""
    out = tmp_path / "tampered"
    out.mkdir()
    (out / "architecture.json").write_bytes(
        (model_dir / "architecture.json").read_bytes() if architecture is None else architecture
    )
    if raw_weights is not None:
        (out / "model.npz").write_bytes(raw_weights)
    else:
        with np.load(model_dir / "model.npz", allow_pickle=False) as original:
            values = {name: original[name] for name in original.files}
        np.savez(out / "model.npz", **(arrays(values) if arrays else values))
    return out


def with_layers(layers):
    return json.dumps({"format": 1, "layers": layers}).encode()


def replaced(name, value):
    return lambda values: {**values, name: value}


def with_nan(name, index, value):
    def change(values):
        array = values[name].copy()
        array.flat[index] = value
        return {**values, name: array}

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": b"{not json"}, r"architecture.json: not valid JSON \(JSONDecodeError"),
        ({"architecture": b"\xff\xfe\x00"}, r"architecture.json: not valid JSON \(UnicodeDecodeError"),
        ({"architecture": b"[" * 100_000 + b"]" * 100_000}, r"architecture.json: not valid JSON \(RecursionError"),
        (
            {"architecture": b"[1, 2]"},
            r"architecture.json: expected a JSON object with 'format' and 'layers', got list",
        ),
        ({"architecture": b'{"layers": []}'}, r"architecture.json: unknown model format None \(expected 1\)"),
        ({"architecture": b'{"format": 1}'}, r"architecture.json: no 'layers' entry"),
        (
            {"architecture": with_layers([{"type": "dense", "n_in": 784, "n_out": 10}])},
            r"architecture.json: layers\[0\].type='dense': choose one of",
        ),
        (
            {"architecture": with_layers([{"type": ["softmax"], "n_in": 784}])},
            r"architecture.json: layers\[0\].type=\['softmax'\]: choose one of",
        ),
        (
            {"architecture": with_layers([{"type": "softmax", "n_in": "784"}])},
            r"architecture.json: layers\[0\].n_in='784': expected a positive integer",
        ),
        (
            {"architecture": with_layers([{"type": "fully_connected", "n_in": 784, "n_out": 10, "activation": {}}])},
            r"architecture.json: layers\[0\].activation=\{\}: choose one of",
        ),
        (
            {"architecture": with_layers([{"type": "softmax", "n_in": 784, "n_out": 10, "p_dropout": float("nan")}])},
            r"architecture.json: layers\[0\].p_dropout=nan: expected a probability",
        ),
        (
            {"architecture": with_layers([{"type": "fully_connected", "n_in": 784, "n_out": 10**9}])},
            r"architecture.json: layers\[0\]: fully_connected n_in=784 x n_out=1000000000 is 7.8e\+11 parameters",
        ),
        ({"raw_weights": b"not a zip file"}, r"model.npz: not an .npz file"),
        (
            {"arrays": replaced("layer1.b", np.array([None] * 12, dtype=object))},
            r"model.npz: array 'layer1.b' has dtype object, expected float32",
        ),
        (
            {"arrays": lambda v: {**v, "layer1.w": v["layer1.w"].astype(np.float64)}},
            r"model.npz: array 'layer1.w' has dtype float64, expected float32",
        ),
        (
            {"arrays": replaced("layer2.b", np.zeros(3, np.float32))},
            r"model.npz: array 'layer2.b' has shape \(3,\), architecture.json needs \(10,\)",
        ),
        (
            {"arrays": replaced("layer0.w", np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (10**6,), (0,)))},
            r"model.npz: array 'layer0.w' has shape \(1000000,\), architecture.json needs \(5, 5, 1, 3\)",
        ),
        (
            {"arrays": with_nan("layer1.w", 7, np.nan)},
            r"model.npz: array 'layer1.w' has 1 NaN and 0 infinite values of 1296; a model with weights",
        ),
        ({"arrays": with_nan("layer2.b", 0, -np.inf)}, r"model.npz: array 'layer2.b' has 0 NaN and 1 infinite"),
    ],
)
def test_a_tampered_model_directory_is_refused_naming_the_file(saved, tmp_path, change, message):
    _, model_dir = saved
    with pytest.raises(PipelineError, match=message):
        load_model(tampered(model_dir, tmp_path, **change))


def test_an_npz_member_claiming_a_huge_array_is_refused_before_reading_it(saved, tmp_path):
    _, model_dir = saved
    out = tampered(model_dir, tmp_path)
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(out / "model.npz", "a") as archive:
        archive.writestr("layer0.b.npy", member.getvalue() + bytes(64))  # a duplicate name: the last one is read
    with pytest.raises(PipelineError, match=r"model.npz: array 'layer0.b' has shape \(1000000000000,\)"):
        load_model(out)


@pytest.mark.parametrize("stage", ["evaluate", "ensemble"])
def test_the_stages_refuse_a_model_with_nan_weights_in_one_line(saved, tmp_path, stage):
    _, model_dir = saved
    bad = tampered(model_dir, tmp_path, arrays=with_nan("layer1.w", 7, np.nan))
    data = write_prepared(tmp_path / "prepared", sizes={"test": 20}) / "test.npz"
    (tmp_path / "params.yaml").write_text("tracking: {enabled: false}\n")
    args = {
        "evaluate": ["--model", str(bad), "--test", str(data), "--out", "out", "--metrics", "out/metrics.json"],
        "ensemble": [str(model_dir), str(bad), "--data", str(data), "--out", "out/ensemble.json", "--no-progress"],
    }[stage]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", stage, "--params", "params.yaml", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {bad / 'model.npz'}: array 'layer1.w' has 1 NaN and 0 infinite values of 1296; "
        "a model with weights that are not finite answers nothing meaningful"
    ]
    assert not (tmp_path / "out").exists()
