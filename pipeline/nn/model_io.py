"""Saved models: ``model.npz`` (parameters, no pickle) + ``architecture.json``, and the inference API.

``architecture.json`` holds the layer dicts (``pipeline.nn.architecture`` format), the cost and a
description of the array layout; ``model.npz`` holds one float32 array per parameter, named
``layer{i}.w`` / ``layer{i}.b`` (a batch_norm layer's ``layer{i}.gamma`` / ``.beta`` / ``.mean`` /
``.var``). Conv filters are stored (kh, kw, in_channels, filters) and dense weights (n_in, n_out),
with activations flattened channels-last (height, width, channels).

    model = load_model("data/model")
    labels = model.predict(images)           # uint8 (N, 28, 28) or float in [0, 1]; any N
    probabilities = model.predict_proba(images)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import PipelineError
from pipeline.core.files import load_npz, save_npz, write_json
from pipeline.nn.architecture import build, resolve
from pipeline.nn.backend import Backend
from pipeline.nn.network import Network
from pipeline.nn.trainer import Inference

FORMAT = 1
WEIGHTS_FILE = "model.npz"
ARCHITECTURE_FILE = "architecture.json"
LAYOUT = (
    "conv filters (kh, kw, in_channels, filters); dense weights (n_in, n_out); "
    "activations channels-last, flattened as (height, width, channels); inputs 28x28 images / 255"
)


def save_model(
    model_dir: str | Path,
    network: Network,
    values: list[np.ndarray] | None = None,
    *,
    cost: str = "log-likelihood",
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``network``'s parameters (or ``values``, in ``network.param_names()`` order) and architecture."""
    model_dir = Path(model_dir)
    values = network.get_values() if values is None else values
    arrays = dict(zip(network.param_names(), values, strict=True))
    description = {
        "format": FORMAT,
        "layers": network.spec(),
        "cost": cost,
        "layout": LAYOUT,
        "metadata": metadata or {},
    }
    save_npz(model_dir / WEIGHTS_FILE, **arrays)
    write_json(model_dir / ARCHITECTURE_FILE, description)


class Model:
    """A trained network ready for inference."""

    def __init__(self, network: Network, backend: Backend, description: dict[str, Any], batch_size: int = 500):
        self.network, self.backend, self.description = network, backend, description
        self._inference = Inference(network, backend, batch_size=batch_size)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (the output layer's activations), float32 (N, 10)."""
        return self._inference.probabilities(_check_images(images))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The most likely digit of each image, int64 (N,)."""
        return self.predict_proba(images).argmax(axis=1)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 2 and images.shape[1] == 784 or images.ndim == 3 and images.shape[1:] == (28, 28):
        return images
    if images.ndim == 2 and images.shape == (28, 28):
        raise PipelineError("predict takes a batch of images: pass images[None] for a single 28x28 image")
    raise PipelineError(f"predict takes images of shape (N, 28, 28) or (N, 784), got {images.shape}")


def load_model(model_dir: str | Path, *, engine: str | None = None, device: str = "cpu") -> Model:
    """Rebuild a saved model for inference on ``engine``/``device`` (default: this environment's
    default engine, jax, or theano-pymc in its own environment; the weights are the same on all)."""
    model_dir = Path(model_dir)
    weights, arch = model_dir / WEIGHTS_FILE, model_dir / ARCHITECTURE_FILE
    for path in (weights, arch):
        if not path.is_file():
            raise PipelineError(f"no trained model in {str(model_dir)!r}: {path.name} is missing (run the train stage)")
    description = json.loads(arch.read_text())
    if description.get("format") != FORMAT:
        raise PipelineError(f"{arch}: unknown model format {description.get('format')!r} (expected {FORMAT})")
    network = build(resolve(description["layers"], key=f"{arch}: layers"), rng=np.random.default_rng(0))
    arrays = load_npz(weights)
    missing = [name for name in network.param_names() if name not in arrays]
    if missing:
        raise PipelineError(f"{weights}: no array named {missing[0]!r}; the file does not match {arch.name}")
    try:
        network.set_values([arrays[name] for name in network.param_names()])
    except ValueError as e:
        raise PipelineError(f"{weights}: {e}") from None
    return Model(network, Backend(engine, device), description)
