"""One call of the sweep command (``SweepConfig``): the search space, the search, where it runs and logs."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from pipeline import tracking
from pipeline.cluster.config import ClusterConfig
from pipeline.core.config import ConfigError
from pipeline.sweep.space import SearchSpace
from pipeline.tracking import registry

__all__ = ["NAME", "SEARCHES", "SweepConfig"]

SEARCHES = ("grid", "optuna")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class SweepConfig:
    """One call of the sweep command; validated where it is built."""

    name: str  # the sweep: its folder, its MLflow parent run, its Optuna study
    space: SearchSpace
    search: str = "grid"
    trials: int | None = None  # optuna: the study's total of finished trials
    study_storage: str | None = None  # optuna: an RDB URL; None: $OPTUNA_STORAGE, else SQLite in OUT
    seed: int | None = None
    cluster: ClusterConfig = ClusterConfig()
    tracking: tracking.TrackingConfig = dataclasses.field(default_factory=tracking.TrackingConfig)
    register: bool = False  # the best trial's model as a version of tracking.registered_model
    progress: bool = True

    def __post_init__(self):
        if not NAME.match(self.name):
            raise ConfigError(f"Got --name {self.name!r}: use letters, digits, '.', '_' and '-' (a folder name)")
        if self.search not in SEARCHES:
            raise ConfigError(f"Got --search {self.search!r}: must be one of {', '.join(SEARCHES)}")
        if self.search == "optuna" and (self.trials is None or self.trials < 1):
            raise ConfigError(f"Got --trials {self.trials}: an Optuna search needs --trials N, N at least 1")
        if self.register:
            registry.require_registry(self.tracking)
        if self.search == "grid" and self.trials is not None:
            raise ConfigError(f"Got --trials {self.trials} with --search grid: a grid trains every point")
        if not self.space.swept():
            raise ConfigError("a sweep needs at least one -S key=v1,v2 (or a range/interval) to vary")
