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
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import PipelineError
from pipeline.core.files import save_npz, write_json
from pipeline.nn.architecture import build, resolve
from pipeline.nn.backend import Backend
from pipeline.nn.compiled import Inference
from pipeline.nn.network import Network

FORMAT = 1
WEIGHTS_FILE = "model.npz"
ARCHITECTURE_FILE = "architecture.json"
LAYOUT = (
    "conv filters (kh, kw, in_channels, filters); dense weights (n_in, n_out); "
    "activations channels-last, flattened as (height, width, channels); inputs 28x28 images / 255"
)
MAX_ARCHITECTURE_BYTES = 1 << 20  # a description of a few layers is a few kB


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

    def __init__(self, network: Network, backend: Backend, description: dict[str, Any], batch_size: int | None = None):
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
    description = read_description(arch)
    # resolve refuses unknown layer types, wrong types, sizes that do not chain and layers too large to allocate
    network = build(resolve(description["layers"], key=f"{arch}: layers"), rng=np.random.default_rng(0))
    shapes = {name: value.shape for name, value in zip(network.param_names(), network.get_values(), strict=True)}
    arrays = read_weights(weights, shapes, arch.name)
    network.set_values([arrays[name] for name in network.param_names()])
    return Model(network, Backend(engine, device), description)


def read_description(arch: Path) -> dict[str, Any]:
    """``architecture.json`` as a dict with the expected ``format`` and a ``layers`` entry, or a PipelineError."""
    size = arch.stat().st_size
    if size > MAX_ARCHITECTURE_BYTES:
        raise PipelineError(f"{arch}: {size} bytes, more than the {MAX_ARCHITECTURE_BYTES} a model description takes")
    try:
        description = json.loads(arch.read_bytes())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested beyond the parser
        raise PipelineError(f"{arch}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(description, dict):
        raise PipelineError(
            f"{arch}: expected a JSON object with 'format' and 'layers', got {type(description).__name__}"
        )
    if description.get("format") != FORMAT:
        raise PipelineError(f"{arch}: unknown model format {description.get('format')!r} (expected {FORMAT})")
    if "layers" not in description:
        raise PipelineError(f"{arch}: no 'layers' entry")
    return description


def read_weights(weights: Path, shapes: dict[str, tuple[int, ...]], described_by: str) -> dict[str, np.ndarray]:
    """The arrays ``shapes`` names from ``model.npz``, each checked to be finite float32 of its shape.

    Every array's header (dtype, shape) is read and checked before its data, so a tampered file can
    neither unpickle anything nor make the loader allocate more than the architecture needs.
    """
    if not zipfile.is_zipfile(weights):
        raise PipelineError(f"{weights}: not an .npz file (a zip archive of arrays)")
    arrays = {}
    try:
        with zipfile.ZipFile(weights) as archive:
            members = set(archive.namelist())
            for name, shape in shapes.items():
                if f"{name}.npy" not in members:
                    raise PipelineError(f"{weights}: no array named {name!r}; the file does not match {described_by}")
                with archive.open(f"{name}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise PipelineError(f"{weights}: array {name!r} has .npy format version {version}")
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else (np.lib.format.read_array_header_2_0)
                    )
                    found_shape, _, dtype = read_header(f)
                    if dtype.kind != "f" or dtype.itemsize != 4:
                        raise PipelineError(f"{weights}: array {name!r} has dtype {dtype}, expected float32")
                    if tuple(found_shape) != tuple(shape):
                        raise PipelineError(
                            f"{weights}: array {name!r} has shape {tuple(found_shape)}, "
                            f"{described_by} needs {tuple(shape)}"
                        )
                with archive.open(f"{name}.npy") as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
                arrays[name] = _check_finite(weights, name, array)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # a damaged header or archive
        raise PipelineError(f"{weights}: cannot read the arrays ({type(e).__name__}: {e})") from None
    return arrays


def _check_finite(weights: Path, name: str, array: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(array)
    if bad.any():
        nan = int(np.isnan(array).sum())
        raise PipelineError(
            f"{weights}: array {name!r} has {nan} NaN and {int(bad.sum()) - nan} infinite values of {array.size}; "
            "a model with weights that are not finite answers nothing meaningful"
        )
    if name.endswith(".var") and (array < 0).any():
        raise PipelineError(f"{weights}: array {name!r} (a batch_norm variance) has negative values")
    return array
