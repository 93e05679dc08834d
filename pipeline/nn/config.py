"""The ``train`` section of params.yaml as a typed, validated dataclass, and where a training's files are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import ConfigError, PipelineError, require
from pipeline.nn.architecture import build, resolve
from pipeline.nn.backend import DEVICES, ENGINES, engine_unavailable
from pipeline.nn.layers import INITS
from pipeline.nn.network import COSTS


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "prepared"
    architecture: str | list[dict] = "conv2_relu"
    epochs: int = 20
    batch_size: int = 10
    eta: float = 0.03
    lmbda: float = 0.1
    cost: str = "log-likelihood"
    init: str = "book"
    seed: int = 12345
    shuffle: bool = True
    engine: str = "jax"
    device: str = "cpu"
    momentum: float = 0.0
    lr_decay: float = 1.0
    early_stopping_patience: int = 0
    steps_per_call: int = 500
    distort_rotation: float = 0.0
    distort_scale: float = 0.0
    distort_alpha: float = 0.0
    distort_sigma: float = 4.0

    def __post_init__(self):
        require(self.dataset in ("prepared", "expanded"), "train.dataset", self.dataset, "choose prepared or expanded")
        layers = resolve(self.architecture, "train.architecture")
        require(self.epochs >= 1, "train.epochs", self.epochs, "must be at least 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be at least 1")
        require(self.eta > 0, "train.eta", self.eta, "the learning rate must be positive")
        require(self.lmbda >= 0, "train.lmbda", self.lmbda, "the L2 strength must be 0 (off) or positive")
        require(self.cost in COSTS, "train.cost", self.cost, f"choose one of {', '.join(COSTS)}")
        require(
            self.init in INITS,
            "train.init",
            self.init,
            "choose book (the book's N(0, 1/n_out)) or corrected (N(0, 1/n_in))",
        )
        require(self.seed >= 0, "train.seed", self.seed, "must be a non-negative integer")
        require(self.engine in ENGINES, "train.engine", self.engine, f"choose one of {', '.join(ENGINES)}")
        require(self.device in DEVICES, "train.device", self.device, f"choose one of {', '.join(DEVICES)}")
        require(
            self.device == "cpu" or self.engine == "jax",
            "train.device",
            self.device,
            "a GPU needs train.engine: jax (the c and theano-pymc engines run on the CPU only)",
        )
        # an engine that this environment lacks (theano-pymc lives in its own) fails here, before any data is read
        require(not engine_unavailable(self.engine), "train.engine", self.engine, engine_unavailable(self.engine))
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1); 0 turns momentum off")
        require(
            0 < self.lr_decay <= 1,
            "train.lr_decay",
            self.lr_decay,
            "eta is multiplied by this after every epoch; must be in (0, 1], 1 is off",
        )
        require(
            self.early_stopping_patience >= 0,
            "train.early_stopping_patience",
            self.early_stopping_patience,
            "epochs without a better validation accuracy before stopping; 0 is off",
        )
        require(self.steps_per_call >= 1, "train.steps_per_call", self.steps_per_call, "must be at least 1")
        require(
            0 <= self.distort_rotation <= 180,
            "train.distort_rotation",
            self.distort_rotation,
            "the largest rotation, in degrees: 0 (off) to 180",
        )
        require(
            0 <= self.distort_scale < 1,
            "train.distort_scale",
            self.distort_scale,
            "images are scaled by a factor in [1 - s, 1 + s]: must be in [0, 1), 0 is off",
        )
        require(
            self.distort_alpha >= 0,
            "train.distort_alpha",
            self.distort_alpha,
            "the elastic displacement scale, in pixels: must be >= 0, 0 is off",
        )
        require(
            self.distort_sigma > 0,
            "train.distort_sigma",
            self.distort_sigma,
            "the width of the Gaussian that smooths the elastic field, in pixels: must be > 0",
        )
        try:
            build(layers, rng=np.random.default_rng(0)).check_cost(self.cost)
        except ValueError as e:
            raise ConfigError(f"Got train.cost={self.cost!r}: {e}") from None

    def layers(self) -> list[dict]:
        return resolve(self.architecture, "train.architecture")

    def distortion(self) -> dict | None:
        """The settings of :func:`pipeline.data.distort.distort` for every epoch's images, or None when off."""
        if not (self.distort_rotation or self.distort_scale or self.distort_alpha):
            return None
        return {
            "rotation": self.distort_rotation,
            "scale": self.distort_scale,
            "alpha": self.distort_alpha,
            "sigma": self.distort_sigma,
        }

    def eta_at(self, epoch: int) -> float:
        """The learning rate of 1-based ``epoch``: eta * lr_decay**(epoch - 1)."""
        return self.eta * self.lr_decay ** (epoch - 1)


@dataclass(frozen=True)
class TrainPaths:
    """Where one training reads its two data sets and writes its model, checkpoints and metrics."""

    train: Path  # the training set's .npz
    validation: Path
    model: Path
    checkpoints: Path
    metrics: Path

    @classmethod
    def of(
        cls,
        config: TrainConfig,
        *,
        prepared: Path,
        expanded: Path | None,
        model: Path,
        checkpoints: Path,
        metrics: Path,
    ) -> TrainPaths:
        """The paths of a training on ``config.dataset``: the prepared or the expanded ``train.npz``,
        and always the prepared ``validation.npz``."""
        source = Path(prepared) if config.dataset == "prepared" else expanded
        if source is None:
            raise PipelineError("train.dataset is expanded but no expanded data directory was given")
        return cls(
            Path(source) / "train.npz", Path(prepared) / "validation.npz", Path(model), Path(checkpoints), Path(metrics)
        )

    def require_data(self) -> None:
        """Fail before anything starts when a data set is missing."""
        for path in (self.train, self.validation):
            if not path.is_file():
                raise PipelineError(f"{path} not found (run the data stages first: dvc repro)")
