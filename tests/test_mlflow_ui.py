"""The MLflow UI in a real browser: headless Chromium (Debian's `chromium`) against a real `mlflow server`.

Skipped where Chromium is not installed; CI installs it (`.ci/run`: `apt-get install chromium`, about
45 s with `apt-get update` on a Debian 12 machine). To run it alone:

    apt-get update && apt-get install -y chromium
    pytest tests/test_mlflow_ui.py

What it checks: the experiment the pipeline made carries `mlflow.experimentKind =
custom_model_development`, and the link docs/tracking.md gives (the experiment page with
`?workflowType=machine_learning`) opens on the table of training runs, not on the GenAI overview
(traces, tokens). MLflow 3.17's UI chooses its mode from that URL parameter, else from the
GenAI / Model training switch in its sidebar (remembered by the browser, GenAI at first), whatever
the tag says; earlier 3.x UIs follow the tag. The screenshot is left in the test's tmp_path.
"""

import re
import shutil
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import TrackingConfig, tracked_run

from servers import mlflow_server, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
RUN_NAME = "conv2_relu-20ep"


@pytest.fixture
def server_with_one_training_run(tmp_path, monkeypatch, migrated_store):
    uri = f"sqlite:///{migrated_store(tmp_path / 'mlflow.db')}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracked_run(TrackingConfig(experiment="nndl-chapter6"), run_name=RUN_NAME) as run:
        run.log_params({"train.eta": "0.03"})
        for epoch in (1, 2, 3):
            run.log_metrics({"validation_accuracy": 0.95 + epoch / 100}, step=epoch)
    with mlflow_server(uri, tmp_path / "art", cwd=tmp_path) as url:
        yield url, MlflowClient(tracking_uri=uri).get_experiment_by_name("nndl-chapter6")


def chromium(tmp_path, *args):
    """Headless Chromium, isolated (own profile, no network but 127.0.0.1's, no sync or updates)."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,900",
        "--virtual-time-budget=15000",  # ms of page time for the app to load and draw
        *args,
    ]
    browser = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        out, _ = browser.communicate(timeout=180)
    finally:
        stop(browser)
    assert browser.returncode == 0, out
    return out


def test_the_experiment_opens_on_its_training_runs(server_with_one_training_run, tmp_path):
    url, experiment = server_with_one_training_run
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    page = f"{url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"

    dom = chromium(tmp_path, "--dump-dom", page)
    (tmp_path / "experiment.html").write_text(dom)
    text = " ".join(re.sub(r"<[^>]*>", " ", re.sub(r"<(style|script)[^>]*>.*?</\\1>", " ", dom, flags=re.S)).split())
    assert RUN_NAME in text and "1 matching run" in text, text[:3000]
    for genai in ("Detect Issues", "Tool calls", "No data available for the selected time range"):
        assert genai not in text, genai

    screenshot = tmp_path / "experiment.png"
    chromium(tmp_path, f"--screenshot={screenshot}", page)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
