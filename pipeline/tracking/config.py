"""The ``tracking`` section of params.yaml."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import require

__all__ = ["TrackingConfig"]


@dataclass(frozen=True)
class TrackingConfig:
    """The ``tracking`` section of params.yaml."""

    experiment: str = "nndl-chapter6"
    enabled: bool = True
    # the Model Registry's model that evaluate adds a version to: None is "<experiment>-model", "" is none
    registered_model: str | None = None
    system_metrics: bool = True  # CPU, memory, disk, network (GPU with nvidia-ml-py) while a training runs

    def __post_init__(self):
        require(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "must not be empty")
        if self.registered_model is not None:
            name = self.registered_model
            require(name == name.strip(), "tracking.registered_model", name, "must not start or end with spaces")
            require("'" not in name and "/" not in name, "tracking.registered_model", name, "must not hold ' or /")

    @property
    def registered_model_name(self) -> str | None:
        """The registered model's name, or None when registering is off."""
        if self.registered_model is None:
            return f"{self.experiment}-model"
        return self.registered_model or None
