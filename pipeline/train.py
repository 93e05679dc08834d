"""Train a network from params.yaml (section ``train``) with the book's mini-batch SGD.

Reads ``train.npz`` of the prepared or the expanded set (``train.dataset``) and the prepared
``validation.npz``; trains ``train.epochs`` epochs, measures validation accuracy after each, and
keeps the parameters of the best validation epoch (ties go to the later epoch, as network3.py).

Writes:
  MODEL/model.npz, MODEL/architecture.json   the best epoch's parameters (see pipeline.model_io)
  METRICS/train_epochs.csv                   per epoch: train_cost, validation_accuracy, seconds,
                                             images_per_second, eta (for `dvc plots`)
  METRICS/train.json                         summary (for `dvc metrics show`)
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
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from pipeline import cli, distort, serving, tracking
from pipeline.architecture import build, resolve
from pipeline.backend import DEVICES, ENGINES, Backend, engine_unavailable
from pipeline.config import ConfigError, PipelineError, from_section, load_params, require
from pipeline.files import load_npz, save_npz, sha256_file, write_bytes, write_json
from pipeline.layers import INITS
from pipeline.model_io import save_model
from pipeline.network import COSTS
from pipeline.trainer import Trainer

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_FORMAT = 1
EPOCHS_FILE = "train_epochs.csv"
SUMMARY_FILE = "train.json"
STATISTICS_IMAGES = 10_000  # the training images that set BatchNorm's statistics after every epoch
EPOCH_FIELDS = ("epoch", "train_cost", "validation_accuracy", "seconds", "images_per_second", "eta")
PACKAGE_DIR = Path(__file__).resolve().parent
TRAINING_SOURCES = ("train.py", "trainer.py", "network.py", "layers.py", "convolution.py", "architecture.py",
                    "backend.py", "theano_engine.py", "sgd.py", "distort.py")
# Keys that do not change what any single epoch computes, so a checkpoint survives a change to them
# (steps_per_call only groups the same steps into calls: the weights come out bit for bit the same).
NOT_FINGERPRINTED = ("epochs", "early_stopping_patience", "steps_per_call")


class TrainingDiverged(PipelineError):
    """The training cost became NaN or infinite."""


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
        require(self.init in INITS, "train.init", self.init,
                "choose book (the book's N(0, 1/n_out)) or corrected (N(0, 1/n_in))")
        require(self.seed >= 0, "train.seed", self.seed, "must be a non-negative integer")
        require(self.engine in ENGINES, "train.engine", self.engine, f"choose one of {', '.join(ENGINES)}")
        require(self.device in DEVICES, "train.device", self.device, f"choose one of {', '.join(DEVICES)}")
        require(self.device == "cpu" or self.engine == "jax", "train.device", self.device,
                "a GPU needs train.engine: jax (the c and theano-pymc engines run on the CPU only)")
        # an engine that this environment lacks (theano-pymc lives in its own) fails here, before any data is read
        require(not engine_unavailable(self.engine), "train.engine", self.engine, engine_unavailable(self.engine))
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1); 0 turns momentum off")
        require(0 < self.lr_decay <= 1, "train.lr_decay", self.lr_decay,
                "eta is multiplied by this after every epoch; must be in (0, 1], 1 is off")
        require(self.early_stopping_patience >= 0, "train.early_stopping_patience", self.early_stopping_patience,
                "epochs without a better validation accuracy before stopping; 0 is off")
        require(self.steps_per_call >= 1, "train.steps_per_call", self.steps_per_call, "must be at least 1")
        require(0 <= self.distort_rotation <= 180, "train.distort_rotation", self.distort_rotation,
                "the largest rotation, in degrees: 0 (off) to 180")
        require(0 <= self.distort_scale < 1, "train.distort_scale", self.distort_scale,
                "images are scaled by a factor in [1 - s, 1 + s]: must be in [0, 1), 0 is off")
        require(self.distort_alpha >= 0, "train.distort_alpha", self.distort_alpha,
                "the elastic displacement scale, in pixels: must be >= 0, 0 is off")
        require(self.distort_sigma > 0, "train.distort_sigma", self.distort_sigma,
                "the width of the Gaussian that smooths the elastic field, in pixels: must be > 0")
        try:
            build(layers, rng=np.random.default_rng(0)).check_cost(self.cost)
        except ValueError as e:
            raise ConfigError(f"Got train.cost={self.cost!r}: {e}") from None

    def layers(self) -> list[dict]:
        return resolve(self.architecture, "train.architecture")

    def distortion(self) -> dict | None:
        """The settings of :func:`pipeline.distort.distort` for every epoch's images, or None when off."""
        if not (self.distort_rotation or self.distort_scale or self.distort_alpha):
            return None
        return {"rotation": self.distort_rotation, "scale": self.distort_scale, "alpha": self.distort_alpha,
                "sigma": self.distort_sigma}

    def eta_at(self, epoch: int) -> float:
        """The learning rate of 1-based ``epoch``: eta * lr_decay**(epoch - 1)."""
        return self.eta * self.lr_decay ** (epoch - 1)


# -- data ----------------------------------------------------------------------------------------
def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 784) and labels uint8 (N,) from a data-format .npz."""
    if not path.is_file():
        raise PipelineError(f"{path} not found (run the prepare/expand stages first: dvc repro)")
    arrays = load_npz(path)
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is None or labels is None:
        raise PipelineError(f"{path}: expected arrays 'images' and 'labels', found {sorted(arrays)}")
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise PipelineError(f"{path}: images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or labels.size and labels.max() > 9:
        raise PipelineError(f"{path}: labels must be N digits 0-9, got shape {labels.shape}")
    return images.reshape(len(images), 784), labels.astype(np.uint8, copy=False)


def fingerprint(config: TrainConfig, train_path: Path, validation_path: Path) -> str:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_FINGERPRINTED}
    settings.update(format=CHECKPOINT_FORMAT, train=sha256_file(train_path), validation=sha256_file(validation_path))
    # the code that computes each step: DVC re-runs the stage when it changes, and a resume must not
    # then continue weights that the old code produced
    settings.update({f"source:{name}": digest for name, digest in training_source_hashes().items()})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def training_source_hashes() -> dict[str, str]:
    """The sha256 of each file of the training code (``TRAINING_SOURCES``), in that order."""
    return {name: sha256_file(PACKAGE_DIR / name) for name in TRAINING_SOURCES}


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict, params: list, best: list | None, velocities: list) -> None:
    arrays = {f"param{i}": v for i, v in enumerate(params)}
    arrays.update({f"best{i}": v for i, v in enumerate(best or [])})
    arrays.update({f"velocity{i}": v for i, v in enumerate(velocities)})
    save_npz(path, __state__=np.array(json.dumps(state)), **arrays)


def load_checkpoint(path: Path, expected_fingerprint: str, epochs: int):
    """(state, params, best, velocities) from a matching checkpoint, or None."""
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        state = json.loads(str(arrays.pop("__state__")))
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable checkpoint %s (%s); starting afresh", path, e)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        log.info("ignoring checkpoint %s: it was made with other train params, data or training code; starting afresh", path)
        return None
    if state["epochs_done"] > epochs:
        log.info("ignoring checkpoint %s: it is at epoch %d, beyond train.epochs=%d", path, state["epochs_done"], epochs)
        return None

    def group(prefix):
        return [arrays[f"{prefix}{i}"] for i in range(sum(k.startswith(prefix) for k in arrays))]

    return state, group("param"), group("best") or None, group("velocity")


# -- outputs -------------------------------------------------------------------------------------
def epochs_csv(history: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EPOCH_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in EPOCH_FIELDS})
    return out.getvalue().encode()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _summary(config: TrainConfig, state: dict, n_train: int, n_params: int, backend: Backend) -> dict:
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
        "device": backend.device_name,
        "resumed_from_epoch": state["resumed_from_epoch"],
    }


# -- the stage -----------------------------------------------------------------------------------
def train(*, config: TrainConfig, prepared_dir: Path, expanded_dir: Path | None = None, model_dir: Path,
          checkpoint_dir: Path, metrics_dir: Path, progress: bool = True,
          on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train, write the model, metrics and checkpoints; return the summary (as in train.json) plus
    ``history``, the list of per-epoch metric dicts.

    ``on_epoch(epoch, metrics)`` is called once per epoch in order, 1-based, with the epoch's row of
    train_epochs.csv plus ``best_validation_accuracy``, ``best_epoch`` and ``resumed`` (True for
    epochs restored from a checkpoint rather than trained in this call), so a logger sees the full
    curve of a resumed run.
    """
    prepared_dir, model_dir, checkpoint_dir, metrics_dir = map(Path, (prepared_dir, model_dir, checkpoint_dir, metrics_dir))
    source = prepared_dir if config.dataset == "prepared" else expanded_dir
    if source is None:
        raise PipelineError("train.dataset is expanded but no expanded data directory was given")
    train_path, validation_path = Path(source) / "train.npz", prepared_dir / "validation.npz"
    images, labels = load_split(train_path)
    val_images, val_labels = load_split(validation_path)
    bs = config.batch_size
    n_batches = len(images) // bs  # as the book, a last partial mini-batch is left out
    if n_batches == 0:
        raise PipelineError(f"{train_path} has {len(images)} images, fewer than train.batch_size={bs}")

    backend = Backend(config.engine, config.device)
    network = build(config.layers(), rng=np.random.default_rng([config.seed, 0]), init=config.init)
    trainer = Trainer(network, backend, batch_size=bs, cost=config.cost, lmbda=config.lmbda,
                      num_training_batches=n_batches, momentum=config.momentum)
    log.info("training %s (%d parameters) on %d %s images, %s", config.architecture if isinstance(config.architecture, str)
             else "a custom network", network.count_params(), len(images), config.dataset, backend)

    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
    expected = fingerprint(config, train_path, validation_path)
    restored = load_checkpoint(checkpoint_path, expected, config.epochs)
    best_values = None
    if restored:
        state, params, best_values, velocities = restored
        network.set_values(params)
        trainer.set_velocity_values(velocities)
        state["resumed_from_epoch"] = state["epochs_done"]
        log.info("resuming after epoch %d from %s", state["epochs_done"], checkpoint_path)
    else:
        state = {"fingerprint": expected, "epochs_done": 0, "history": [], "best_accuracy": None, "best_epoch": None,
                 "improved_epoch": None, "stopped": "running", "resumed_from_epoch": 0}
    for row in state["history"]:
        _notify(on_epoch, row, state, resumed=True)

    n_used = n_batches * bs
    diverged = None
    # the next epoch's images are made (shuffled, distorted if asked) in a thread while this epoch trains
    # (NumPy releases the GIL). That hides the distortion beside a GPU; on a 2-core CPU, where training
    # keeps both cores busy, it hid little: 250,000 distorted images added some 12 s to a 33 s epoch
    prefetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next-epoch")
    first_epoch = state["epochs_done"] + 1
    upcoming = prefetch.submit(_epoch_images, config, images, first_epoch) if first_epoch <= config.epochs else None
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            patience = config.early_stopping_patience
            if patience and state["improved_epoch"] and epoch - 1 - state["improved_epoch"] >= patience:
                state["stopped"] = "early_stopping"
                log.info("stopping early: no better validation accuracy in the %d epochs after epoch %d", patience,
                         state["improved_epoch"])
                break
            eta = config.eta_at(epoch)
            start = time.perf_counter()
            epoch_images, order = upcoming.result()
            if epoch < config.epochs:
                upcoming = prefetch.submit(_epoch_images, config, images, epoch + 1)
            cost_sum, diverged = _train_epoch(config, trainer, epoch_images, order, labels, epoch, n_batches, eta, progress)
            seconds = time.perf_counter() - start
            if diverged:
                break
            trainer.set_statistics(images[:STATISTICS_IMAGES])  # BatchNorm's, for inference; undistorted
            accuracy = trainer.accuracy(val_images, val_labels)
            row = {"epoch": epoch, "train_cost": cost_sum / n_batches, "validation_accuracy": accuracy,
                   "seconds": round(seconds, 3), "images_per_second": round(n_used / seconds, 1), "eta": eta}
            state["history"].append(row)
            if state["best_accuracy"] is None or accuracy > state["best_accuracy"]:
                state["improved_epoch"] = epoch  # early stopping waits for a strict improvement
            if state["best_accuracy"] is None or accuracy >= state["best_accuracy"]:
                state["best_accuracy"], state["best_epoch"] = accuracy, epoch  # a tie moves to the later epoch, as the book
                best_values = network.get_values()
            state["epochs_done"] = epoch
            save_checkpoint(checkpoint_path, state, network.get_values(), best_values, trainer.velocity_values())
            log.info("epoch %d/%d: train cost %.4f, validation accuracy %.2f%% (best %.2f%% at epoch %d), %.1f s, "
                     "%.0f images/s", epoch, config.epochs, row["train_cost"], 100 * accuracy,
                     100 * state["best_accuracy"], state["best_epoch"], seconds, n_used / seconds)
            _notify(on_epoch, row, state, resumed=False)
        else:
            state["stopped"] = "completed"
    finally:  # the next epoch's images, if not begun, are not made for a run that stops here
        prefetch.shutdown(wait=True, cancel_futures=True)
    if diverged:
        state["stopped"] = "diverged"

    summary = _summary(config, state, n_used, network.count_params(), backend)
    write_bytes(metrics_dir / EPOCHS_FILE, epochs_csv(state["history"]))
    write_json(metrics_dir / SUMMARY_FILE, summary)
    if best_values is not None:
        save_model(model_dir, network, best_values, cost=config.cost,
                   metadata={"best_epoch": state["best_epoch"],
                             "best_validation_accuracy": state["best_accuracy"],
                             "train": dataclasses.asdict(config)})
    if diverged:
        kept = (f"the model of epoch {state['best_epoch']} (validation accuracy {100 * state['best_accuracy']:.2f}%) "
                f"was written to {model_dir}" if best_values is not None else "no epoch finished, so no model was written")
        raise TrainingDiverged(f"epoch {diverged}: the training cost became NaN or infinite; {kept}. "
                               f"Try a smaller train.eta (now {config.eta}).")
    return {**summary, "history": state["history"]}


def _notify(on_epoch, row: dict, state: dict, *, resumed: bool) -> None:
    if on_epoch is None:
        return
    so_far = state["history"][: state["history"].index(row) + 1]
    best_row = max(reversed(so_far), key=lambda r: r["validation_accuracy"])  # ties: the later epoch
    on_epoch(row["epoch"], {**row, "best_validation_accuracy": best_row["validation_accuracy"],
                            "best_epoch": best_row["epoch"], "resumed": resumed})


def _epoch_images(config: TrainConfig, images: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, order): the epoch visits ``images[order]``. With ``train.distort_*`` the images are the
    epoch's own copy of the training set, each image distorted afresh (drawn in visiting order)."""
    order = (np.random.default_rng([config.seed, 1, epoch]).permutation(len(images)) if config.shuffle
             else np.arange(len(images)))
    distortion = config.distortion()
    if distortion is None:
        return images, order
    # on the CPU, training keeps every core busy: one thread; beside a GPU, every core, or distorting
    # 250,000 images (some 11 s in one thread) would take longer than the epoch's training (5 s on an H200)
    workers = 1 if config.device == "cpu" else os.cpu_count() or 1
    distorted = np.empty_like(images)
    distorted[order] = distort.distort_blocks(images[order], [config.seed, 3, epoch], workers=workers, **distortion)
    return distorted, order


def _train_epoch(config: TrainConfig, trainer: Trainer, images, order, labels, epoch: int, n_batches: int,
                 eta: float, progress: bool) -> tuple[float, int | None]:
    """One epoch in calls of ``steps_per_call`` mini-batches; returns (sum of step costs, epoch if diverged).
    The epoch visits ``images[order]`` (see :func:`_epoch_images`) with the labels ``labels[order]``."""
    bs = config.batch_size
    # one generator per dropout layer, drawn in step order, so the masks do not depend on steps_per_call
    dropout = [(np.random.default_rng([config.seed, 2, epoch, i]), trainer.network.layers[i].p_dropout,
                trainer.network.layers[i].n_in) for i in trainer.network.dropout_layers]
    cost_sum = 0.0
    bar = tqdm(total=n_batches * bs, unit="img", unit_scale=True, desc=f"epoch {epoch}/{config.epochs}",
               disable=not progress, file=sys.stderr, leave=False)
    with bar:
        for first in range(0, n_batches, config.steps_per_call):
            steps = min(config.steps_per_call, n_batches - first)
            index = order[first * bs : (first + steps) * bs]
            x = images[index].reshape(steps, bs, -1)  # (K, bs, 784) uint8
            y = labels[index].reshape(steps, bs)
            # keep each input with probability 1 - p, as the book's binomial(n=1, p=1-p_dropout)
            keeps = [(rng.random((steps, bs, n_in), dtype=np.float32) >= p).astype(np.uint8)
                     for rng, p, n_in in dropout]
            costs = trainer.train_steps(x, y, keeps, eta)
            if not np.all(np.isfinite(costs)):
                return cost_sum, epoch
            cost_sum += float(np.sum(costs, dtype=np.float64))
            bar.update(steps * bs)
            bar.set_postfix(cost=f"{cost_sum / (first + steps):.4f}")
    return cost_sum, None


def train_tracked(*, params: dict, source: str = "params.yaml", prepared_dir: Path, expanded_dir: Path | None,
                  model_dir: Path, checkpoint_dir: Path, metrics_dir: Path, progress: bool = True) -> dict:
    """:func:`train` inside an MLflow run (the ``tracking`` section of ``params``): every params.yaml
    value, the resolved architecture, tags, the datasets, per-epoch metrics, the model (files and
    pyfunc) and the metrics files. A run killed mid-way is continued by the resumed training."""
    config = from_section(TrainConfig, params, "train", source=source)
    tracking_config = from_section(tracking.TrackingConfig, params, "tracking", source=source)
    prepared_dir, checkpoint_dir, model_dir = Path(prepared_dir), Path(checkpoint_dir), Path(model_dir)
    data_dir = prepared_dir if config.dataset == "prepared" else Path(expanded_dir or "")
    train_path, validation_path = data_dir / "train.npz", prepared_dir / "validation.npz"
    for path in (train_path, validation_path):
        if not path.is_file():
            raise PipelineError(f"{path} not found (run the data stages first: dvc repro)")
    # continue the interrupted run only when nothing in params.yaml changed (MLflow params are immutable);
    # the evaluate section is not training's: evaluate records it on the run as tags
    flat = tracking.flatten({section: values for section, values in params.items() if section != "evaluate"})
    run_key = hashlib.sha256((fingerprint(config, train_path, validation_path) + json.dumps(flat, sort_keys=True)).encode()).hexdigest()
    resume_id = tracking.resumable_run(checkpoint_dir, run_key)
    preset = config.architecture if isinstance(config.architecture, str) else "custom"
    tags = {"engine": config.engine, "device": config.device, "preset": preset, "dataset": config.dataset,
            "stage": "train"}
    run_name = os.environ.get("DVC_EXP_NAME") or f"{preset}-{config.epochs}ep"

    with tracking.tracked_run(tracking_config, run_name=run_name, resume_run_id=resume_id, tags=tags) as run:
        if run is None:
            return train(config=config, prepared_dir=prepared_dir, expanded_dir=expanded_dir, model_dir=model_dir,
                         checkpoint_dir=checkpoint_dir, metrics_dir=metrics_dir, progress=progress)
        tracking.remember_run(checkpoint_dir, run, run_key)
        continuing = run.run_id == resume_id
        if not continuing:  # MLflow refuses to log a param twice
            run.log_params(flat)
            run.log_params({"architecture.resolved": json.dumps(config.layers())})
            run.log_dataset(train_path, f"mnist-{config.dataset}-train", "training")
            run.log_dataset(validation_path, "mnist-validation", "validation")

        try:
            summary = train(config=config, prepared_dir=prepared_dir, expanded_dir=expanded_dir, model_dir=model_dir,
                            checkpoint_dir=checkpoint_dir, metrics_dir=metrics_dir, progress=progress,
                            on_epoch=tracking.epoch_logger(run, continuing))
        finally:  # a diverged run still wrote its best model and metrics: keep them with the run
            for path in (Path(metrics_dir) / SUMMARY_FILE, Path(metrics_dir) / EPOCHS_FILE):
                if path.is_file():
                    run.log_artifact(path, "metrics")
        tracking.save_run_reference(model_dir, run)
        run.log_metrics({"final_best_validation_accuracy": summary["best_validation_accuracy"],
                         "final_best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
                         "peak_rss_mb": summary["peak_rss_mb"]})
        run.log_artifacts(model_dir, "model_files")
        serving.log_pyfunc(run, model_dir)
    return summary


def main(argv=None) -> int:
    parser = cli.stage_parser("train", __doc__)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="prepared data directory")
    parser.add_argument("--expanded", type=Path, default=Path("data/expanded"), help="expanded data directory")
    parser.add_argument("--model", type=Path, default=Path("data/model"), help="output directory for the model")
    parser.add_argument("--checkpoints", type=Path, default=Path("data/checkpoints/train"), help="checkpoint directory")
    parser.add_argument("--metrics", type=Path, default=Path("data/metrics"), help="directory for train.json and train_epochs.csv")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args):
        summary = train_tracked(params=load_params(args.params), source=str(args.params), prepared_dir=args.prepared,
                                expanded_dir=args.expanded, model_dir=args.model, checkpoint_dir=args.checkpoints,
                                metrics_dir=args.metrics, progress=not args.no_progress)
        print(f"best validation accuracy {100 * summary['best_validation_accuracy']:.2f}% at epoch "
              f"{summary['best_epoch']} of {summary['epochs_run']} ({summary['stopped']}); "
              f"{summary['images_per_second']} images/s")

    return cli.run(run, parser, argv)
