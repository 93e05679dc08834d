"""Peak memory of the train stage: one epoch on a synthetic set, in a child process.

The child is the real ``python -m pipeline train`` on a temporary directory (tracking off: a
measurement, not a run for the repository's MLflow store); its timings file reports the peak RSS.
``python -m pipeline.benchmarks.train --memory`` prints it against the goal.
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

__all__ = ["peak_memory_mb"]


def peak_memory_mb(images: int, batch_size: int) -> dict:
    """Run the train stage for one epoch on ``images`` synthetic images in a child process."""
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
                        "epochs": 1,
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
