"""Network architectures from ``params.yaml``: a named preset, or a list of layer dicts.

A layer dict names its ``type`` and the book's constructor arguments::

    {type: conv_pool, input: [1, 28, 28], filters: 20, kernel: 5, pool: 2, activation: relu}
    {type: fully_connected, n_in: 640, n_out: 100, activation: relu, p_dropout: 0.0}
    {type: softmax, n_in: 100, n_out: 10, p_dropout: 0.0}

and, beyond the book, batch normalization of the layer before, which then has ``activation: linear``
and hands its activation to the normalization (``pipeline.nn.layers.BatchNorm``)::

    {type: conv_pool, input: [1, 28, 28], filters: 32, kernel: 3, pool: 1, activation: linear}
    {type: batch_norm, shape: [32, 26, 26], activation: relu}

``input`` is (channels, height, width); a batch_norm ``shape`` is the layer before's output,
(channels, height, width) after a conv layer or (units,) after a dense one. Sizes are explicit, as
in network3.py, and checked when params are loaded: a layer whose input does not match the
previous layer's output is refused with a message naming both sizes, before anything is compiled.

The presets are the networks of the book's chapter 6 (plus chapter 1's and chapter 3's) and are
listed in ``PRESETS``; ``BOOK_SETTINGS`` records the hyperparameters the book trained each with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.config import ConfigError
from pipeline.nn.layers import ACTIVATIONS, BatchNorm, ConvPool, FullyConnected, Softmax
from pipeline.nn.network import Network

IMAGE_SHAPE = (1, 28, 28)
N_INPUTS = 784
N_CLASSES = 10
# The most float32 values a network's layers may hold, alone or together: 2**28, 1.07 GB of weights.
# Training keeps several copies of them (weights, gradients, momentum, the compiled graph's buffers)
# and building draws them in float64 first, so beyond this a layer ends in an allocation failure
# rather than a network; the book's largest network has 1.7 million.
MAX_PARAMETERS = 2**28

# type -> {key: default}; None marks a required key.
LAYER_KEYS: dict[str, dict[str, Any]] = {
    "conv_pool": {"input": None, "filters": None, "kernel": 5, "pool": 2, "activation": "sigmoid"},
    "fully_connected": {"n_in": None, "n_out": None, "activation": "sigmoid", "p_dropout": 0.0},
    "softmax": {"n_in": None, "n_out": N_CLASSES, "p_dropout": 0.0},
    "batch_norm": {"shape": None, "activation": "linear"},
}


def _conv1(activation: str) -> dict:  # 20 filters 5x5 on the 28x28 image, 2x2 max-pool -> 20x12x12
    return {"type": "conv_pool", "input": [1, 28, 28], "filters": 20, "kernel": 5, "pool": 2, "activation": activation}


def _conv2(activation: str) -> dict:  # 40 filters 5x5 on 20x12x12, 2x2 max-pool -> 40x4x4
    return {"type": "conv_pool", "input": [20, 12, 12], "filters": 40, "kernel": 5, "pool": 2, "activation": activation}


def _fc(n_in: int, n_out: int, activation: str, p_dropout: float = 0.0) -> dict:
    return {"type": "fully_connected", "n_in": n_in, "n_out": n_out, "activation": activation, "p_dropout": p_dropout}


def _softmax(n_in: int, p_dropout: float = 0.0) -> dict:
    return {"type": "softmax", "n_in": n_in, "n_out": N_CLASSES, "p_dropout": p_dropout}


PRESETS: dict[str, list[dict]] = {
    # chapter 6, in the order the book tries them
    "shallow": [_fc(784, 100, "sigmoid"), _softmax(100)],
    "conv1": [_conv1("sigmoid"), _fc(20 * 12 * 12, 100, "sigmoid"), _softmax(100)],
    "conv2": [_conv1("sigmoid"), _conv2("sigmoid"), _fc(40 * 4 * 4, 100, "sigmoid"), _softmax(100)],
    "conv2_relu": [_conv1("relu"), _conv2("relu"), _fc(640, 100, "relu"), _softmax(100)],
    "conv2_relu_fc300": [_conv1("relu"), _conv2("relu"), _fc(640, 300, "relu"), _softmax(300)],
    "conv2_relu_fc1000": [_conv1("relu"), _conv2("relu"), _fc(640, 1000, "relu"), _softmax(1000)],
    "conv2_relu_2fc100": [_conv1("relu"), _conv2("relu"), _fc(640, 100, "relu"), _fc(100, 100, "relu"), _softmax(100)],
    "conv2_relu_2fc300": [_conv1("relu"), _conv2("relu"), _fc(640, 300, "relu"), _fc(300, 300, "relu"), _softmax(300)],
    "conv2_relu_2fc1000": [
        _conv1("relu"),
        _conv2("relu"),
        _fc(640, 1000, "relu"),
        _fc(1000, 1000, "relu"),
        _softmax(1000),
    ],
    "conv2_relu_dropout": [
        _conv1("relu"),
        _conv2("relu"),
        _fc(640, 1000, "relu", 0.5),
        _fc(1000, 1000, "relu", 0.5),
        _softmax(1000, 0.5),
    ],
    # chapter 1's network.py [784, 30, 10] (quadratic cost) and chapter 3's network2.py [784, 100, 10]
    # (cross-entropy cost), both all-sigmoid
    "chapter1": [_fc(784, 30, "sigmoid"), _fc(30, 10, "sigmoid")],
    "chapter3": [_fc(784, 100, "sigmoid"), _fc(100, 10, "sigmoid")],
}

# How the book trained each preset (mini-batch size 10 throughout). lmbda is in network3.py's
# convention (see pipeline.nn.network): chapter 3's lmbda = 5.0 in network2.py is 0.5 here.
BOOK_SETTINGS: dict[str, dict[str, Any]] = {
    "shallow": {"epochs": 60, "eta": 0.1, "lmbda": 0.0, "dataset": "prepared", "cost": "log-likelihood"},
    "conv1": {"epochs": 60, "eta": 0.1, "lmbda": 0.0, "dataset": "prepared", "cost": "log-likelihood"},
    "conv2": {"epochs": 60, "eta": 0.1, "lmbda": 0.0, "dataset": "prepared", "cost": "log-likelihood"},
    "conv2_relu": {"epochs": 60, "eta": 0.03, "lmbda": 0.1, "dataset": "prepared", "cost": "log-likelihood"},
    "conv2_relu_fc300": {"epochs": 60, "eta": 0.03, "lmbda": 0.1, "dataset": "expanded", "cost": "log-likelihood"},
    "conv2_relu_fc1000": {"epochs": 60, "eta": 0.03, "lmbda": 0.1, "dataset": "expanded", "cost": "log-likelihood"},
    "conv2_relu_2fc100": {"epochs": 60, "eta": 0.03, "lmbda": 0.1, "dataset": "expanded", "cost": "log-likelihood"},
    "conv2_relu_2fc300": {"epochs": 60, "eta": 0.03, "lmbda": 0.1, "dataset": "expanded", "cost": "log-likelihood"},
    "conv2_relu_2fc1000": {"epochs": 60, "eta": 0.03, "lmbda": 0.1, "dataset": "expanded", "cost": "log-likelihood"},
    "conv2_relu_dropout": {"epochs": 40, "eta": 0.03, "lmbda": 0.0, "dataset": "expanded", "cost": "log-likelihood"},
    "chapter1": {"epochs": 30, "eta": 3.0, "lmbda": 0.0, "dataset": "prepared", "cost": "quadratic"},
    "chapter3": {"epochs": 30, "eta": 0.5, "lmbda": 0.5, "dataset": "prepared", "cost": "cross-entropy"},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _layer(raw: Any, where: str) -> dict:
    """Check one layer dict's keys and values; returns it with defaults filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"Got {where}={raw!r}: expected a mapping with a 'type' key")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in LAYER_KEYS:
        raise ConfigError(f"Got {where}.type={kind!r}: choose one of {', '.join(LAYER_KEYS)}")
    keys = LAYER_KEYS[kind]
    unknown = sorted(set(raw) - set(keys) - {"type"})
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]} (value {raw[unknown[0]]!r}); a {kind} layer takes: {', '.join(keys)}"
        )
    layer = {"type": kind}
    for key, default in keys.items():
        if key not in raw and default is None:
            raise ConfigError(f"{where} ({kind}) is missing the required key {key!r}")
        value = raw.get(key, default)
        name = f"{where}.{key}"
        if key == "input":
            if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) and v > 0 for v in value)):
                raise ConfigError(f"Got {name}={value!r}: expected [channels, height, width], three positive integers")
            value = [int(v) for v in value]
        elif key == "shape":
            if not (
                isinstance(value, (list, tuple)) and len(value) in (1, 3) and all(_is_int(v) and v > 0 for v in value)
            ):
                raise ConfigError(
                    f"Got {name}={value!r}: expected [units] or [channels, height, width], positive integers"
                )
            value = [int(v) for v in value]
        elif key == "activation":
            if not isinstance(value, str) or value not in ACTIVATIONS:
                raise ConfigError(f"Got {name}={value!r}: choose one of {', '.join(ACTIVATIONS)}")
        elif key == "p_dropout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"Got {name}={value!r}: expected a probability in [0, 1)")
            value = float(value)
        else:  # n_in, n_out, filters, kernel, pool
            if not _is_int(value) or value < 1:
                raise ConfigError(f"Got {name}={value!r}: expected a positive integer")
            value = int(value)
        layer[key] = value
    return layer


def _size(n_bytes: float) -> str:
    """``n_bytes`` in decimal units: 4.0 GB, 160 TB."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1000 or unit == "PB":
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    raise AssertionError  # unreachable


def _parameters(layer: dict) -> tuple[int, str]:
    """How many float32 values ``layer`` holds, and how that count comes about."""
    kind = layer["type"]
    if kind == "conv_pool":
        channels, k, filters = layer["input"][0], layer["kernel"], layer["filters"]
        return filters * channels * k * k + filters, f"filters={filters} x channels={channels} x kernel={k}x{k}"
    if kind == "batch_norm":
        units = layer["shape"][0]
        return 4 * units, f"4 x {units} units (gamma, beta, mean, var)"
    return layer["n_in"] * layer["n_out"] + layer["n_out"], f"n_in={layer['n_in']} x n_out={layer['n_out']}"


def _too_large(what: str, count: int) -> str:
    return (
        f"{what} {count:.1e} parameters ({_size(4 * count)} as float32): more than the {MAX_PARAMETERS:,} "
        f"({_size(4 * MAX_PARAMETERS)}) a network here may hold, since training keeps several copies of its "
        "weights in memory"
    )


def _output_shape(layer: dict, where: str) -> tuple[int, ...]:
    if layer["type"] == "batch_norm":
        return tuple(layer["shape"])
    if layer["type"] != "conv_pool":
        return (layer["n_out"],)
    channels, height, width = layer["input"]
    conv_h, conv_w = height - layer["kernel"] + 1, width - layer["kernel"] + 1
    if min(conv_h, conv_w) < layer["pool"]:
        raise ConfigError(
            f"Got {where}.kernel={layer['kernel']}, pool={layer['pool']}: they do not fit the "
            f"{height}x{width} input of {where}"
        )
    return (layer["filters"], conv_h // layer["pool"], conv_w // layer["pool"])


def resolve(architecture: str | list, key: str = "train.architecture") -> list[dict]:
    """A preset name or a list of layer dicts -> validated layer dicts (defaults filled in).

    Raises ConfigError naming ``key[i].field`` and the value for anything that cannot be built.
    """
    if isinstance(architecture, str):
        if architecture not in PRESETS:
            raise ConfigError(
                f"Got {key}={architecture!r}: not a preset; presets: {', '.join(PRESETS)} (or give a list of layers)"
            )
        raw, prefix = PRESETS[architecture], f"{key} (preset {architecture})"
    elif isinstance(architecture, (list, tuple)) and architecture:
        raw, prefix = architecture, key
    else:
        raise ConfigError(f"Got {key}={architecture!r}: expected a preset name or a non-empty list of layers")
    layers = [_layer(item, f"{prefix}[{i}]") for i, item in enumerate(raw)]
    # before the sizes are chained: a layer too large to allocate is refused as that, whatever else is wrong
    total = 0
    for i, layer in enumerate(layers):
        count, how = _parameters(layer)
        if count > MAX_PARAMETERS:
            raise ConfigError(f"Got {prefix}[{i}]: " + _too_large(f"{layer['type']} {how} is", count))
        total += count
    if total > MAX_PARAMETERS:
        raise ConfigError(f"Got {prefix}: " + _too_large(f"its {len(layers)} layers together have", total))
    previous: tuple[int, ...] = IMAGE_SHAPE
    previous_name = "the input image"
    for i, layer in enumerate(layers):
        where = f"{prefix}[{i}]"
        if layer["type"] == "conv_pool":
            wanted = tuple(layer["input"])
            # after a dense layer a conv layer may re-read its values as an image of the same size
            if wanted != previous and (len(previous) == 3 or int(np.prod(wanted)) != previous[0]):
                raise ConfigError(
                    f"Got {where}.input={list(wanted)}: {previous_name} outputs "
                    f"{list(previous)} ({int(np.prod(previous))} values)"
                )
        elif layer["type"] == "batch_norm":
            if tuple(layer["shape"]) != previous:
                raise ConfigError(f"Got {where}.shape={layer['shape']}: {previous_name} outputs {list(previous)}")
        else:
            size = int(np.prod(previous))
            if layer["n_in"] != size:
                raise ConfigError(f"Got {where}.n_in={layer['n_in']}: {previous_name} outputs {size} values")
        previous = _output_shape(layer, where)
        previous_name = f"{where} ({layer['type']})"
    if previous != (N_CLASSES,):
        raise ConfigError(
            f"Got {prefix}[{len(layers) - 1}] with {int(np.prod(previous))} outputs: the last layer "
            f"must have n_out={N_CLASSES}, one per digit"
        )
    return layers


def build(layers: list[dict], *, rng: np.random.Generator, init: str = "book") -> Network:
    """Create the layers (weights drawn from ``rng`` in order) and the Network. ``layers`` from ``resolve``."""
    built = []
    for i, spec in enumerate(layers):
        name = f"layer{i}"
        if spec["type"] == "conv_pool":
            built.append(
                ConvPool(
                    spec["input"],
                    spec["filters"],
                    spec["kernel"],
                    spec["pool"],
                    spec["activation"],
                    rng=rng,
                    init=init,
                    name=name,
                )
            )
        elif spec["type"] == "fully_connected":
            built.append(
                FullyConnected(
                    spec["n_in"], spec["n_out"], spec["activation"], spec["p_dropout"], rng=rng, init=init, name=name
                )
            )
        elif spec["type"] == "batch_norm":
            built.append(BatchNorm(spec["shape"], spec["activation"], rng=rng, init=init, name=name))
        else:
            built.append(Softmax(spec["n_in"], spec["n_out"], spec["p_dropout"], rng=rng, init=init, name=name))
    return Network(built)
