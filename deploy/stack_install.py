"""`install`: the Debian packages of Ceph and PostgreSQL (as root), and the `stack` extra of pyproject.toml
into the virtual environment running this command."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import time
import tomllib

from stack_core import REPO, BadInput, say

APT_PACKAGES = ("radosgw", "ceph-mon", "ceph-osd", "postgresql")


def stack_requirements() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]["stack"]


def step(cmd: list[str], env: dict | None = None) -> None:
    """Run one install command; its failure is one line naming it (its own output says why)."""
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise BadInput(f"install: `{' '.join(cmd[:4])} ...` failed (exit status {rc})")


def install() -> int:
    """Install the apt packages and the stack extra.

    The apt packages radosgw ceph-mon ceph-osd (and postgresql) if missing, as root; the `stack` extra of
    pyproject.toml into the virtual environment of the python running this command."""
    t0 = time.monotonic()
    missing = [p for p in APT_PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        if os.geteuid() != 0:
            raise BadInput(f"install: apt packages missing ({' '.join(missing)}); run as root")
        step(["apt-get", "update", "-qq"])
        step(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    say(f"apt part: {time.monotonic() - t0:.0f} s")
    if sys.prefix == sys.base_prefix:
        raise BadInput(f"install: {sys.executable} is no virtual environment's python; run it with the project's")
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    requirements = stack_requirements()
    # dvc[s3] first: boto3 next to it, bound only loosely, makes pip backtrack for minutes
    step(pip + [r for r in requirements if r.startswith("dvc")])
    # then boto3 bound to the botocore that aiobotocore (dvc[s3]) accepts, i.e. the one it installed
    importlib.invalidate_caches()
    botocore = importlib.metadata.version("botocore")
    minor = botocore.rsplit(".", 1)[0]
    rest = [r for r in requirements if not r.startswith("dvc")] + [f"boto3>={minor}.0,<={botocore}"]
    step(pip + rest)
    say(f"install done in {time.monotonic() - t0:.0f} s")
    return 0
