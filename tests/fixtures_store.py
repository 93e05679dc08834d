"""Session-wide speed-ups, registered from tests/conftest.py; what a test sees is the same as without them.

- ``store_template``: one SQLite file with MLflow's migrations applied (a fresh store runs them all, about
  3 s on 2 CPU cores), made once per session; ``migrated_store`` copies it where a test's store goes, and
  the autouse ``tracking_store_migrated`` does so for every test's temporary store (tests/conftest.py).
  The template has no experiment: MLflow adds its Default one when the copy is first opened, with the
  artifact root of the process that opens it, as it does in a new file.
- ``xla_compile_cache`` (autouse): XLA's persistent compilation cache in a folder of the pytest run, for
  all its pytest-xdist workers and (through $JAX_COMPILATION_CACHE_DIR) every process a test starts: a network compiled
  once is loaded, not compiled, by the next training of it (the same program, the same numbers).
  pipeline/nn/compile_cache.py leaves a set $JAX_COMPILATION_CACHE_DIR in charge.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TEMPLATE_ENV = "NNDL_TEST_STORE_TEMPLATE"  # a pytest started by a test reuses the outer session's template


def _make_template(path: Path) -> None:
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        _initialize_tables(engine)  # the migrations only: no Default experiment yet
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Iterator[Path]:
    inherited = os.environ.get(TEMPLATE_ENV)
    if inherited and Path(inherited).is_file():
        yield Path(inherited)
        return
    template = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    _make_template(template)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEMPLATE_ENV, str(template))
        yield template


@pytest.fixture(scope="session")
def migrated_store(store_template) -> Callable[[Path], Path]:
    """``migrated_store(path)``: a new, migrated, empty MLflow SQLite store at ``path``; returns ``path``."""

    def copy(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store_template, path)
        return path

    return copy


@pytest.fixture(autouse=True)
def tracking_store_migrated(tracking_store, migrated_store) -> Path:
    return migrated_store(tracking_store)


def _shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this pytest run's, the same for all its pytest-xdist workers (each has a base folder
    of its own, popen-gw<N>, side by side in the run's)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session", autouse=True)
def xla_compile_cache(tmp_path_factory) -> Iterator[None]:
    try:
        import jax
        from jax.experimental.compilation_cache import compilation_cache
    except ImportError:  # the theano-pymc environment (docs/theano-pymc.md) has no JAX: nothing to cache
        yield
        return

    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(_shared_folder(tmp_path_factory, "xla-cache"))
    settings = {"jax_compilation_cache_dir": directory, "jax_persistent_cache_min_compile_time_secs": 0.0}
    previous = {name: getattr(jax.config, name) for name in settings}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", directory)  # the processes tests start (dvc, nndl, Ray's workers)
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        for name, value in settings.items():  # this process: jax read the variables when it was imported
            jax.config.update(name, value)
        compilation_cache.reset_cache()
        yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
