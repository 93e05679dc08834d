"""The train stage itself, timed: ``python -m pipeline train`` in a child process on synthetic data.

The child is the real train stage on a temporary directory (tracking off: a measurement, not a run
for the repository's MLflow store), with validation on 10,000 images and a checkpoint every epoch;
its timings file gives its peak RSS and each epoch's images per second.
``python -m pipeline.benchmarks.train --memory`` prints the peak of one epoch on 250,000 images
against the goal; ``--stage`` the speed of epochs after the first (no compiling) beside the
benchmark's figure for the same network and batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.nn.outputs import TIMINGS_FILE

__all__ = ["train_stage_timings"]


def train_stage_timings(images: int, batch_size: int, epochs: int = 1) -> dict:
    """The timings file of the train stage run for ``epochs`` on ``images`` synthetic images of the
    expanded set (the benchmark's network) in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prepared").mkdir()
        (tmp / "expanded").mkdir()
        rng = np.random.default_rng(0)
        np.savez(
            tmp / "expanded" / "train.npz",
            images=rng.integers(0, 256, (images, 28, 28), dtype=np.uint8),
            labels=rng.integers(0, 10, images).astype(np.uint8),
        )
        np.savez(
            tmp / "prepared" / "validation.npz",
            images=rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8),
            labels=rng.integers(0, 10, 10000).astype(np.uint8),
        )
        (tmp / "params.yaml").write_text(
            json.dumps(
                {
                    "train": {
                        "dataset": "expanded",
                        "architecture": "conv2_relu",
                        "epochs": epochs,
                        "batch_size": batch_size,
                    },
                    "tracking": {"enabled": False},
                }
            )
        )  # a measurement, not a run for the repository's MLflow store
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "--params",
            str(tmp / "params.yaml"),
            "--prepared",
            str(tmp / "prepared"),
            "--expanded",
            str(tmp / "expanded"),
            "--model",
            str(tmp / "model"),
            "--checkpoints",
            str(tmp / "checkpoints"),
            "--metrics",
            str(tmp / "metrics"),
            "--no-progress",
        ]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads((tmp / "metrics" / TIMINGS_FILE).read_text())
