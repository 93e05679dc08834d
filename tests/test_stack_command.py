"""deploy/stack.py without servers: its help, its answers to bad input (one line, no traceback, nothing
started), and `dvc-remote` against a real DVC checkout (what a team with existing servers runs).
tests/stack runs the verbs that start servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "deploy" / "stack.py"
VERBS = ("install", "up", "down", "status", "destroy", "dvc-remote", "restart")


def stack(*args, env=None, cwd=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("STACK_", "AWS_", "DVC_"))} | (env or {})
    return subprocess.run(
        [sys.executable, str(STACK), *args], capture_output=True, text=True, timeout=120, env=full, cwd=cwd
    )


def test_help_names_every_verb():
    p = stack("--help")
    assert p.returncode == 0, p.stderr
    for verb in VERBS:
        assert f"    {verb}" in p.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb):
    p = stack(verb, "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: deploy/stack.py {verb} [-h]")


def test_no_verb_prints_the_help_and_fails():
    p = stack()
    assert p.returncode == 2 and "Environment (all optional)" in p.stdout


def test_restart_of_an_unknown_component_is_one_line(tmp_path):
    p = stack("restart", "ceph-osd", env={"STACK_DIR": str(tmp_path / "state")})
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        "stack: argument component: invalid choice: 'ceph-osd' (choose from 'mlflow', 'postgres')"
    ]
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("STACK_HOST", "localhost", "stack: STACK_HOST: an IPv4 address, got 'localhost'"),
        ("STACK_PG_PORT", "65536", "stack: STACK_PG_PORT: 1-65535, got '65536' (environment)"),
        ("STACK_MLFLOW_PORT", "0", "stack: STACK_MLFLOW_PORT: 1-65535, got '0' (environment)"),
        ("STACK_MLFLOW_WORKERS", "two", "stack: STACK_MLFLOW_WORKERS: a positive integer, got 'two' (environment)"),
    ],
)
def test_a_bad_setting_is_one_line_and_starts_nothing(tmp_path, name, value, expected):
    state = tmp_path / "state"
    p = stack("up", env={"STACK_DIR": str(state), "STACK_ENV_FILE": str(tmp_path / "env"), name: value})
    assert p.returncode == 1
    assert p.stderr.splitlines() == [expected]
    assert not state.exists() and not (tmp_path / "env").exists()


def test_the_highest_port_is_accepted_and_recorded(tmp_path):
    state = tmp_path / "state"
    p = stack("status", env={"STACK_DIR": str(state), "STACK_PG_PORT": "65535", "STACK_MLFLOW_PORT": "1"})
    assert p.returncode == 1  # nothing runs
    assert p.stdout.splitlines()[0].split() == ["postgres", "down", "port", "65535"]
    assert p.stdout.splitlines()[-1].split() == ["mlflow", "down", "port", "1"]
    assert "PG_PORT=65535\n" in (state / "ports").read_text()
    # recorded at the first use: a later command's setting does not move it
    assert stack("status", env={"STACK_DIR": str(state), "STACK_PG_PORT": "5"}).stdout.split()[3] == "65535"


def git_dvc_checkout(path: Path) -> Path:
    path.mkdir()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=path, check=True, timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return path


ENV_FILE = """\
# a team's env file for existing servers, written by hand
export DVC_REMOTE_URL='s3://team-bucket/dvc'
export AWS_ACCESS_KEY_ID='AKIA-test-key-id-0001'
AWS_SECRET_ACCESS_KEY="secret with spaces/and+signs"
"""


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:7480"])
def test_dvc_remote_keeps_the_keys_in_config_local(tmp_path, endpoint):
    checkout = git_dvc_checkout(tmp_path / "repo")
    env_file = tmp_path / "team.env"
    env_file.write_text(ENV_FILE + (f"export AWS_ENDPOINT_URL='{endpoint}'\n" if endpoint else ""))
    p = stack("dvc-remote", str(checkout), env={"STACK_ENV_FILE": str(env_file), "DVC_NO_ANALYTICS": "1"})
    assert p.returncode == 0, p.stderr
    config = (checkout / ".dvc" / "config").read_text()
    local = (checkout / ".dvc" / "config.local").read_text()
    assert "remote = team" in config and "url = s3://team-bucket/dvc" in config
    assert ("endpointurl = http://127.0.0.1:7480" in config) == bool(endpoint)
    assert "AKIA-test-key-id-0001" not in config and "secret with spaces" not in config
    assert "access_key_id = AKIA-test-key-id-0001" in local
    assert "secret_access_key = secret with spaces/and+signs" in local
    assert "secret with spaces" not in p.stdout + p.stderr


def test_dvc_remote_without_env_file_or_outside_dvc_is_one_line(tmp_path):
    missing = tmp_path / "nothing.env"
    p = stack("dvc-remote", str(tmp_path), env={"STACK_ENV_FILE": str(missing)})
    assert (p.returncode, p.stderr.splitlines()) == (
        1,
        [f"stack: dvc-remote: no env file {missing} (run up, or write one)"],
    )
    env_file = tmp_path / "team.env"
    env_file.write_text(ENV_FILE)
    p = stack("dvc-remote", str(tmp_path), env={"STACK_ENV_FILE": str(env_file)})
    assert (p.returncode, p.stderr.splitlines()) == (1, [f"stack: dvc-remote: {tmp_path} is not a DVC repository"])
    env_file.write_text("export DVC_REMOTE_URL='s3://x/dvc\n")  # the closing quote missing
    p = stack("dvc-remote", str(tmp_path), env={"STACK_ENV_FILE": str(env_file)})
    assert (p.returncode, p.stderr.splitlines()) == (1, [f"stack: {env_file}:1: No closing quotation"])
