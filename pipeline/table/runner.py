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


@dataclass(frozen=True)
class TableRun:
    """One call of the table command: what to train and report, and how; validated where it is built."""

    keys: tuple[str, ...]  # the selected rows, in table order (rows.select_rows)
    repeats: int = 3
    quick: bool = False
    engine: str = "jax"
    device: str = "cpu"
    steps_per_call: int = 500
    tracking: tracking.TrackingConfig = dataclasses.field(default_factory=lambda: tracking.TrackingConfig(enabled=False))
    jobs: int = 1
    report_only: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.repeats < 1:
            raise ConfigError(f"Got --repeats {self.repeats}: must be at least 1")
        if self.jobs < 1:
            raise ConfigError(f"Got --jobs {self.jobs}: must be at least 1 (trainings at once)")

    def seeds_wanted(self, row: Row) -> int:
        return n_seeds(row, self.repeats, self.keys)


def run_table(*, rows: Sequence[str] | str | None = None, prepared_dir: Path, expanded_dir: Path, out_dir: Path,
              tracking_config: tracking.TrackingConfig | None = None, **settings) -> dict:
    """Train what is missing of ``rows``, write the report; returns results.json's content plus
    ``trained``, the (row, seed) pairs trained (or resumed) by this call, and ``missing``, those
    still to train (none, unless ``report_only``: then the report shows what is on disk and nothing
    trains). ``settings`` are the other fields of :class:`TableRun`."""
    table = TableRun(keys=tuple(select_rows(rows)), tracking=tracking_config or tracking.TrackingConfig(enabled=False),
                     **settings)
    prepared_dir, expanded_dir, out_dir = Path(prepared_dir), Path(expanded_dir), Path(out_dir)
    data = (quick_data(prepared_dir, expanded_dir, out_dir) if table.quick
            else Data(prepared_dir, expanded_dir, prepared_dir / "test.npz"))
    _require_data(table, data)
    with jax_compilation_cache(out_dir / ".jax-cache") if table.engine == "jax" else contextlib.nullcontext():
        return _run(table, data, out_dir)


def _require_data(table: TableRun, data: Data) -> None:
    """Fail before anything trains when a data set the selected rows need is missing."""
    for path in (data.prepared / "validation.npz", data.test):
        if not path.is_file():
            raise PipelineError(f"{path} not found (run the data stages first: dvc repro)")
    for key in table.keys:
        row = BY_KEY[key]
        if row.trains and not source_of(row, data).is_file():
            raise PipelineError(f"row {key} needs {source_of(row, data)}, which is missing "
                                "(run the data stages first: dvc repro)")


def _run(table: TableRun, data: Data, out_dir: Path) -> dict:
    # the code as this process loaded it (hashed once, at the start): its files may be edited while a
    # table trains for hours
    code = code_version()
    test_images, test_labels = load_split(data.test)
    test = {"images": test_images, "labels": test_labels}
    parent_key = f"chapter6-table quick={table.quick}"
    parent_resume = tracking.resumable_run(out_dir, parent_key)
    with tracking.tracked_run(table.tracking, run_name="chapter6-table" + (" (quick)" if table.quick else ""),
                              resume_run_id=parent_resume, tags={"table": "chapter6", "quick": table.quick}) as parent:
        if parent is not None:
            tracking.remember_run(out_dir, parent, parent_key)
            if parent.run_id != parent_resume:
                parent.log_params({"quick": table.quick})
            parent.set_tags({"rows": ",".join(table.keys), "repeats": table.repeats})
        found, todo, missing = _plan(table, data, out_dir, code, sha256_file(data.test))
        trained = []
        for job, result in train_jobs(todo, table, test=test, code=code, parent_id=parent.run_id if parent else None,
                                      cache_dir=out_dir / ".jax-cache"):
            found[job.row][job.seed] = result
            trained.append((job.row, job.seed))
        lines = _lines(table, found, data, out_dir, test)
        results_json = {"quick": table.quick, "quick_settings": QUICK if table.quick else None,
                        "repeats": table.repeats, "rows_selected": list(table.keys), "code": code, "lines": lines}
        write_json(out_dir / "results.json", results_json)
        report_files = write_report(results_json, out_dir, test)
        if parent is not None:
            for path in (*report_files, out_dir / "results.json"):
                parent.log_artifact(path)
            parent.log_metrics({f"row_{line['row']}_test_accuracy": line["ours"] for line in lines
                                if line["ours"] is not None})
    return {**results_json, "trained": trained, "missing": missing, "parent_run_id": parent.run_id if parent else None}


def _plan(table: TableRun, data: Data, out_dir: Path, code: str, test_sha: str) -> tuple[dict, list, list]:
    """What is on disk already and what to train: (found {row: {seed: result}}, the jobs to train,
    the (row, seed) pairs missing from a report-only call)."""
    found: dict[str, dict[int, dict]] = {row.key: {} for row in ROWS}
    todo, missing = [], []
    for row in (row for row in ROWS if row.trains):
        count = table.seeds_wanted(row)
        seeds = range(1, max(count, last_seed_on_disk(out_dir / row.key)) + 1)
        on_disk = any((out_dir / row.key / f"seed{seed}" / RESULT_FILE).is_file() for seed in seeds)
        asked_row = row.key in table.keys
        # (a row's own data, such as best's elastic set, is made only to train it or to match its results)
        rdata = row_data(row, data, out_dir, table.progress) if on_disk or (asked_row and not table.report_only) else data
        for seed in seeds:
            seed_dir = out_dir / row.key / f"seed{seed}"
            asked, finished = asked_row and seed <= count, (seed_dir / RESULT_FILE).is_file()
            if not finished and (not asked or table.report_only):
                if asked:
                    missing.append((row.key, seed))
                continue  # never run and not asked for: no need to hash its data
            config = train_config(row, seed, quick=table.quick, engine=table.engine, device=table.device,
                                  steps_per_call=table.steps_per_call)
            key = result_key(config, rdata, test_sha)
            result = load_result(seed_dir, key, code)
            if result is not None:
                found[row.key][seed] = result
            elif asked and table.report_only:  # its result is from other settings, data or code
                missing.append((row.key, seed))
            elif asked:
                todo.append(Job(row.key, seed, count, config, key, seed_dir, rdata))
    return found, todo, missing


def _lines(table: TableRun, found: dict, data: Data, out_dir: Path, test: dict) -> list[dict]:
    """results.json's lines, in table order; a row made of another row's networks comes after that row."""
    lines = []
    for row in ROWS:
        if row.shifted_of:
            results = [found[row.shifted_of][seed] for seed in sorted(found[row.shifted_of])]
            lines.append(shifted_line(row, results, table.seeds_wanted(BY_KEY[row.shifted_of]), out_dir=out_dir,
                                      data=data, test=test, engine=table.engine, device=table.device,
                                      progress=table.progress))
        elif row.is_ensemble:
            members = [found[row.ensemble_of][seed] for seed in sorted(found[row.ensemble_of]) if seed <= row.size]
            probabilities = [load_npz(out_dir / row.ensemble_of / f"seed{m['seed']}" / PROBABILITIES_FILE)
                             ["probabilities"] for m in members]
            lines.append(ensemble_line(row, members, probabilities, test["labels"]))
        else:
            results = [found[row.key][seed] for seed in sorted(found[row.key])]
            lines.append(training_line(row, results, table.seeds_wanted(row)))
    return lines


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


def train_jobs(todo: list[Job], table: TableRun, *, test: dict, code: str, parent_id: str | None,
               cache_dir: Path) -> Iterator:
    """Train every job, ``table.jobs`` at a time; yields (job, result) as each finishes."""
    if table.jobs == 1 or len(todo) <= 1:
        for job in todo:
            log.info("row %s (%s), seed %d of %d", job.row, BY_KEY[job.row].description, job.seed, job.of)
            yield job, train_one(job, table, test=test, code=code, parent_id=parent_id)
        return
    # Each JAX process would otherwise take 75% of the GPU's memory at its start, and the second one fail.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # spawn: a fork would copy this process's JAX runtime and its threads, which JAX does not support
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(table.jobs, len(todo)), mp_context=context) as pool:
        running = {}
        for job in todo:
            log.info("row %s (%s), seed %d of %d: started", job.row, BY_KEY[job.row].description, job.seed, job.of)
            running[pool.submit(_train_in_process, job, table, code=code, parent_id=parent_id,
                                cache_dir=cache_dir)] = job
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


def _train_in_process(job: Job, table: TableRun, *, code: str, parent_id: str | None, cache_dir: Path) -> dict:
    """``train_one`` in a worker process of ``--jobs``: its own logging, test set and compilation cache."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(levelname)s %(name)s [row {job.row} seed {job.seed}]: %(message)s")
    test_images, test_labels = load_split(job.data.test)
    cache = jax_compilation_cache(cache_dir) if job.config.engine == "jax" else contextlib.nullcontext()
    with cache:
        return train_one(job, dataclasses.replace(table, progress=False),
                         test={"images": test_images, "labels": test_labels}, code=code, parent_id=parent_id)


def train_one(job: Job, table: TableRun, *, test: dict, code: str, parent_id: str | None) -> dict:
    """Train (or resume) one network, score it on the test set, write its result.json last."""
    start = time.perf_counter()
    training = _tracked_training(job, table, parent_id)
    config, scores = job.config, {}

    def score_test_set(run, summary):
        model = load_model(training.paths.model, engine=config.engine, device=config.device)
        probabilities = model.predict_proba(test["images"])
        scores["test_accuracy"] = float(np.mean(probabilities.argmax(axis=1) == test["labels"]))
        save_npz(job.seed_dir / PROBABILITIES_FILE, probabilities=probabilities)
        if run is not None:
            run.log_metrics({"test_accuracy": scores["test_accuracy"]})

    try:
        summary = train_tracked(training, after=score_test_set)
    except PipelineError as e:
        raise PipelineError(f"row {job.row}, seed {job.seed}: {e}") from None
    result = {
        "row": job.row, "seed": job.seed, "key": job.key, "settings": dataclasses.asdict(config),
        "best_validation_accuracy": summary["best_validation_accuracy"], "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"], "stopped": summary["stopped"], "test_accuracy": scores["test_accuracy"],
        # a resumed training adds its earlier epochs' time: the figure is the whole training's
        "seconds": round(time.perf_counter() - start + _earlier_seconds(summary), 1),
        "train_seconds": summary["seconds"], "engine": summary["engine"], "device": summary["device"],
        "run_id": summary["run_id"], "code": code,
    }
    write_json(job.seed_dir / RESULT_FILE, result)
    return result


def _tracked_training(job: Job, table: TableRun, parent_id: str | None) -> TrackedTraining:
    """A (row, seed)'s training, a child run of the table's run (tags row and seed)."""
    row, config = BY_KEY[job.row], job.config
    preset = row.preset if isinstance(row.preset, str) else "custom"  # a row's own list of layers
    tags = {"table": "chapter6", "row": row.key, "seed": job.seed, "preset": preset, "dataset": config.dataset,
            "engine": config.engine, "device": config.device, "quick": table.quick, "stage": "table"}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id  # MLflow shows the run nested under the table's run
    params = {**tracking.flatten({"train": dataclasses.asdict(config)}),
              "table.row": row.key, "table.seed": job.seed, "table.quick": table.quick}
    if row.expand:  # the row's own training set
        params.update(tracking.flatten({"expand": dataclasses.asdict(ExpandConfig(**row.expand))}))
    paths = TrainPaths.of(config, prepared=job.data.prepared, expanded=job.data.expanded,
                          model=job.seed_dir / "model", checkpoints=job.seed_dir / "checkpoints",
                          metrics=job.seed_dir / "metrics")
    return TrackedTraining(config=config, paths=paths, tracking=table.tracking,
                           run_name=f"row{row.key}-seed{job.seed}", run_key=job.key, tags=tags, params=params,
                           progress=table.progress)


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
