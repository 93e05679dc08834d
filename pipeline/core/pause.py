"""A pause point after a chosen epoch, so that a fault test injects its fault at a known moment
instead of hoping it lands in the middle of a training.

With ``PIPELINE_PAUSE_AT_EPOCH=N`` and ``PIPELINE_PAUSE_DIR=DIR`` in its environment, a training
that has just finished epoch N (its checkpoint written, and copied to a cluster's shared storage;
its metrics logged: ``pipeline.tracking.tracked``) writes ``DIR/paused-<pid>.json`` (atomically:
``{"epoch": N, "pid": ...}``) and waits until ``DIR/release`` exists, then goes on. The marker is
named after the process because several trainings (a sweep's trials on Ray) may share one DIR;
``release`` lets them all go. An epoch restored from a checkpoint is not one the training finished,
so a resumed training does not pause again at N. The wait is bounded (``LIMIT_S``): a test that
never releases fails the training, loudly, instead of hanging.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import PipelineError
from pipeline.core.files import write_json

EPOCH_ENV, DIR_ENV = "PIPELINE_PAUSE_AT_EPOCH", "PIPELINE_PAUSE_DIR"
PAUSE_ENV = (EPOCH_ENV, DIR_ENV)  # what a cluster's tasks must inherit from the driver for the pause to reach them
RELEASE_FILE = "release"
LIMIT_S = 600.0
POLL_S = 0.1


class PauseError(PipelineError):
    """The pause variables are wrong, or nobody released the pause in time."""


@dataclass(frozen=True)
class PausePoint:
    epoch: int
    directory: Path
    limit_s: float = LIMIT_S

    @classmethod
    def from_env(cls, environ=None) -> PausePoint | None:
        """The pause the environment asks for; None when neither variable is set."""
        environ = os.environ if environ is None else environ
        text, directory = environ.get(EPOCH_ENV), environ.get(DIR_ENV)
        if text is None and directory is None:
            return None
        if text is None or not directory:
            raise PauseError(f"Got {DIR_ENV}={directory!r} and {EPOCH_ENV}={text!r}: set both, or neither")
        if not (text.strip().isdigit() and int(text) >= 1):
            raise PauseError(f"Got {EPOCH_ENV}={text!r}: expected an epoch number, 1 or more")
        if not Path(directory).is_dir():
            raise PauseError(f"Got {DIR_ENV}={directory!r}: not an existing directory")
        return cls(int(text), Path(directory))

    def marker(self, pid: int | None = None) -> Path:
        return self.directory / f"paused-{os.getpid() if pid is None else pid}.json"

    def after_epoch(self, epoch: int) -> None:
        """Called once an epoch is finished and recorded: at the pause epoch, announce it and wait."""
        if epoch != self.epoch:
            return
        write_json(self.marker(), {"epoch": epoch, "pid": os.getpid()})
        release = self.directory / RELEASE_FILE
        deadline = time.monotonic() + self.limit_s
        while not release.exists():
            if time.monotonic() >= deadline:
                raise PauseError(
                    f"paused after epoch {epoch} ({EPOCH_ENV}), but no {release} within {self.limit_s:g} s"
                )
            time.sleep(POLL_S)
