"""One call of the table command (``TableConfig``): what to train and report, and how."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline import tracking
from pipeline.cluster.config import ClusterConfig
from pipeline.core.config import ConfigError
from pipeline.table.rows import Row, n_seeds
from pipeline.tracking import registry

__all__ = ["MAX_REPEATS", "TableConfig"]

MAX_REPEATS = 100  # the committee rows need 10 seeds; a billion would list a billion seeds before training


@dataclass(frozen=True)
class TableConfig:
    """One call of the table command: what to train and report, and how; validated where it is built."""

    keys: tuple[str, ...]  # the selected rows, in table order (rows.select_rows)
    repeats: int = 3
    quick: bool = False
    engine: str = "jax"
    device: str = "cpu"
    steps_per_call: int = 500
    tracking: tracking.TrackingConfig = dataclasses.field(
        default_factory=lambda: tracking.TrackingConfig(enabled=False)
    )
    cluster: ClusterConfig = ClusterConfig()  # one at a time in this process
    report_only: bool = False
    register: bool = False  # the best network by validation accuracy as a version of tracking.registered_model
    progress: bool = True

    def __post_init__(self):
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise ConfigError(f"Got --repeats {self.repeats}: must be 1 to {MAX_REPEATS} (seeds per row)")
        if self.register:
            registry.require_registry(self.tracking)

    def seeds_wanted(self, row: Row) -> int:
        return n_seeds(row, self.repeats, self.keys)
