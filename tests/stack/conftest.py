"""The team stack that tests/stack/run.sh starts, for the tests in this folder: skipped unless
STACK_ENV_FILE names the env file `deploy/stack.py up` wrote.

Fixtures (module-scoped):
- ``env``: the env file as a dict; its MLflow and S3 URLs are asserted to be on 127.0.0.1;
- ``secrets``: every credential the stack holds (the env file's, the Optuna role's password, the
  files of its secrets folder), for tests that look for them where they must not be.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

from servers import SECRET_VARS, creds, read_env_file

HERE = Path(__file__).resolve().parent
ENV_FILE = os.environ.get("STACK_ENV_FILE", "")
REASON = "no running stack: set STACK_ENV_FILE (tests/stack/run.sh does)"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.stack)
            if not (ENV_FILE and Path(ENV_FILE).is_file()):
                item.add_marker(pytest.mark.skip(reason=REASON))


@pytest.fixture(scope="module")
def env_file() -> str:
    return ENV_FILE


@pytest.fixture(scope="module")
def env(env_file):
    e = read_env_file(env_file)
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        assert urlparse(e[key]).hostname == "127.0.0.1", key
    return e


@pytest.fixture(scope="module")
def secrets(env):
    values = [env[k] for k in SECRET_VARS]
    values.append(urlparse(env["OPTUNA_STORAGE"]).password)  # the optuna role's password
    # everything generated in the state directory (PostgreSQL passwords, Flask secret key)
    secret_dir = Path(env["STACK_DIR"]) / "secrets"
    values += [f.read_text().strip() for f in secret_dir.iterdir() if f.name != "pgpass"]
    values = [v for v in values if v]
    assert all(len(v) >= 16 for v in values)
    return sorted(set(values))


@pytest.fixture(scope="module")
def pipeline_client(env):
    """An MlflowClient of the stack's server, logged in as the pipeline user (MLflow reads the login
    from the environment: set for the module, restored after it)."""
    from mlflow.tracking import MlflowClient

    user, password = creds(env, "pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", user)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def s3(env):
    """A boto3 client of the stack's RGW, as its S3 user."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
