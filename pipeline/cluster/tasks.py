"""The driver's side: start or join Ray, run trainings as Ray tasks, and turn their failures into
one clear line.

Ray, not a process pool of our own, runs every training side by side: on this machine (``--jobs N``
starts a local Ray instance of N CPUs) or on a cluster (``--ray ADDRESS``). Each task asks for
``cpus_per_training`` CPUs and ``gpus_per_training`` GPUs (0.25: four trainings share a GPU). A task
whose worker process or node dies is run again by Ray (``retries``) on a node that is alive, and the
training resumes from the checkpoint its node left in the shared storage; an error of the training
itself (a diverged cost, bad data) is not retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from secrets import token_hex
from typing import Any

from pipeline.cluster.config import CLUSTER_EXTRA, ClusterConfig
from pipeline.cluster.storage import SharedStorage, dvc_remote
from pipeline.core.config import PipelineError
from pipeline.core.pause import PAUSE_ENV
from pipeline.nn.backend import xla_flags_with_cpu_devices
from pipeline.tracking import TrackingConfig, tracking_uri

log = logging.getLogger(__name__)

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pipeline/
# What a worker needs of the driver's environment to reach the tracking server and the storage:
# settings, in Ray's runtime_env; logins and keys, with each task (Ray's runtime-env agent writes
# a runtime_env, env_vars included, into its log)
FORWARDED_ENV = (
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    *PAUSE_ENV,  # a fault test's pause point (pipeline/core/pause.py)
)
SECRET_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@dataclass(frozen=True)
class Secrets:
    """The driver's logins and keys, sent with each task and set in its process's environment; never
    printed (no repr) and never in a runtime_env. A node's own values win."""

    values: dict[str, str] = field(repr=False)

    @classmethod
    def of(cls, extra: dict[str, str]) -> Secrets:
        return cls({**{name: os.environ[name] for name in SECRET_ENV if os.environ.get(name)}, **extra})

    def apply(self) -> None:
        for name, value in self.values.items():
            os.environ.setdefault(name, value)


def with_secrets(secrets: Secrets, fn: Callable[..., Any], *args) -> Any:
    """What each Ray task runs: ``fn(*args)`` once the secrets are in its environment."""
    secrets.apply()
    return fn(*args)


LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # tasks pass settings and small outputs, never data sets


def shared_storage(config: ClusterConfig, tracking: TrackingConfig) -> SharedStorage:
    """A cluster's storage (``--storage``, else the DVC repository's default remote; its S3 keys go
    to this process's environment, and from there with each task: :class:`Secrets`); refuses,
    before anything runs, a tracking store that only this machine opens."""
    uri = tracking_uri()
    if tracking.enabled and not uri.startswith(("http://", "https://")):
        raise PipelineError(
            f"MLflow tracking URI {uri!r} is on this machine only, and the cluster's nodes must log to it: "
            "set MLFLOW_TRACKING_URI to the team's tracking server (docs/team.md), or tracking.enabled: false"
        )
    if config.storage:
        storage, env = SharedStorage(config.storage, os.environ.get("AWS_ENDPOINT_URL")), {}
    else:
        storage, env = dvc_remote()
    for name, value in env.items():  # this process sends the data, and its tasks get them from here
        os.environ.setdefault(name, value)
    try:
        storage.exists("files")
    except Exception as e:  # any client error: unreachable, refused, unknown bucket
        raise PipelineError(f"shared storage {storage.url} cannot be read: {type(e).__name__}: {e}") from None
    return storage


def import_ray():
    try:
        import ray
    except ImportError:
        raise PipelineError(f"running trainings side by side needs Ray: {CLUSTER_EXTRA}") from None
    return ray


@contextlib.contextmanager
def ray_session(config: ClusterConfig, env: dict[str, str] | None = None) -> Iterator[None]:
    """Ray started (a local instance) or joined (a cluster) for the duration, shut down after.
    ``env``: settings for every task's environment (no secrets: see :class:`Secrets`)."""
    if config.local:
        # before Ray is imported: a local instance then stays on 127.0.0.1 instead of advertising
        # this machine's external address (ray._private.ray_constants reads it at import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = import_ray()
    runtime_env = {"env_vars": worker_env(config, env or {})}
    if config.local:
        _start_local(ray, config, runtime_env)
    else:
        _join(ray, config, runtime_env)
    try:
        log.info("Ray: %s", _resources(ray))
        yield
    finally:
        ray.shutdown()


def _start_local(ray, config: ClusterConfig, runtime_env: dict) -> None:
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # as above, when Ray was imported before this call
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        # Ray's token auth on, with a token of this process's only (not one saved in ~/.ray)
        os.environ["RAY_AUTH_TOKEN"] = token_hex(32)
    ray.init(
        address="local",  # a new instance, even where $RAY_ADDRESS names a cluster
        num_cpus=config.jobs,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        runtime_env=runtime_env,
    )


def _join(ray, config: ClusterConfig, runtime_env: dict) -> None:
    # the driver's own code on every node, whatever version a node has installed
    runtime_env.update(py_modules=[PACKAGE_DIR], excludes=["__pycache__"])
    try:
        ray.init(address=config.address, runtime_env=runtime_env)
    except ConnectionError as e:
        raise PipelineError(f"cannot join the Ray cluster at --ray {config.address}: {e}") from None


def worker_env(config: ClusterConfig, env: dict[str, str]) -> dict[str, str]:
    """The settings each task's process gets in its runtime_env: where to track, where the storage is,
    and one XLA CPU device per CPU the task asks for (at least one): the engine shares each
    mini-batch among the devices (``pipeline.nn.data_parallel``), and a task of one CPU beside
    others on its node must not spread over every core. $XLA_FLAGS is one variable, so the driver's
    other XLA flags go with the count and replace a node's own."""
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    forwarded["MLFLOW_TRACKING_URI"] = tracking_uri()
    devices = max(1, int(config.cpus_per_training))
    forwarded["XLA_FLAGS"] = xla_flags_with_cpu_devices(os.environ.get("XLA_FLAGS", ""), devices)
    if config.gpus_per_training:  # JAX would otherwise take 75% of the GPU at its start, and the next task fail
        forwarded["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return {**forwarded, **env}


def _resources(ray) -> str:
    total = ray.cluster_resources()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    return f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"


def run_tasks(
    fn: Callable[..., Any],
    calls: Iterable[tuple[str, tuple]],
    config: ClusterConfig,
    credentials: Secrets | None = None,
) -> Iterator[tuple[tuple, Any]]:
    """``fn(*args)`` for each (name, args) of ``calls`` as a Ray task; yields (args, value) as each
    finishes. At most ``config.max_concurrent`` are in flight (default: as many as the cluster's CPUs
    and GPUs fit); ``calls`` is read lazily, one when a place is free, so a search can choose the
    next call from the results so far. Stopping the iteration cancels the tasks not finished."""
    ray = import_ray()
    remote = ray.remote(with_secrets)
    credentials = credentials or Secrets.of({})
    options = dict(
        num_cpus=config.cpus_per_training,
        num_gpus=config.gpus_per_training,
        max_retries=config.retries,
        retry_exceptions=False,
    )
    limit = config.max_concurrent or capacity(ray, config)
    pending, running = iter(calls), {}
    try:
        while True:
            while len(running) < limit and (call := next(pending, None)) is not None:
                name, args = call
                running[remote.options(name=name, **options).remote(credentials, fn, *args)] = call
            if not running:
                return
            (ref,), _ = ray.wait(list(running), num_returns=1)
            name, args = running.pop(ref)
            yield args, result_of(ray, ref, name, config)
    finally:
        for ref in running:
            ray.cancel(ref)


def capacity(ray, config: ClusterConfig) -> int:
    """How many trainings the cluster runs at once, by the resources each asks for (at least 1)."""
    total = ray.cluster_resources()
    fits = total.get("CPU", 0) / config.cpus_per_training
    if config.gpus_per_training:
        fits = min(fits, total.get("GPU", 0) / config.gpus_per_training)
    return max(1, int(fits))


def result_of(ray, ref, name: str, config: ClusterConfig) -> Any:
    """``ray.get(ref)``; a failure becomes one line naming the training."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, PipelineError):
            raise PipelineError(str(cause)) from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as e:
        raise PipelineError(
            f"{name}: its process or node died {config.retries + 1} times ({type(e).__name__}); "
            "its last checkpoint is kept: run the same command again to resume"
        ) from None
