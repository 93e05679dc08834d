"""The shared Optuna study on a real SQLite file: concurrent opening, a restarted driver's own
RUNNING trials, the trial budget, the best trial, and no password in any message."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest
from sqlalchemy import exc

from pipeline.core.config import PipelineError
from pipeline.sweep import study as study_module
from pipeline.sweep.study import (
    best_trial,
    finished_count,
    mark_driver,
    open_study,
    own_running_trials,
    redact,
)

optuna = pytest.importorskip("optuna")  # an optional extra: without it these tests are skipped
TrialState = optuna.trial.TrialState
DRIVERS = 4
ROUNDS = 4  # fresh databases opened by all drivers at once; a bare create_study lost ~1 race in 2 here


def _open_in_rounds(folder: str, barrier, results) -> None:
    """A driver: in each round, wait for the others, then open the round's study on a fresh file."""
    for round_ in range(ROUNDS):
        barrier.wait(timeout=60)
        try:
            study = open_study(f"sqlite:///{folder}/round{round_}.db", "sweep")
            results.put((round_, study._study_id, None))
        except Exception as e:  # reported to the test, which names it
            results.put((round_, None, f"{type(e).__name__}: {e}"))


def test_drivers_opening_a_fresh_database_at_once_share_one_study(tmp_path):
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    barrier, results = context.Barrier(DRIVERS), context.Queue()
    drivers = [context.Process(target=_open_in_rounds, args=(str(tmp_path), barrier, results)) for _ in range(DRIVERS)]
    for driver in drivers:
        driver.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(DRIVERS * ROUNDS)]
    finally:
        for driver in drivers:
            driver.join(timeout=30)
            if driver.is_alive():
                driver.kill()
    errors = [error for _, _, error in outcomes if error]
    assert not errors, errors
    for round_ in range(ROUNDS):
        url = f"sqlite:///{tmp_path}/round{round_}.db"
        assert optuna.get_all_study_names(url) == ["sweep"]
        assert {study_id for r, study_id, _ in outcomes if r == round_} == {
            optuna.load_study(study_name="sweep", storage=url)._study_id
        }


def _race_lost(statement: str, message: str) -> exc.OperationalError:
    return exc.OperationalError(statement, {}, sqlite3.OperationalError(message))


def test_a_lost_creation_race_is_retried_and_other_errors_are_not(tmp_path, monkeypatch):
    real = study_module._create_or_load
    calls = []

    def lose_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise _race_lost("CREATE TABLE studies", "table studies already exists")
        return real(*args)

    monkeypatch.setattr(study_module, "_create_or_load", lose_once)
    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: None)
    assert open_study(f"sqlite:///{tmp_path}/s.db", "sweep").study_name == "sweep"
    assert len(calls) == 2  # tried again once, and the study is there for every driver
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/s.db") == ["sweep"]

    def unreachable(*args):
        calls.append(args)
        raise _race_lost("SELECT 1", "unable to open database file")

    calls.clear()
    monkeypatch.setattr(study_module, "_create_or_load", unreachable)
    with pytest.raises(PipelineError, match="unable to open database file"):
        open_study(f"sqlite:///{tmp_path}/s.db", "sweep")
    assert len(calls) == 1


def test_reopening_loads_the_study_with_its_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    first = open_study(url, "sweep", seed=1)
    first.tell(first.ask(), 0.5)
    again = open_study(url, "sweep", seed=1)
    assert again._study_id == first._study_id and [t.value for t in again.trials] == [0.5]
    assert isinstance(again.sampler, optuna.samplers.TPESampler)
    assert again.direction == optuna.study.StudyDirection.MAXIMIZE


def test_the_seed_fixes_the_first_suggestions(tmp_path):
    def first_suggestions(name, seed):
        study = open_study(f"sqlite:///{tmp_path}/s.db", name, seed=seed)
        return [study.ask().suggest_float("eta", 0.001, 0.1, log=True) for _ in range(3)]

    assert first_suggestions("a", 7) == first_suggestions("b", 7) != first_suggestions("c", 8)


def test_a_minimizing_study_of_the_same_name_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(storage=url, study_name="sweep", direction="minimize")
    with pytest.raises(PipelineError, match="minimizes; a sweep maximizes"):
        open_study(url, "sweep")


def test_a_restarted_driver_finds_only_its_own_running_trials_and_tells_them(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    before_crash = open_study(url, "sweep")
    left, done, others, unmarked = (before_crash.ask() for _ in range(4))
    for trial, driver in ((left, "node-a"), (done, "node-a"), (others, "node-b")):
        mark_driver(trial, driver)
    before_crash.tell(done, 0.8)
    newer = before_crash.ask()  # asked after the trial to re-run, and still running
    mark_driver(newer, "node-b")

    restarted = open_study(url, "sweep")
    assert [t.number for t in own_running_trials(restarted, "node-a")] == [left.number]
    assert [t.number for t in own_running_trials(restarted, "node-b")] == [others.number, newer.number]
    assert own_running_trials(restarted, "node-c") == []

    restarted.tell(left.number, 0.9)
    reloaded = open_study(url, "sweep")
    assert reloaded.trials[left.number].state == TrialState.COMPLETE
    assert reloaded.trials[left.number].value == 0.9
    assert own_running_trials(reloaded, "node-a") == []
    assert reloaded.trials[unmarked.number].state == TrialState.RUNNING


def test_the_budget_counts_complete_and_pruned_trials(tmp_path):
    study = open_study(f"sqlite:///{tmp_path}/s.db", "sweep")
    assert finished_count(study) == 0
    study.tell(study.ask(), 0.5)
    study.tell(study.ask(), state=TrialState.PRUNED)
    study.tell(study.ask(), state=TrialState.FAIL)
    study.ask()  # running
    assert finished_count(study) == 2


def test_the_best_trial_is_the_earliest_of_the_highest_complete(tmp_path):
    study = open_study(f"sqlite:///{tmp_path}/s.db", "sweep")
    assert best_trial(study) is None
    study.tell(study.ask(), state=TrialState.PRUNED)
    study.tell(study.ask(), state=TrialState.FAIL)
    study.ask()
    assert best_trial(study) is None
    for value in (0.97, 0.99, 0.98, 0.99):
        study.tell(study.ask(), value)
    best = best_trial(study)
    assert best.value == 0.99 and best.number == 4


@pytest.mark.parametrize(
    "url, redacted",
    [
        (
            "postgresql+psycopg2://sweep:s3cr%40t@db.example:5432/optuna",
            "postgresql+psycopg2://sweep:***@db.example:5432/optuna",
        ),
        ("postgresql://sweep:p@ss:w/rd@10.0.0.1/optuna", "postgresql://sweep:***@10.0.0.1/optuna"),
        ("postgresql://sweep:@host/optuna", "postgresql://sweep:***@host/optuna"),
        (
            "postgresql://host/optuna?user=sweep&password=hunter2&x=1",
            "postgresql://host/optuna?user=sweep&password=***&x=1",
        ),
        ("postgresql://sweep@host:5432/optuna", "postgresql://sweep@host:5432/optuna"),
        ("sqlite:////tmp/a:b/optuna@1.db", "sqlite:////tmp/a:b/optuna@1.db"),
    ],
)
def test_redact_hides_the_password(url, redacted):
    assert redact(url) == redacted


def test_no_message_shows_the_password(tmp_path):
    # loopback, port 1: nothing listens; without psycopg2 the import fails first, also with the URL in hand
    url = "postgresql+psycopg2://sweep:hunter2@127.0.0.1:1/optuna?password=hunter2"
    with pytest.raises(PipelineError) as caught:
        open_study(url, "sweep")
    message = str(caught.value)
    assert "hunter2" not in message and "sweep:***@127.0.0.1:1" in message, message


def test_an_error_quoting_the_url_is_scrubbed():
    url = "postgresql://sweep:p%40ss@host/optuna"
    error = RuntimeError(f"could not use {url}: password p@ss refused")
    assert study_module._scrub(error, url) == "could not use postgresql://sweep:***@host/optuna: password *** refused"
