"""Sweep params.yaml values: every point of a grid, or an Optuna search, each point a training.

    python -m pipeline sweep -S train.eta=0.03,0.1,0.3 -S train.epochs=5             # a grid: 3 trainings
    python -m pipeline sweep -S 'train.eta=tag(log, interval(0.01, 1))' --search optuna --trials 8
    python -m pipeline sweep ... --ray auto --max-concurrent 4                       # on a Ray cluster

The overrides use ``dvc exp run -S``'s syntax (Hydra's: ``a,b,c``, ``choice()``, ``range()``, and
for Optuna ``interval()`` and ``tag(log, ...)``). Each trial is an MLflow child run of the sweep's
run with the train stage's params, per-epoch metrics and model; the sweep's run gets the best trial
by validation accuracy (never test accuracy: the test set stays unseen until a model is chosen), as
tags ``best.<key>``, and the metric ``best_validation_accuracy``. OUT holds each trial's folder
(trials/<key>/: model, metrics, result.json), sweep.json and sweep.png.

The same command again continues: a finished trial is never trained again, an interrupted one
resumes from its last epoch's checkpoint. ``--trials N`` is the study's total of finished trials,
as Optuna's MaxTrialsCallback counts them: a second call with a larger N, from this machine or
another with the same --study-storage (the team's PostgreSQL: $OPTUNA_STORAGE from
deploy/stack.py), adds trials to the same study; so do several drivers at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from pipeline import tracking
from pipeline.cluster.driver import Driver, Training, run_trainings
from pipeline.core.files import write_json
from pipeline.sweep import study as studies
from pipeline.sweep.config import SweepConfig
from pipeline.sweep.report import sweep_summary, write_plot
from pipeline.sweep.trials import Trial, finished, train_trial
from pipeline.tracking import registry

log = logging.getLogger(__name__)


def default_name(overrides: list[str], search: str) -> str:
    """The same command, the same sweep: a name from the overrides and the search."""
    digest = hashlib.sha256(json.dumps([search, *overrides]).encode()).hexdigest()[:8]
    return f"sweep-{digest}"


def run_sweep(sweep: SweepConfig, *, prepared_dir: Path, expanded_dir: Path, out_dir: Path) -> dict:
    """Run what is missing of the sweep; returns sweep.json's content."""
    out_dir = Path(out_dir)
    # every point (or the search's bounds) checked before the run opens and anything trains
    points = sweep.space.grid() if sweep.search == "grid" else None
    if points is None:
        sweep.space.distributions()
    paths = {"prepared": Path(prepared_dir), "expanded": Path(expanded_dir)}
    parent_tags = {"sweep": sweep.name, "sweep.role": "parent"}
    with tracking.tracked_run(
        sweep.tracking,
        run_name=sweep.name,
        resume_run_id=tracking.find_run(sweep.tracking, parent_tags),
        tags={
            **parent_tags,
            "sweep.search": sweep.search,
            "sweep.space": _space_text(sweep),
        },
    ) as parent:
        parent_id = parent.run_id if parent else None
        if sweep.search == "grid":
            results = _grid(sweep, points, paths, out_dir, parent_id)
        else:
            results = _optuna(sweep, paths, out_dir, parent_id)
        summary = sweep_summary(sweep, results)
        write_json(out_dir / "sweep.json", summary)
        write_plot(summary, out_dir / "sweep.png")
        if parent is not None:
            _record_best(parent, summary)
            if sweep.register:
                registry.register_best(parent, _candidates(summary, out_dir), sweep.tracking.registered_model_name)
            parent.log_artifact(out_dir / "sweep.json")
            parent.log_artifact(out_dir / "sweep.png")
    return summary


def _space_text(sweep: SweepConfig) -> str:
    return " ".join(axis.typed for axis in sweep.space.axes)


def _trial(sweep: SweepConfig, point: dict, paths: dict, out_dir: Path, number: int | None = None) -> Trial:
    key = sweep.space.point_key(point)
    return Trial(
        sweep=sweep.name,
        key=key,
        point=point,
        params=sweep.space.apply(sweep.space.params, point),
        source=sweep.space.source,
        folder=out_dir / "trials" / key,
        prepared=paths["prepared"],
        expanded=paths["expanded"],
        number=number,
    )


def _grid(sweep: SweepConfig, points: list[dict], paths: dict, out_dir: Path, parent_id: str | None) -> list[dict]:
    trials = [_trial(sweep, point, paths, out_dir) for point in points]
    earlier = [finished(trial) for trial in trials]  # each result.json read once
    results = [result for result in earlier if result is not None]
    todo = [trial for trial, result in zip(trials, earlier) if result is None]
    log.info("sweep %s: %d points, %d finished before, %d to train", sweep.name, len(trials), len(results), len(todo))
    with tqdm(total=len(todo), desc="trials", disable=not sweep.progress) as bar:
        for _, result in execute(sweep, [trial.training() for trial in todo], parent_id, out_dir):
            results.append(result)
            bar.update()
    return results


def _optuna(sweep: SweepConfig, paths: dict, out_dir: Path, parent_id: str | None) -> list[dict]:
    storage = (
        sweep.study_storage or os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{(out_dir / 'optuna.db').resolve()}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    study = studies.open_study(storage, sweep.name, seed=sweep.seed)
    driver = _driver_id(out_dir)
    asking = _Asking(study, sweep, paths, out_dir, driver)
    log.info(
        "sweep %s: Optuna study in %s, %d of %d trials finished",
        sweep.name,
        studies.redact(storage),
        studies.finished_count(study),
        sweep.trials,
    )
    with tqdm(
        total=sweep.trials, initial=studies.finished_count(study), desc="trials", disable=not sweep.progress
    ) as bar:
        for trial, result in execute(sweep, (trial.training() for trial in asking.trials()), parent_id, out_dir):
            asking.tell(trial, result)
            bar.update()
    return studies.results(study)


class _Asking:
    """The driver's side of an Optuna search: ask a trial when a place is free, tell its result.

    Trials this driver left RUNNING (it was killed) are run first, under their own numbers. A point
    trained before (TPE may propose it again) is told its earlier result without training again; one
    being trained right now is told when that training ends."""

    def __init__(self, study, sweep: SweepConfig, paths: dict, out_dir: Path, driver: str):
        self.study, self.sweep, self.paths, self.out_dir, self.driver = study, sweep, paths, out_dir, driver
        self.in_flight: dict[str, list[int]] = {}  # point key -> Optuna trial numbers waiting for it

    def trials(self) -> Iterator[Trial]:
        for frozen in studies.own_running_trials(self.study, self.driver):
            yield from self._start(frozen.number, frozen.params)
        distributions = self.sweep.space.distributions()
        while studies.finished_count(self.study) + self.asked_in_flight() < self.sweep.trials:
            asked = self.study.ask(distributions)
            studies.mark_driver(asked, self.driver)
            yield from self._start(asked.number, asked.params)

    def asked_in_flight(self) -> int:
        """The trials asked and not yet told: every one will finish, so each counts toward --trials
        (a point asked twice while it trains is one training but two trials)."""
        return sum(len(numbers) for numbers in self.in_flight.values())

    def _start(self, number: int, point: dict) -> Iterator[Trial]:
        trial = _trial(self.sweep, dict(point), self.paths, self.out_dir, number)
        if trial.key in self.in_flight:
            self.in_flight[trial.key].append(number)
        elif (earlier := finished(trial)) is not None:
            self._tell(number, earlier)
        else:
            self.in_flight[trial.key] = [number]
            yield trial

    def tell(self, trial: Trial, result: dict) -> None:
        for number in self.in_flight.pop(trial.key, [trial.number]):
            self._tell(number, result)

    def _tell(self, number: int, result: dict) -> None:
        studies.tell(self.study, number, {**result, "number": number})


def execute(
    sweep: SweepConfig, trainings: Iterable[Training], parent_id: str | None, out_dir: Path
) -> Iterator[tuple[Trial, dict]]:
    """Train each trial, in this process one at a time or as Ray tasks; yields (trial, result)."""
    driver = Driver(
        train=functools.partial(train_trial, parent_id),
        cluster=sweep.cluster,
        tracking=sweep.tracking,
        compile_cache=out_dir / ".jax-cache",
    )
    for training, result in run_trainings(trainings, driver):
        log.info("%s on %s: %s", training.name, result.get("ray.node_ip", "this machine"), _outcome(result))
        yield training.task, result


def _outcome(result: dict) -> str:
    if "failed" in result:
        return f"failed: {result['failed']}"
    return f"validation accuracy {100 * result['validation_accuracy']:.2f}%"


def _driver_id(out_dir: Path) -> str:
    """This driver's name in the study, kept in OUT: the same command again is the same driver."""
    path = out_dir / "driver.json"
    if path.is_file():
        return json.loads(path.read_text())["driver"]
    driver = uuid.uuid4().hex
    write_json(path, {"driver": driver})
    return driver


def _candidates(summary: dict, out_dir: Path) -> list[registry.Candidate]:
    """The finished trials, in the summary's order: ties go to the earlier trial, as its best does."""
    return [
        registry.Candidate(
            run_id=trial.get("run_id"),
            model_dir=out_dir / "trials" / trial["key"] / "model",
            validation_accuracy=trial["validation_accuracy"],
            labels={"trial": trial["key"]},
        )
        for trial in summary["trials"]
        if "validation_accuracy" in trial
    ]


def _record_best(parent, summary: dict) -> None:
    best = summary["best"]
    parent.log_metrics({"trials_finished": len(summary["trials"])})
    if best is None:
        return
    parent.log_metrics({"best_validation_accuracy": best["validation_accuracy"]})
    parent.set_tags(
        {
            "best.trial": best["key"],
            **({"best.run_id": best["run_id"]} if best.get("run_id") else {}),
            **{f"best.{key}": value for key, value in best["point"].items()},
        }
    )
