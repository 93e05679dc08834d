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

--jobs N trains N networks at once on this machine, as tasks of a local Ray instance (results are
the same as one at a time; pip install -e ".[cluster]"). On a 2-core CPU keep 1: one training already
uses both cores. --ray ADDRESS (or auto: $RAY_ADDRESS) runs every (row, seed) as a task on a Ray
cluster, its data and checkpoints in the shared storage (the DVC remote), --gpus-per-training 0.25
sharing a GPU four ways; a training whose node dies resumes on another from its last epoch
(docs/cluster.md).

Writes OUT/report.md (Markdown table: the book's accuracy beside ours), OUT/report.png (both
against the row), OUT/curves.png (each row's validation error per epoch) and OUT/results.json.
Engine, device and steps_per_call come from the train section of --params; everything else from
the row. Each training is an MLflow child run (tags row, seed) of one parent
run per table (tag table=chapter6), which also gets the report.

--register, once the trainings are done, registers the table's best single network by validation
accuracy (never test; not an ensemble, not a test-time-shift row; networks of earlier calls count
while their MLflow run exists) as a version of tracking.registered_model: its pyfunc model is logged
to its run then, the trainings log none. The alias champion moves to it only when its validation
accuracy beats the champion's. The parent run gets the tags registered.run_id, registered.row,
registered.seed and registered.version.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline import tracking
from pipeline.core.config import PipelineError
from pipeline.core.files import load_npz, sha256_file, write_json
from pipeline.data.splits import load_split
from pipeline.nn.compile_cache import jax_compilation_cache
from pipeline.table.config import TableConfig
from pipeline.table.datasets import Data, quick_data, row_data, source_of
from pipeline.table.jobs import Job, JobContext, train_jobs
from pipeline.table.lines import ensemble_line, shifted_line, training_line
from pipeline.table.report import write_report
from pipeline.table.results import (
    PROBABILITIES_FILE,
    RESULT_FILE,
    code_version,
    last_seed_on_disk,
    load_result,
    result_key,
)
from pipeline.table.rows import BY_KEY, QUICK, ROWS, select_rows, train_config
from pipeline.tracking import registry

log = logging.getLogger(__name__)


def run_table(
    *,
    rows: Sequence[str] | str | None = None,
    prepared_dir: Path,
    expanded_dir: Path,
    out_dir: Path,
    tracking_config: tracking.TrackingConfig | None = None,
    **settings,
) -> dict:
    """Train what is missing of ``rows``, write the report; returns results.json's content plus
    ``trained``, the (row, seed) pairs trained (or resumed) by this call, and ``missing``, those
    still to train (none, unless ``report_only``: then the report shows what is on disk and nothing
    trains). ``settings`` are the other fields of :class:`TableConfig`."""
    table = TableConfig(
        keys=tuple(select_rows(rows)), tracking=tracking_config or tracking.TrackingConfig(enabled=False), **settings
    )
    prepared_dir, expanded_dir, out_dir = Path(prepared_dir), Path(expanded_dir), Path(out_dir)
    data = (
        quick_data(prepared_dir, expanded_dir, out_dir)
        if table.quick
        else Data(prepared_dir, expanded_dir, prepared_dir / "test.npz")
    )
    _require_data(table, data)
    with jax_compilation_cache(out_dir / ".jax-cache") if table.engine == "jax" else contextlib.nullcontext():
        return _run(table, data, out_dir)


def _require_data(table: TableConfig, data: Data) -> None:
    """Fail before anything trains when a data set the selected rows need is missing."""
    for path in (data.prepared / "validation.npz", data.test):
        if not path.is_file():
            raise PipelineError(f"{path} not found (run the data stages first: dvc repro)")
    for key in table.keys:
        row = BY_KEY[key]
        if row.trains and not source_of(row, data).is_file():
            raise PipelineError(
                f"row {key} needs {source_of(row, data)}, which is missing (run the data stages first: dvc repro)"
            )


def _run(table: TableConfig, data: Data, out_dir: Path) -> dict:
    # the code as this process loaded it (hashed once, at the start): its files may be edited while a
    # table trains for hours
    code = code_version()
    test_images, test_labels = load_split(data.test)
    test = {"images": test_images, "labels": test_labels}
    parent_key = f"chapter6-table quick={table.quick}"
    parent_resume = tracking.resumable_run(out_dir, parent_key)
    with tracking.tracked_run(
        table.tracking,
        run_name="chapter6-table" + (" (quick)" if table.quick else ""),
        resume_run_id=parent_resume,
        tags={"table": "chapter6", "quick": table.quick},
    ) as parent:
        if parent is not None:
            tracking.remember_run(out_dir, parent, parent_key)
            if parent.run_id != parent_resume:
                parent.log_params({"quick": table.quick})
            parent.set_tags({"rows": ",".join(table.keys), "repeats": table.repeats})
        found, todo, missing = _plan(table, data, out_dir, code, sha256_file(data.test))
        trained = []
        context = JobContext(table, code, parent.run_id if parent else None)
        for job, result in train_jobs(todo, context, cache_dir=out_dir / ".jax-cache"):
            found[job.row][job.seed] = result
            trained.append((job.row, job.seed))
        lines = _lines(table, found, data, out_dir, test)
        results_json = {
            "quick": table.quick,
            "quick_settings": QUICK if table.quick else None,
            "repeats": table.repeats,
            "rows_selected": list(table.keys),
            "code": code,
            "lines": lines,
        }
        write_json(out_dir / "results.json", results_json)
        report_files = write_report(results_json, out_dir, test)
        if parent is not None:
            for path in (*report_files, out_dir / "results.json"):
                parent.log_artifact(path)
            parent.log_metrics(
                {f"row_{line['row']}_test_accuracy": line["ours"] for line in lines if line["ours"] is not None}
            )
        registered = None
        if table.register:  # (tracking is on: TableConfig refuses --register without it)
            registered = registry.register_best(
                parent, _candidates(found, out_dir), table.tracking.registered_model_name
            )
    return {
        **results_json,
        "trained": trained,
        "missing": missing,
        "parent_run_id": parent.run_id if parent else None,
        "registered": registered,
    }


def _candidates(found: dict, out_dir: Path) -> list[registry.Candidate]:
    """Every single network of the table, this call's and earlier calls', in table order (ties go to
    the earlier row, then the lower seed). The ensembles and the test-time-shift rows are not one
    trained network: they are left out."""
    return [
        registry.Candidate(
            run_id=result.get("run_id"),
            model_dir=out_dir / row.key / f"seed{seed}" / "model",
            validation_accuracy=result["best_validation_accuracy"],
            test_accuracy=result["test_accuracy"],
            labels={"row": row.key, "seed": seed},
        )
        for row in ROWS
        if row.trains
        for seed, result in sorted(found[row.key].items())
    ]


def _plan(table: TableConfig, data: Data, out_dir: Path, code: str, test_sha: str) -> tuple[dict, list, list]:
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
        rdata = (
            row_data(row, data, out_dir, table.progress) if on_disk or (asked_row and not table.report_only) else data
        )
        for seed in seeds:
            seed_dir = out_dir / row.key / f"seed{seed}"
            asked, finished = asked_row and seed <= count, (seed_dir / RESULT_FILE).is_file()
            if not finished and (not asked or table.report_only):
                if asked:
                    missing.append((row.key, seed))
                continue  # never run and not asked for: no need to hash its data
            config = train_config(
                row,
                seed,
                quick=table.quick,
                engine=table.engine,
                device=table.device,
                steps_per_call=table.steps_per_call,
            )
            key = result_key(config, rdata, test_sha)
            result = load_result(seed_dir, key, code)
            if result is not None:
                found[row.key][seed] = result
            elif asked and table.report_only:  # its result is from other settings, data or code
                missing.append((row.key, seed))
            elif asked:
                todo.append(Job(row.key, seed, count, config, key, seed_dir, rdata))
    return found, todo, missing


def _lines(table: TableConfig, found: dict, data: Data, out_dir: Path, test: dict) -> list[dict]:
    """results.json's lines, in table order; a row made of another row's networks comes after that row."""
    lines = []
    for row in ROWS:
        if row.shifted_of:
            results = [found[row.shifted_of][seed] for seed in sorted(found[row.shifted_of])]
            lines.append(
                shifted_line(
                    row,
                    results,
                    table.seeds_wanted(BY_KEY[row.shifted_of]),
                    out_dir=out_dir,
                    data=data,
                    test=test,
                    engine=table.engine,
                    device=table.device,
                    progress=table.progress,
                )
            )
        elif row.is_ensemble:
            members = [found[row.ensemble_of][seed] for seed in sorted(found[row.ensemble_of]) if seed <= row.size]
            probabilities = [
                load_npz(out_dir / row.ensemble_of / f"seed{m['seed']}" / PROBABILITIES_FILE)["probabilities"]
                for m in members
            ]
            lines.append(ensemble_line(row, members, probabilities, test["labels"]))
        else:
            results = [found[row.key][seed] for seed in sorted(found[row.key])]
            lines.append(training_line(row, results, table.seeds_wanted(row)))
    return lines
