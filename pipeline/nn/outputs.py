"""What a training writes beside its model: the per-epoch curve and its summary, split in two files.

  METRICS/train_epochs.csv   per epoch: train_cost, validation_accuracy, eta (for `dvc plots`)
  METRICS/train.json         the metrics (``METRICS``), numbers only, for `dvc metrics show` / `dvc exp show`
  METRICS/train_info.json    the rest of what the data and params determine: how it stopped, engine,
                             device, epochs, sizes
  METRICS/train_timings.json what differs from one run to the next (``TIMINGS``): seconds and images/s,
                             in all and per epoch, peak memory, the epoch a run resumed after

The first three are DVC outputs committed with `dvc.lock`; the timings file is neither (git ignores it,
MLflow has the same numbers), so a second `dvc repro` of the same data and params leaves `git status`
clean.

train.json holds what experiments are compared by, and only that: `dvc exp show` makes a column of every
key, and the first screen of a 120-column terminal must hold the experiment's name, its date, its
queue state and executor, this accuracy and evaluate.json's, and in `dvc exp show --only-changed` the
param a sweep varies (tests/test_dvc_experiments.py).
Numbers that differ on every run (seconds, images/s, peak memory) would also keep their columns in
`dvc exp show --only-changed`, and change `dvc.lock` on every run.

This module is not one of the training sources (``TRAINING_SOURCES`` in pipeline/nn/checkpoint.py):
which file a number goes to changes no weights, so it may change without making checkpoints or the
table's finished trainings count as another code's.
"""

from __future__ import annotations

import csv
import io
import resource
from pathlib import Path

from pipeline.core.files import write_bytes, write_json
from pipeline.nn.config import TrainConfig

__all__ = [
    "EPOCHS_FILE",
    "EPOCH_FIELDS",
    "INFO_FILE",
    "METRICS",
    "SUMMARY_FILE",
    "TIMINGS",
    "TIMINGS_FILE",
    "epochs_csv",
    "peak_rss_mb",
    "summary_of",
    "write_metrics",
]

EPOCHS_FILE = "train_epochs.csv"
SUMMARY_FILE = "train.json"
INFO_FILE = "train_info.json"
TIMINGS_FILE = "train_timings.json"
METRICS = ("best_validation_accuracy",)
TIMINGS = ("seconds", "images_per_second", "peak_rss_mb", "resumed_from_epoch")
EPOCH_FIELDS = ("epoch", "train_cost", "validation_accuracy", "eta")
EPOCH_TIMINGS = ("seconds", "images_per_second")


def epochs_csv(history: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EPOCH_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in EPOCH_FIELDS})
    return out.getvalue().encode()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. Linux's ``VmHWM`` where there is one: ``ru_maxrss``
    carries over the peak of the parent it was forked from (across ``exec`` too), so a training started
    by a large process (the benchmark, after its own runs) would report that process's memory."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux and BSDs report KiB


def summary_of(config: TrainConfig, state: dict, n_train: int, n_params: int, device: str) -> dict:
    """A training's summary (train.json and train_info.json together) from its checkpoint state."""
    history = state["history"]
    seconds = sum(row["seconds"] for row in history)
    trained = n_train * len(history)
    return {
        "best_validation_accuracy": state["best_accuracy"],
        "best_epoch": state["best_epoch"],
        "epochs_run": len(history),
        "epochs_requested": config.epochs,
        "stopped": state["stopped"],
        "final_train_cost": history[-1]["train_cost"] if history else None,
        "train_images": n_train,
        "parameters": n_params,
        "seconds": round(seconds, 3),
        "images_per_second": round(trained / seconds, 1) if seconds else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "engine": config.engine,
        "device": device,
        "resumed_from_epoch": state["resumed_from_epoch"],
    }


def write_metrics(metrics_dir: Path, summary: dict, history: list[dict]) -> None:
    """The four files, from a training's summary and its per-epoch rows."""
    write_bytes(metrics_dir / EPOCHS_FILE, epochs_csv(history))
    write_json(metrics_dir / SUMMARY_FILE, {k: summary[k] for k in METRICS})
    write_json(metrics_dir / INFO_FILE, {k: v for k, v in summary.items() if k not in METRICS + TIMINGS})
    timings = {k: summary[k] for k in TIMINGS}
    timings["epochs"] = [{"epoch": row["epoch"], **{k: row[k] for k in EPOCH_TIMINGS}} for row in history]
    write_json(metrics_dir / TIMINGS_FILE, timings)
