"""Where and how trainings run side by side: :class:`ClusterConfig`, from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.core.config import ConfigError

CLUSTER_EXTRA = 'pip install -e ".[cluster]"'


@dataclass(frozen=True)
class ClusterConfig:
    """Ray's part of a table or sweep call; validated where it is built.

    ``address`` None starts a local Ray instance with ``jobs`` CPUs (trainings at once on this machine,
    where every process reads the same files). Otherwise ``address`` is a running cluster ("auto":
    $RAY_ADDRESS) and ``storage`` the shared storage its nodes reach (:mod:`pipeline.cluster.storage`)."""

    address: str | None = None
    jobs: int = 1
    cpus_per_training: float = 1.0
    gpus_per_training: float = 0.0
    max_concurrent: int | None = None  # trainings in flight at once; None: as many as the cluster fits
    storage: str | None = None  # s3://bucket/prefix or a folder every node mounts; None: the DVC remote
    retries: int = 3  # tries after a node or worker process dies (a training's own error is not retried)

    def __post_init__(self):
        if self.jobs < 1:
            raise ConfigError(f"Got --jobs {self.jobs}: must be at least 1 (trainings at once)")
        if self.address is not None and self.jobs != 1:
            raise ConfigError(f"Got --jobs {self.jobs} with --ray {self.address}: the cluster's size sets how many run")
        if self.address == "":
            raise ConfigError("Got --ray '': give a Ray address (host:port) or auto ($RAY_ADDRESS)")
        if not self.cpus_per_training > 0:
            raise ConfigError(f"Got --cpus-per-training {self.cpus_per_training}: must be above 0")
        gpus = self.gpus_per_training
        if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
            raise ConfigError(
                f"Got --gpus-per-training {gpus}: must be 0, a fraction of one GPU such as 0.25, or a whole number"
            )
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"Got --max-concurrent {self.max_concurrent}: must be at least 1")
        if self.retries < 0:
            raise ConfigError(f"Got retries={self.retries}: must be 0 or more")

    @property
    def local(self) -> bool:
        """True when every training runs on this machine, reading the driver's own files."""
        return self.address is None


def add_arguments(parser: argparse.ArgumentParser, *, max_concurrent: bool = False) -> None:
    """The command-line options of :class:`ClusterConfig`, shared by the table and the sweep."""
    group = parser.add_argument_group("running side by side (Ray; pip install -e '.[cluster]')")
    group.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        default=1,
        help="trainings at once on this machine, in a local Ray instance (default 1: one at a time, "
        "in this process; keep 1 on a small CPU, where one training uses every core)",
    )
    group.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run every training as a task on the Ray cluster at ADDRESS (host:port, or auto: $RAY_ADDRESS)",
    )
    group.add_argument(
        "--cpus-per-training", type=float, default=1.0, metavar="N", help="CPUs each training asks Ray for (default 1)"
    )
    group.add_argument(
        "--gpus-per-training",
        type=float,
        metavar="N",
        default=0.0,
        help="GPUs each training asks for; a fraction such as 0.25 lets four share one GPU (default 0)",
    )
    group.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="with --ray: shared storage for data and checkpoints, s3://bucket/prefix or a folder every "
        "node mounts (default: the DVC repository's default remote)",
    )
    if max_concurrent:
        group.add_argument(
            "--max-concurrent", type=int, default=None, metavar="N", help="trainings in flight at once (default: all)"
        )


def from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        address=args.ray,
        jobs=args.jobs,
        cpus_per_training=args.cpus_per_training,
        gpus_per_training=args.gpus_per_training,
        max_concurrent=getattr(args, "max_concurrent", None),
        storage=args.storage,
    )
