"""Architectures from params: presets build, and bad layer lists are refused naming key and value."""

import subprocess
import sys

import numpy as np
import pytest
import yaml

from pipeline.core.config import ConfigError
from pipeline.nn.architecture import BOOK_SETTINGS, MAX_PARAMETERS, PRESETS, build, resolve


def n_params(layers):
    return build(resolve(layers), rng=np.random.default_rng(0)).count_params()


def test_every_preset_resolves_builds_and_has_book_settings():
    assert set(PRESETS) == set(BOOK_SETTINGS)
    for name in PRESETS:
        net = build(resolve(name), rng=np.random.default_rng(0))
        assert net.n_in == 784 and net.n_out == 10, name
        net.check_cost(BOOK_SETTINGS[name]["cost"])


def test_preset_sizes_match_the_book():
    # conv 20x(1x5x5)+20, conv 40x(20x5x5)+40, FC 640x100+100, softmax 100x10+10
    assert n_params("conv2_relu") == 520 + 20040 + 64100 + 1010
    assert n_params("shallow") == 784 * 100 + 100 + 1010
    assert n_params("chapter1") == 784 * 30 + 30 + 30 * 10 + 10
    dropout = build(resolve("conv2_relu_dropout"), rng=np.random.default_rng(0))
    assert [layer.p_dropout for layer in dropout.layers] == [0, 0, 0.5, 0.5, 0.5]
    assert dropout.dropout_layers == [2, 3, 4]


def test_a_layer_list_gets_defaults():
    layers = resolve([{"type": "fully_connected", "n_in": 784, "n_out": 10}])
    assert layers == [{"type": "fully_connected", "n_in": 784, "n_out": 10, "activation": "sigmoid", "p_dropout": 0.0}]


def test_batch_norm_layers_take_the_shape_before_them_and_add_two_parameters_per_unit():
    layers = resolve(
        [
            {"type": "conv_pool", "input": [1, 28, 28], "filters": 4, "kernel": 5, "pool": 2, "activation": "linear"},
            {"type": "batch_norm", "shape": [4, 12, 12], "activation": "relu"},
            {"type": "conv_pool", "input": [4, 12, 12], "filters": 6, "kernel": 5, "pool": 2, "activation": "relu"},
            {"type": "fully_connected", "n_in": 96, "n_out": 20, "activation": "linear"},
            {"type": "batch_norm", "shape": [20]},
            {"type": "softmax", "n_in": 20},
        ]
    )
    assert layers[4] == {"type": "batch_norm", "shape": [20], "activation": "linear"}
    net = build(layers, rng=np.random.default_rng(0))
    assert net.spec() == layers
    assert net.count_params() == (100 + 4) + 2 * 4 + (4 * 25 * 6 + 6) + (96 * 20 + 20) + 2 * 20 + (20 * 10 + 10)


@pytest.mark.parametrize(
    "layers, message",
    [
        (
            [{"type": "fully_connected", "n_in": 784, "n_out": 100}, {"type": "softmax", "n_in": 30}],
            r"Got train.architecture\[1\].n_in=30: train.architecture\[0\] \(fully_connected\) outputs 100 values",
        ),
        (
            [
                {"type": "conv_pool", "input": [1, 28, 28], "filters": 20},
                {"type": "conv_pool", "input": [20, 14, 14], "filters": 40},
            ],
            r"Got train.architecture\[1\].input=\[20, 14, 14\]: "
            r"train.architecture\[0\] \(conv_pool\) outputs \[20, 12, 12\]",
        ),
        ([{"type": "fully_connected", "n_in": 100, "n_out": 10}], r"n_in=100: the input image outputs 784 values"),
        ([{"type": "fully_connected", "n_in": 784, "n_out": 30}], r"must have n_out=10"),
        ([{"type": "dense", "n_in": 784}], r"Got train.architecture\[0\].type='dense'"),
        ([{"type": "softmax", "n_in": 784, "size": 3}], r"unknown key train.architecture\[0\].size \(value 3\)"),
        ([{"type": "softmax"}], r"train.architecture\[0\] \(softmax\) is missing the required key 'n_in'"),
        ([{"type": "fully_connected", "n_in": 784, "n_out": 10, "activation": "elu"}], r"activation='elu'"),
        ([{"type": "softmax", "n_in": 784, "p_dropout": 1.5}], r"p_dropout=1.5"),
        ([{"type": "softmax", "n_in": "784"}], r"n_in='784': expected a positive integer"),
        (
            [
                {"type": "conv_pool", "input": [1, 28, 28], "filters": 4, "pool": 2, "activation": "linear"},
                {"type": "batch_norm", "shape": [4, 24, 24]},
                {"type": "softmax", "n_in": 576},
            ],
            r"Got train.architecture\[1\].shape=\[4, 24, 24\]: "
            r"train.architecture\[0\] \(conv_pool\) outputs \[4, 12, 12\]",
        ),
        (
            [{"type": "batch_norm", "shape": [784, 1]}],
            r"Got train.architecture\[0\].shape=\[784, 1\]: expected \[units\]",
        ),
        ([{"type": "batch_norm"}], r"train.architecture\[0\] \(batch_norm\) is missing the required key 'shape'"),
        ("conv3", r"Got train.architecture='conv3': not a preset"),
        ([], r"expected a preset name or a non-empty list"),
    ],
)
def test_bad_architectures_are_refused(layers, message):
    with pytest.raises(ConfigError, match=message):
        resolve(layers)


def test_every_preset_is_named_in_the_help_and_the_docs_and_no_other(capsys):
    import re
    from pathlib import Path

    from pipeline.stages.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert all(name in shown for name in PRESETS)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    section = docs.split("## The network: presets")[1].split("\n## ")[0]
    named = {name for name in re.findall(r"`(\w+)`", section) if re.fullmatch(r"shallow|conv\w*|chapter\d", name)}
    assert named == set(PRESETS)


HUGE = [
    {"type": "fully_connected", "n_in": 784, "n_out": 100},
    {"type": "fully_connected", "n_in": 100_000_000, "n_out": 100_000},
    {"type": "softmax", "n_in": 100_000},
]


@pytest.mark.parametrize(
    "layers, message",
    [
        (
            HUGE,
            r"Got train.architecture\[1\]: fully_connected n_in=100000000 x n_out=100000 is 1.0e\+13 parameters "
            r"\(40 TB as float32\): more than the 268,435,456 \(1.07 GB\) a network here may hold",
        ),
        (
            [{"type": "conv_pool", "input": [1, 28, 28], "filters": 20_000_000}],
            r"Got train.architecture\[0\]: conv_pool filters=20000000 x channels=1 x kernel=5x5 is 5.2e\+08 parameters "
            r"\(2.08 GB as float32\)",
        ),
        (
            [{"type": "fully_connected", "n_in": 784, "n_out": 10}, {"type": "batch_norm", "shape": [10**8]}],
            r"Got train.architecture\[1\]: batch_norm 4 x 100000000 units \(gamma, beta, mean, var\) is 4.0e\+08",
        ),
        (
            [
                {"type": "fully_connected", "n_in": 784, "n_out": 200_000},
                {"type": "fully_connected", "n_in": 200_000, "n_out": 1_000},
                {"type": "softmax", "n_in": 1_000},
            ],
            r"Got train.architecture: its 3 layers together have 3.6e\+08 parameters \(1.43 GB as float32\)",
        ),
    ],
)
def test_layers_too_large_to_allocate_are_refused_naming_layer_and_size(layers, message):
    with pytest.raises(ConfigError, match=message):
        resolve(layers)


def test_the_largest_allowed_layer_still_resolves():
    n_out = (MAX_PARAMETERS - 10) // (785 + 10)  # the two layers together at the limit
    layers = resolve([{"type": "fully_connected", "n_in": 784, "n_out": n_out}, {"type": "softmax", "n_in": n_out}])
    assert layers[0]["n_out"] == n_out


def test_the_train_stage_refuses_a_huge_layer_in_one_line(tmp_path):
    """Sizes that chain correctly, so only the size is wrong: it used to end in NumPy's allocation traceback."""
    huge = [{"type": "fully_connected", "n_in": 784, "n_out": 10**9}, {"type": "softmax", "n_in": 10**9}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"architecture": huge}}))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--params", "params.yaml", "--no-progress"]
        + ["--prepared", "prepared", "--model", "model", "--checkpoints", "checkpoints", "--metrics", "metrics"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: params.yaml: Got train.architecture[0]: fully_connected n_in=784 x n_out=1000000000 is 7.8e+11 "
        "parameters (3.14 TB as float32): more than the 268,435,456 (1.07 GB) a network here may hold, since training "
        "keeps several copies of its weights in memory"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
