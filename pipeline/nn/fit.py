"""Train a network from params.yaml (section ``train``) with the book's mini-batch SGD.

Reads ``train.npz`` of the prepared or the expanded set (``train.dataset``) and the prepared
``validation.npz``; trains ``train.epochs`` epochs, measures validation accuracy after each, and
keeps the parameters of the best validation epoch (ties go to the later epoch, as network3.py).

Writes:
  MODEL/model.npz, MODEL/architecture.json   the best epoch's parameters (see pipeline.nn.model_io)
  METRICS/train_epochs.csv, train.json,      the curve, the metrics and the rest of the summary
  METRICS/train_info.json                    (see pipeline.nn.outputs)
  CHECKPOINTS/checkpoint.npz                 state after every epoch, written atomically

A run that is killed (even with SIGKILL) resumes from its last checkpoint and ends with the same
numbers as an uninterrupted one: every random draw (initial weights, each epoch's shuffle and
dropout masks) comes from ``train.seed`` and the epoch number. A checkpoint is used only when its
fingerprint (every train param except ``epochs``, ``early_stopping_patience`` and ``steps_per_call``, plus the sha256
of both data files and of the training code) matches; raising ``epochs`` therefore continues a finished run.

A NaN or infinite training cost stops the run: the best model so far is written and the stage
fails with a message naming the epoch (try a smaller train.eta).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.core.config import PipelineError
from pipeline.data import distort
from pipeline.data.splits import load_split
from pipeline.nn.architecture import build
from pipeline.nn.backend import Backend
from pipeline.nn.checkpoint import CHECKPOINT_FILE, fingerprint, load_checkpoint, save_checkpoint
from pipeline.nn.compiled import Trainer
from pipeline.nn.config import TrainConfig, TrainPaths
from pipeline.nn.layers import keep_mask
from pipeline.nn.model_io import save_model
from pipeline.nn.outputs import summary_of, write_metrics

log = logging.getLogger(__name__)

STATISTICS_IMAGES = 10_000  # the training images that set BatchNorm's statistics after every epoch


class TrainingDiverged(PipelineError):
    """The training cost became NaN or infinite."""


# -- the training --------------------------------------------------------------------------------
@dataclass
class _Session:
    """A training under way: its data, its compiled network and what a checkpoint keeps."""

    config: TrainConfig
    paths: TrainPaths
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train images, labels; validation's
    n_batches: int
    backend: Backend
    trainer: Trainer
    state: dict
    best_values: list | None

    @property
    def n_used(self) -> int:
        return self.n_batches * self.config.batch_size  # as the book, a last partial mini-batch is left out


def train(
    config: TrainConfig,
    paths: TrainPaths,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train, write the model, metrics and checkpoints; return the summary (as in train.json) plus
    ``history``, the list of per-epoch metric dicts.

    ``on_epoch(epoch, metrics)`` is called once per epoch in order, 1-based, with the epoch's row of
    train_epochs.csv plus ``best_validation_accuracy``, ``best_epoch`` and ``resumed`` (True for
    epochs restored from a checkpoint rather than trained in this call), so a logger sees the full
    curve of a resumed run.
    """
    session = _start(config, paths)
    for row in session.state["history"]:
        _notify(on_epoch, row, session.state, resumed=True)
    diverged = _train_epochs(session, progress, on_epoch)
    return _finish(session, diverged)


def _start(config: TrainConfig, paths: TrainPaths) -> _Session:
    """Read the data, build and compile the network, and restore a matching checkpoint if there is one."""
    images, labels = load_split(paths.train)
    val_images, val_labels = load_split(paths.validation)
    n_batches = len(images) // config.batch_size
    if n_batches == 0:
        raise PipelineError(f"{paths.train} has {len(images)} images, fewer than train.batch_size={config.batch_size}")
    backend = Backend(config.engine, config.device)
    network = build(config.layers(), rng=np.random.default_rng([config.seed, 0]), init=config.init)
    trainer = Trainer(
        network,
        backend,
        batch_size=config.batch_size,
        cost=config.cost,
        lmbda=config.lmbda,
        num_training_batches=n_batches,
        momentum=config.momentum,
    )
    name = config.architecture if isinstance(config.architecture, str) else "a custom network"
    shared = f", each mini-batch shared by {trainer.shards} CPU devices" if trainer.shards > 1 else ""
    log.info(
        "training %s (%d parameters) on %d %s images, %s%s",
        name,
        network.count_params(),
        len(images),
        config.dataset,
        backend,
        shared,
    )

    expected = fingerprint(config, paths.train, paths.validation)
    restored = load_checkpoint(paths.checkpoints / CHECKPOINT_FILE, expected, config.epochs)
    best_values = None
    if restored:
        state, params, best_values, velocities = restored
        network.set_values(params)
        trainer.set_velocity_values(velocities)
        state["resumed_from_epoch"] = state["epochs_done"]
        log.info("resuming after epoch %d from %s", state["epochs_done"], paths.checkpoints / CHECKPOINT_FILE)
    else:
        state = {
            "fingerprint": expected,
            "epochs_done": 0,
            "history": [],
            "best_accuracy": None,
            "best_epoch": None,
            "improved_epoch": None,
            "stopped": "running",
            "resumed_from_epoch": 0,
        }
    return _Session(
        config, paths, (images, labels, val_images, val_labels), n_batches, backend, trainer, state, best_values
    )


def _train_epochs(session: _Session, progress: bool, on_epoch) -> int | None:
    """Train the epochs still to do; returns the epoch whose cost diverged, or None."""
    config, state, images = session.config, session.state, session.data[0]
    # the next epoch's images are made (shuffled, distorted if asked) in a thread while this epoch trains
    # (NumPy releases the GIL): that hides the distortion beside a GPU, less so on a busy 2-core CPU
    prefetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next-epoch")
    first_epoch = state["epochs_done"] + 1
    upcoming = prefetch.submit(_epoch_images, config, images, first_epoch) if first_epoch <= config.epochs else None
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            if _patience_ran_out(config, state, epoch):
                return None
            start = time.perf_counter()
            epoch_images, order = upcoming.result()
            if epoch < config.epochs:
                upcoming = prefetch.submit(_epoch_images, config, images, epoch + 1)
            eta = config.eta_at(epoch)
            cost_sum, diverged = _train_epoch(
                config, session.trainer, epoch_images, order, session.data[1], epoch, session.n_batches, eta, progress
            )
            if diverged:
                return diverged
            row = _end_epoch(session, epoch, cost_sum, eta, time.perf_counter() - start)
            _notify(on_epoch, row, state, resumed=False)
        state["stopped"] = "completed"
        return None
    finally:  # the next epoch's images, if not begun, are not made for a run that stops here
        prefetch.shutdown(wait=True, cancel_futures=True)


def _patience_ran_out(config: TrainConfig, state: dict, epoch: int) -> bool:
    patience = config.early_stopping_patience
    if patience and state["improved_epoch"] and epoch - 1 - state["improved_epoch"] >= patience:
        state["stopped"] = "early_stopping"
        log.info(
            "stopping early: no better validation accuracy in the %d epochs after epoch %d",
            patience,
            state["improved_epoch"],
        )
        return True
    return False


def _end_epoch(session: _Session, epoch: int, cost_sum: float, eta: float, seconds: float) -> dict:
    """Validate, keep the best epoch's weights, write the checkpoint; returns the epoch's row."""
    state, trainer, network = session.state, session.trainer, session.trainer.network
    images, _, val_images, val_labels = session.data
    trainer.set_statistics(images[:STATISTICS_IMAGES])  # BatchNorm's, for inference; undistorted
    accuracy = trainer.accuracy(val_images, val_labels)
    row = {
        "epoch": epoch,
        "train_cost": cost_sum / session.n_batches,
        "validation_accuracy": accuracy,
        "seconds": round(seconds, 3),
        "images_per_second": round(session.n_used / seconds, 1),
        "eta": eta,
    }
    state["history"].append(row)
    if state["best_accuracy"] is None or accuracy > state["best_accuracy"]:
        state["improved_epoch"] = epoch  # early stopping waits for a strict improvement
    if state["best_accuracy"] is None or accuracy >= state["best_accuracy"]:
        state["best_accuracy"], state["best_epoch"] = accuracy, epoch  # a tie moves to the later epoch, as the book
        session.best_values = network.get_values()
    state["epochs_done"] = epoch
    save_checkpoint(
        session.paths.checkpoints / CHECKPOINT_FILE,
        state,
        network.get_values(),
        session.best_values,
        trainer.velocity_values(),
    )
    log.info(
        "epoch %d/%d: train cost %.4f, validation accuracy %.2f%% (best %.2f%% at epoch %d), %.1f s, %.0f images/s",
        epoch,
        session.config.epochs,
        row["train_cost"],
        100 * accuracy,
        100 * state["best_accuracy"],
        state["best_epoch"],
        seconds,
        session.n_used / seconds,
    )
    return row


def _finish(session: _Session, diverged: int | None) -> dict:
    """Write the metrics and the best epoch's model; a diverged run fails after writing them."""
    config, state, paths, network = session.config, session.state, session.paths, session.trainer.network
    if diverged:
        state["stopped"] = "diverged"
    summary = summary_of(config, state, session.n_used, network.count_params(), session.backend.device_name)
    write_metrics(paths.metrics, summary, state["history"])
    if session.best_values is not None:
        save_model(
            paths.model,
            network,
            session.best_values,
            cost=config.cost,
            metadata={
                "best_epoch": state["best_epoch"],
                "best_validation_accuracy": state["best_accuracy"],
                "train": dataclasses.asdict(config),
            },
        )
    if diverged:
        kept = (
            f"the model of epoch {state['best_epoch']} (validation accuracy {100 * state['best_accuracy']:.2f}%) "
            f"was written to {paths.model}"
            if session.best_values is not None
            else "no epoch finished, so no model was written"
        )
        raise TrainingDiverged(
            f"epoch {diverged}: the training cost became NaN or infinite; {kept}. "
            f"Try a smaller train.eta (now {config.eta})."
        )
    return {**summary, "history": state["history"]}


def _notify(on_epoch, row: dict, state: dict, *, resumed: bool) -> None:
    if on_epoch is None:
        return
    so_far = state["history"][: state["history"].index(row) + 1]
    best_row = max(reversed(so_far), key=lambda r: r["validation_accuracy"])  # ties: the later epoch
    on_epoch(
        row["epoch"],
        {
            **row,
            "best_validation_accuracy": best_row["validation_accuracy"],
            "best_epoch": best_row["epoch"],
            "resumed": resumed,
        },
    )


def _epoch_images(config: TrainConfig, images: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, order): the epoch visits ``images[order]``. With ``train.distort_*`` the images are the
    epoch's own copy of the training set, each image distorted afresh (drawn in visiting order)."""
    order = (
        np.random.default_rng([config.seed, 1, epoch]).permutation(len(images))
        if config.shuffle
        else np.arange(len(images))
    )
    distortion = config.distortion()
    if distortion is None:
        return images, order
    # on the CPU, training keeps every core busy: one thread; beside a GPU, every core, or distorting
    # 250,000 images (some 11 s in one thread) would take longer than the epoch's training (5 s on an H200)
    workers = 1 if config.device == "cpu" else os.cpu_count() or 1
    distorted = np.empty_like(images)
    distorted[order] = distort.distort_blocks(images[order], [config.seed, 3, epoch], workers=workers, **distortion)
    return distorted, order


def call_length(n_batches: int, steps_per_call: int) -> int:
    """The mini-batches per compiled call in an epoch of ``n_batches``: at most ``steps_per_call``, and
    where one of them divides the epoch, the largest from ``steps_per_call // 8`` up, so that every call
    runs one program (on JAX each length is a program of its own, compiled in some seconds; 8 times as
    many calls cost far less); else ``steps_per_call``, the last call shorter."""
    if n_batches <= steps_per_call:
        return n_batches
    divisors = (steps for steps in range(steps_per_call, max(steps_per_call // 8, 1) - 1, -1) if n_batches % steps == 0)
    return next(divisors, steps_per_call)


def _train_epoch(
    config: TrainConfig, trainer: Trainer, images, order, labels, epoch: int, n_batches: int, eta: float, progress: bool
) -> tuple[float, int | None]:
    """One epoch in calls of ``steps_per_call`` mini-batches; returns (sum of step costs, epoch if diverged).
    The epoch visits ``images[order]`` (see :func:`_epoch_images`) with the labels ``labels[order]``."""
    bs = config.batch_size
    # one generator per dropout layer, drawn in step order, so the masks do not depend on steps_per_call
    dropout = [
        (
            np.random.default_rng([config.seed, 2, epoch, i]),
            trainer.network.layers[i].p_dropout,
            trainer.network.layers[i].n_in,
        )
        for i in trainer.network.dropout_layers
    ]
    per_call = call_length(n_batches, config.steps_per_call)
    cost_sum = 0.0
    bar = tqdm(
        total=n_batches * bs,
        unit="img",
        unit_scale=True,
        desc=f"epoch {epoch}/{config.epochs}",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    with bar:
        for first in range(0, n_batches, per_call):
            steps = min(per_call, n_batches - first)
            index = order[first * bs : (first + steps) * bs]
            x = images[index].reshape(steps, bs, -1)  # (K, bs, 784) uint8
            y = labels[index].reshape(steps, bs)
            keeps = [keep_mask(rng, (steps, bs, n_in), p) for rng, p, n_in in dropout]
            costs = trainer.train_steps(x, y, keeps, eta)
            if not np.all(np.isfinite(costs)):
                return cost_sum, epoch
            cost_sum += float(np.sum(costs, dtype=np.float64))
            bar.update(steps * bs)
            bar.set_postfix(cost=f"{cost_sum / (first + steps):.4f}")
    return cost_sum, None
