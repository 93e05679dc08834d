"""Rerun the book's chapter 6 results table, and its five-network ensemble, with one command.

    python -m pipeline table                       # rows 1-9, 3 seeds each (the book's protocol)
    python -m pipeline table --quick               # smoke test: 1 epoch on 2,000 images; NOT a reproduction
    python -m pipeline table --rows 1,2 --repeats 1
    python -m pipeline table --rows all            # also the rows beyond the book: best, distort, deep, bn, ...
    python -m pipeline table --rows all --report-only   # the report from what is on disk; trains nothing

Every (row, seed) is trained by the train stage's worker into OUT/<row>/seed<k>/ (model,
checkpoints, metrics, test probabilities, result.json). Run the command again after an
interruption: a (row, seed) whose result.json matches its settings and data is not trained again,
and an interrupted one resumes from its last epoch's checkpoint.

A row's figure is, as in the book, the test accuracy (of the epoch with the best validation
accuracy) of the seed with the best validation accuracy (ties: the lowest seed); the report also
gives the mean and standard deviation (ddof=1, in percentage points) over the seeds (all seeds
finished on disk, also those of an earlier call with more --repeats). Row 8 is
trained with at least 5 seeds; row 9 is the plurality vote of its seeds 1-5 (ties: see
pipeline.evaluation.ensemble), and row 9avg, beyond the book, averages their probabilities. The rows
bn-shifts and bn-elastic-shifts train nothing: they score their row's networks with test-time
shifts (pipeline.evaluation.evaluate.shifted_probabilities), on the validation set to pick a seed as above and
on the test set, once per network (kept in OUT/<row>/seed<k>/test-time-shifts-1.json).

--jobs N trains N networks at once, each in its own process (results are the same as one at a
time). On a 2-core CPU keep 1: one training already uses both cores (two at once: 1.03x). On a
GPU one training at batch size 10 leaves room (an H200 trained 3.3x more images per second at
batch size 64), so several at once may finish the table sooner there; that speed-up has not been
measured yet (python -m pipeline.benchmarks.jobs --device gpu).

Writes OUT/report.md (Markdown table: the book's accuracy beside ours), OUT/report.png (both
against the row), OUT/curves.png (each row's validation error per epoch) and OUT/results.json.
Engine, device and steps_per_call come from the train section of --params; everything else from
the row. Each training is an MLflow child run (tags row, seed) of one parent
run per table (tag table=chapter6), which also gets the report.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.core.config import ConfigError, PipelineError
from pipeline.core.files import load_npz, save_npz, sha256_file, write_json
from pipeline.data.expand import ExpandConfig
from pipeline.data.splits import load_split
from pipeline.nn.model_io import load_model
from pipeline.nn.config import TrainConfig, TrainPaths
from pipeline.table.cache import PROBABILITIES_FILE, RESULT_FILE, code_version, last_seed_on_disk, load_result, result_key
from pipeline.table.data import Data, quick_data, row_data, source_of
from pipeline.table.lines import ensemble_line, shifted_line, training_line
from pipeline.table.report import pct, write_report
from pipeline.table.rows import BY_KEY, QUICK, ROWS, Row, n_seeds, select_rows, train_config
from pipeline.tracking import store as tracking
from pipeline.tracking.training import TrackedTraining, train_tracked

log = logging.getLogger(__name__)


def run_table(*, rows: Sequence[str] | str | None = None, repeats: int = 3, quick: bool = False, prepared_dir: Path,
              expanded_dir: Path, out_dir: Path, engine: str = "jax", device: str = "cpu", steps_per_call: int = 500,
              tracking_config: tracking.TrackingConfig | None = None, progress: bool = True, jobs: int = 1,
              report_only: bool = False) -> dict:
    """Train what is missing of ``rows``, write the report; returns results.json's content plus
    ``trained``, the (row, seed) pairs trained (or resumed) by this call, and ``missing``, those
    still to train (none, unless ``report_only``: then the report shows what is on disk and nothing
    trains)."""
    if repeats < 1:
        raise ConfigError(f"Got --repeats {repeats}: must be at least 1")
    if jobs < 1:
        raise ConfigError(f"Got --jobs {jobs}: must be at least 1 (trainings at once)")
    keys = select_rows(rows)
    prepared_dir, expanded_dir, out_dir = Path(prepared_dir), Path(expanded_dir), Path(out_dir)
    tracking_config = tracking_config or tracking.TrackingConfig(enabled=False)
    data = (quick_data(prepared_dir, expanded_dir, out_dir) if quick
            else Data(prepared_dir, expanded_dir, prepared_dir / "test.npz"))
    for path in (data.prepared / "validation.npz", data.test):
        if not path.is_file():
            raise PipelineError(f"{path} not found (run the data stages first: dvc repro)")
    for key in keys:
        row = BY_KEY[key]
        if row.trains and not source_of(row, data).is_file():
            raise PipelineError(f"row {key} needs {source_of(row, data)}, which is missing "
                                "(run the data stages first: dvc repro)")

    with jax_compilation_cache(out_dir / ".jax-cache") if engine == "jax" else contextlib.nullcontext():
        return _run(keys=keys, repeats=repeats, quick=quick, data=data, out_dir=out_dir, engine=engine, device=device,
                    steps_per_call=steps_per_call, tracking_config=tracking_config, progress=progress, jobs=jobs,
                    report_only=report_only)


def _run(*, keys: list[str], repeats: int, quick: bool, data: Data, out_dir: Path, engine: str, device: str,
         steps_per_call: int, tracking_config: tracking.TrackingConfig, progress: bool, jobs: int,
         report_only: bool) -> dict:
    # the code as this process loaded it (hashed once, at the start): its files may be edited while a
    # table trains for hours
    code = code_version()
    test_sha = sha256_file(data.test)
    test_images, test_labels = load_split(data.test)
    test = {"images": test_images, "labels": test_labels}
    parent_key = f"chapter6-table quick={quick}"
    parent_resume = tracking.resumable_run(out_dir, parent_key)
    trained, lines = [], []
    with tracking.tracked_run(tracking_config, run_name="chapter6-table" + (" (quick)" if quick else ""),
                              resume_run_id=parent_resume, tags={"table": "chapter6", "quick": quick}) as parent:
        if parent is not None:
            tracking.remember_run(out_dir, parent, parent_key)
            if parent.run_id != parent_resume:
                parent.log_params({"quick": quick})
            parent.set_tags({"rows": ",".join(keys), "repeats": repeats})
        # what is on disk already, and what to train
        found: dict[str, dict[int, dict]] = {row.key: {} for row in ROWS}
        todo, missing = [], []
        for row in ROWS:
            if not row.trains:
                continue
            count = n_seeds(row, repeats, keys)
            seeds = range(1, max(count, last_seed_on_disk(out_dir / row.key)) + 1)
            on_disk = any((out_dir / row.key / f"seed{seed}" / RESULT_FILE).is_file() for seed in seeds)
            # (a row's own data, such as best's elastic set, is made only to train it or to match its results)
            rdata = row_data(row, data, out_dir, progress) if on_disk or (row.key in keys and not report_only) else data
            for seed in seeds:
                seed_dir = out_dir / row.key / f"seed{seed}"
                asked = row.key in keys and seed <= count
                finished = (seed_dir / RESULT_FILE).is_file()
                if not finished and not asked:
                    continue  # never run and not asked for: no need to hash its data
                if not finished and report_only:
                    missing.append((row.key, seed))
                    continue
                config = train_config(row, seed, quick=quick, engine=engine, device=device,
                                      steps_per_call=steps_per_call)
                key = result_key(config, rdata, test_sha)
                result = load_result(seed_dir, key, code)
                if result is not None:
                    found[row.key][seed] = result
                elif asked and report_only:  # its result is from other settings, data or code
                    missing.append((row.key, seed))
                elif asked:
                    todo.append(Job(row.key, seed, count, config, key, seed_dir, rdata))
        common = dict(quick=quick, tracking_config=tracking_config, code=code,
                      parent_id=parent.run_id if parent else None)
        for job, result in train_jobs(todo, jobs=jobs, test=test, progress=progress,
                                      cache_dir=out_dir / ".jax-cache", **common):
            found[job.row][job.seed] = result
            trained.append((job.row, job.seed))

        for row in ROWS:  # a row made of another row's networks comes after that row
            if row.shifted_of:
                results = [found[row.shifted_of][seed] for seed in sorted(found[row.shifted_of])]
                n_wanted = n_seeds(BY_KEY[row.shifted_of], repeats, keys)
                lines.append(shifted_line(row, results, n_wanted, out_dir=out_dir, data=data, test=test,
                                           engine=engine, device=device, progress=progress))
            elif row.is_ensemble:
                members = [found[row.ensemble_of][seed] for seed in sorted(found[row.ensemble_of])
                           if seed <= row.size]
                probabilities = [load_npz(out_dir / row.ensemble_of / f"seed{m['seed']}" / PROBABILITIES_FILE)
                                 ["probabilities"] for m in members]
                lines.append(ensemble_line(row, members, probabilities, test_labels))
            else:
                results = [found[row.key][seed] for seed in sorted(found[row.key])]
                lines.append(training_line(row, results, n_seeds(row, repeats, keys)))
        results_json = {"quick": quick, "quick_settings": QUICK if quick else None, "repeats": repeats,
                        "rows_selected": keys, "code": code, "lines": lines}
        write_json(out_dir / "results.json", results_json)
        report_files = write_report(results_json, out_dir, test)
        if parent is not None:
            for path in (*report_files, out_dir / "results.json"):
                parent.log_artifact(path)
            parent.log_metrics({f"row_{line['row']}_test_accuracy": line["ours"] for line in lines
                                if line["ours"] is not None})
    return {**results_json, "trained": trained, "missing": missing, "parent_run_id": parent.run_id if parent else None}


@dataclass(frozen=True)
class Job:
    """One (row, seed) to train."""

    row: str
    seed: int
    of: int  # the row's seed count, for the log
    config: TrainConfig
    key: str
    seed_dir: Path
    data: Data  # the row's data (see row_data)


def train_jobs(todo: list[Job], *, jobs: int, test: dict, progress: bool, cache_dir: Path, **common) -> Iterator:
    """Train every job, ``jobs`` at a time; yields (job, result) as each finishes."""
    if jobs == 1 or len(todo) <= 1:
        for job in todo:
            log.info("row %s (%s), seed %d of %d", job.row, BY_KEY[job.row].description, job.seed, job.of)
            yield job, train_one(BY_KEY[job.row], job.seed, job.config, data=job.data, test=test, key=job.key,
                                 seed_dir=job.seed_dir, progress=progress, **common)
        return
    # Each JAX process would otherwise take 75% of the GPU's memory at its start, and the second one fail.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # spawn: a fork would copy this process's JAX runtime and its threads, which JAX does not support
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
        running = {}
        for job in todo:
            log.info("row %s (%s), seed %d of %d: started", job.row, BY_KEY[job.row].description, job.seed, job.of)
            running[pool.submit(_train_in_process, job, cache_dir=cache_dir, **common)] = job
        try:
            for future in concurrent.futures.as_completed(running):
                job = running[future]
                result = future.result()
                log.info("row %s, seed %d: done, test accuracy %s", job.row, job.seed, pct(result["test_accuracy"]))
                yield job, result
        except BaseException:
            for future in running:  # the trainings not started yet; those running finish their epoch's checkpoint
                future.cancel()
            raise


def _train_in_process(job: Job, *, cache_dir: Path, **common) -> dict:
    """``train_one`` in a worker process of ``--jobs``: its own logging, test set and compilation cache."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(levelname)s %(name)s [row {job.row} seed {job.seed}]: %(message)s")
    test_images, test_labels = load_split(job.data.test)
    cache = jax_compilation_cache(cache_dir) if job.config.engine == "jax" else contextlib.nullcontext()
    with cache:
        return train_one(BY_KEY[job.row], job.seed, job.config, data=job.data, test={"images": test_images,
                         "labels": test_labels}, key=job.key, seed_dir=job.seed_dir, progress=False, **common)


def train_one(row: Row, seed: int, config: TrainConfig, *, data: Data, test: dict, key: str, seed_dir: Path,
              quick: bool, tracking_config: tracking.TrackingConfig, parent_id: str | None,
              progress: bool, code: str) -> dict:
    """Train (or resume) one network, score it on the test set, write its result.json last."""
    start = time.perf_counter()
    job = _tracked_training(row, seed, config, data=data, key=key, seed_dir=seed_dir, quick=quick,
                            tracking_config=tracking_config, parent_id=parent_id, progress=progress)
    scores = {}

    def score_test_set(run, summary):
        probabilities = load_model(job.paths.model, engine=config.engine,
                                   device=config.device).predict_proba(test["images"])
        scores["test_accuracy"] = float(np.mean(probabilities.argmax(axis=1) == test["labels"]))
        save_npz(seed_dir / PROBABILITIES_FILE, probabilities=probabilities)
        if run is not None:
            run.log_metrics({"test_accuracy": scores["test_accuracy"]})

    try:
        summary = train_tracked(job, after=score_test_set)
    except PipelineError as e:
        raise PipelineError(f"row {row.key}, seed {seed}: {e}") from None
    result = {
        "row": row.key, "seed": seed, "key": key, "settings": dataclasses.asdict(config),
        "best_validation_accuracy": summary["best_validation_accuracy"], "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"], "stopped": summary["stopped"], "test_accuracy": scores["test_accuracy"],
        # a resumed training adds its earlier epochs' time: the figure is the whole training's
        "seconds": round(time.perf_counter() - start + _earlier_seconds(summary), 1),
        "train_seconds": summary["seconds"], "engine": summary["engine"], "device": summary["device"],
        "run_id": summary["run_id"], "code": code,
    }
    write_json(seed_dir / RESULT_FILE, result)
    return result


def _tracked_training(row: Row, seed: int, config: TrainConfig, *, data: Data, key: str, seed_dir: Path,
                      quick: bool, tracking_config: tracking.TrackingConfig, parent_id: str | None,
                      progress: bool) -> TrackedTraining:
    """A (row, seed)'s training, a child run of the table's run (tags row and seed)."""
    preset = row.preset if isinstance(row.preset, str) else "custom"  # a row's own list of layers
    tags = {"table": "chapter6", "row": row.key, "seed": seed, "preset": preset, "dataset": config.dataset,
            "engine": config.engine, "device": config.device, "quick": quick, "stage": "table"}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id  # MLflow shows the run nested under the table's run
    params = {**tracking.flatten({"train": dataclasses.asdict(config)}),
              "table.row": row.key, "table.seed": seed, "table.quick": quick}
    if row.expand:  # the row's own training set
        params.update(tracking.flatten({"expand": dataclasses.asdict(ExpandConfig(**row.expand))}))
    paths = TrainPaths.of(config, prepared=data.prepared, expanded=data.expanded, model=seed_dir / "model",
                          checkpoints=seed_dir / "checkpoints", metrics=seed_dir / "metrics")
    return TrackedTraining(config=config, paths=paths, tracking=tracking_config, run_name=f"row{row.key}-seed{seed}",
                           run_key=key, tags=tags, params=params, progress=progress)


def _earlier_seconds(summary: dict) -> float:
    return sum(r["seconds"] for r in summary["history"][: summary["resumed_from_epoch"]])


@contextlib.contextmanager
def jax_compilation_cache(directory: Path) -> Iterator[None]:
    """Keep XLA's compiled programs in ``directory`` while the table runs: the seeds of a row, and rows
    sharing a network, then compile it once (about 3 s saved per network on 2 CPU cores; the program
    is the same, so are the numbers). $JAX_COMPILATION_CACHE_DIR, when set, is left in charge."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = [getattr(jax.config, name) for name in names]
    for name, value in zip(names, (str(directory), 0.0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # a cache opened earlier in this process elsewhere is let go
    try:
        yield
    finally:
        for name, value in zip(names, previous):
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def missing_text(missing: list[tuple[str, int]]) -> str:
    """"8 (seed 2), best (seeds 1, 2, 3, 4, 5)" from [("8", 2), ("best", 1), ...]."""
    by_row: dict[str, list[int]] = {}
    for row, seed in missing:
        by_row.setdefault(row, []).append(seed)
    return ", ".join(f"{row} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
                     for row, seeds in by_row.items())
