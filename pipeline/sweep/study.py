"""The Optuna study that the drivers of one ``--search optuna`` sweep share, in SQLite or PostgreSQL.

Optuna is an optional extra, imported only when a study is asked for. Several drivers may start at
once on an empty database: Optuna creates its tables on first use and concurrent creations crash
(a table or a unique row already there, see /work/shared/docs/scale-out-notes.md), so opening
retries on exactly those errors, then loads what the first driver made. Each driver marks the
trials it asks with its name (``DRIVER_ATTR``), so that a driver restarted after a crash finds the
trials it left RUNNING and runs them again instead of asking new ones. A storage URL may hold a
password: no message here shows it (:func:`redact`).
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any
from urllib.parse import unquote

from pipeline.core.config import PipelineError
from pipeline.tracking import SQLITE_TIMEOUT_S

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[cluster]"'
DRIVER_ATTR = "driver"  # the user attr naming the driver that asked a trial
OPEN_ATTEMPTS = 8  # tries at creating the tables and the study before giving up; ~8 s in all
# what sqlalchemy says when another driver created the same table or row first
RACE_WORDS = ("already exists", "duplicate", "unique constraint", "database is locked")
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][\w+.-]*://[^:/?#@]*:)(?P<password>.*)@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<password>[^&#]*)", re.IGNORECASE)


def import_optuna() -> Any:
    """The optuna module, or an error saying how to install it (it is an optional extra)."""
    try:
        import optuna
    except ImportError:
        raise PipelineError(f"an Optuna search needs Optuna: install it with {INSTALL_HINT}") from None
    return optuna


def redact(url: str) -> str:
    """``url`` with its password, in the user part or a ``password=`` query, replaced by ``***``."""
    url = _USERINFO.sub(r"\g<head>***@", url, count=1)
    return _QUERY_PASSWORD.sub(r"\g<head>***", url)


def open_study(storage: str, name: str, seed: int | None = None) -> Any:
    """Create the study ``name`` in ``storage`` (maximizing, TPE seeded by ``seed``), or load it.

    Safe when several drivers call it at once on an empty database: a creation that loses the race
    to another is retried, then finds the other's tables and study. The sampler lives in this
    process only: drivers given the same ``seed`` draw the same first (random) points, so give each
    driver its own."""
    optuna = import_optuna()
    for attempt in range(OPEN_ATTEMPTS):
        try:
            study = _create_or_load(optuna, storage, name, seed)
            break
        except Exception as e:
            if not _lost_a_race(e) or attempt == OPEN_ATTEMPTS - 1:
                raise PipelineError(
                    f"cannot open the Optuna study {name!r} at {redact(storage)}: {_scrub(e, storage)}"
                ) from None
            log.info("the Optuna study %r at %s: another driver is creating it; retrying", name, redact(storage))
            time.sleep(min(2.0, 0.05 * 2**attempt) * (1 + random.random()))
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise PipelineError(
            f"the Optuna study {name!r} at {redact(storage)} minimizes; a sweep maximizes the validation "
            "accuracy: give the sweep another study name"
        )
    return study


def _create_or_load(optuna: Any, storage: str, name: str, seed: int | None) -> Any:
    rdb = optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage))
    return optuna.create_study(
        storage=rdb,
        study_name=name,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )


def _engine_kwargs(storage: str) -> dict[str, Any]:
    """SQLite waits for another driver's write lock; a PostgreSQL connection is checked before use."""
    if storage.startswith("sqlite:"):
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def _lost_a_race(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is another driver's table or row created first."""
    from sqlalchemy import exc

    chain: list[BaseException] = []
    while error is not None and error not in chain:  # Optuna wraps sqlalchemy's error in its own
        chain.append(error)
        error = error.__cause__ or error.__context__
    return any(
        isinstance(e, exc.IntegrityError)
        or (isinstance(e, exc.DBAPIError) and any(word in str(e).lower() for word in RACE_WORDS))
        for e in chain
    )


def _scrub(error: BaseException, storage: str) -> str:
    """The first line of ``error``, with the storage URL redacted and its password nowhere."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    text = lines[0].replace(storage, redact(storage))
    for match in (*_USERINFO.finditer(storage), *_QUERY_PASSWORD.finditer(storage)):
        for secret in {match["password"], unquote(match["password"])} - {""}:
            text = text.replace(secret, "***")
    return text


def mark_driver(trial: Any, driver: str) -> None:
    """Record that ``driver`` asked ``trial``: :func:`own_running_trials` finds it after a crash."""
    trial.set_user_attr(DRIVER_ATTR, driver)


def own_running_trials(study: Any, driver: str) -> list[Any]:
    """The trials ``driver`` asked and left RUNNING (it was killed): to run again and ``study.tell``."""
    running = study.get_trials(deepcopy=False, states=(import_optuna().trial.TrialState.RUNNING,))
    return [trial for trial in running if trial.user_attrs.get(DRIVER_ATTR) == driver]


def finished_count(study: Any) -> int:
    """The trials that count toward ``--trials N``: COMPLETE and PRUNED, as Optuna's MaxTrialsCallback
    with those states. A FAILed trial (a crash, a killed worker) does not use up the budget."""
    state = import_optuna().trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))


def best_trial(study: Any) -> Any | None:
    """The COMPLETE trial of the highest value (validation accuracy), the earliest of ties; None if none."""
    complete = study.get_trials(deepcopy=False, states=(import_optuna().trial.TrialState.COMPLETE,))
    return max((trial for trial in complete if trial.value is not None), key=lambda t: t.value, default=None)


RESULT_ATTR = "result"  # the user attr holding a finished trial's result (run id, node, accuracy)


def tell(study: Any, number: int, result: dict) -> None:
    """Finish trial ``number`` with ``result``: COMPLETE with its validation accuracy, or FAIL."""
    optuna = import_optuna()
    # Study.tell takes no user attrs: they go to the trial first, through the storage, while it runs
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    storage.set_trial_user_attr(trial_id, RESULT_ATTR, result)
    if "failed" in result:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(number, result["validation_accuracy"])


def results(study: Any) -> list[dict]:
    """The results of every finished trial of the study, whichever driver ran it, by trial number."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return [trial.user_attrs[RESULT_ATTR] for trial in trials if RESULT_ATTR in trial.user_attrs]
