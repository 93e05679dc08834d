"""`mlflow models serve` answers predictions for 28x28 images from the logged pyfunc model."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.files import load_npz
from pipeline.nn.model_io import load_model
from pipeline.tracking import TrackingConfig, registry, tracked_run
from pipeline.tracking.serving import BadInput, as_images, digit_classifier
from pipeline.tracking.tracked import train_tracked

from servers import free_port, stop, wait_until_answering
from synthetic import TINY_NET, stage_training_in, write_prepared


def test_as_images_accepts_the_usual_shapes_and_scales():
    image = np.arange(784, dtype=np.float64).reshape(28, 28) % 256
    assert as_images(image).shape == (1, 28, 28)
    assert as_images(image.reshape(1, 784)).shape == (1, 28, 28)
    np.testing.assert_allclose(as_images([image])[0], image / 255, rtol=1e-6)
    np.testing.assert_allclose(as_images(image[None] / 255)[0], image / 255, rtol=1e-6)
    with pytest.raises(ValueError, match=r"28x28 or 784 pixels, got an input of shape \(2, 30\)"):
        as_images(np.zeros((2, 30)))


def bad_images():
    """(name, 28x28 nested list with one bad pixel, the pixel's value as the message shows it)."""
    cases = []
    for name, value, shown in [("nan", float("nan"), "nan"), ("negative", -1.0, "-1.0"), ("above 255", 256.0, "256.0")]:
        image = np.full((28, 28), 100.0)
        image[3, 5] = value
        cases.append((name, image, shown))
    infinite = np.zeros((28, 28))
    infinite[27, 0] = np.inf
    cases.append(("infinite", infinite, "inf"))
    return cases


@pytest.mark.parametrize("name, image, shown", bad_images())
def test_as_images_refuses_pixels_outside_0_to_255(name, image, shown):
    row, col = np.argwhere(~np.isfinite(image) | (image < 0) | (image > 255))[0]
    with pytest.raises(BadInput) as error:
        as_images(np.stack([np.zeros((28, 28)), image]))
    assert str(error.value) == (
        "pixels are grey levels 0-255 (MNIST's) or 0-1 (the book's mnist.pkl.gz); "
        f"got {shown} at image 1, row {row}, column {col} (1 such pixels)"
    )


def test_the_pyfunc_model_turns_bad_input_into_invalid_parameter_value():
    from mlflow.exceptions import MlflowException

    classifier = digit_classifier()  # no weights needed: the input is refused first
    for _, image, _ in bad_images():
        with pytest.raises(MlflowException, match="grey levels 0-255") as error:
            classifier.predict(None, image[None])
        assert error.value.error_code == "INVALID_PARAMETER_VALUE" and error.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match=r"28x28 or 784 pixels, got an input of shape \(1, 5\)"):
        classifier.predict(None, np.zeros((1, 5)))


def test_mlflow_models_serve_answers_predictions(tmp_path, monkeypatch, migrated_store):
    (tmp_path / ".dvc").mkdir()
    migrated_store(tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    prepared = write_prepared(tmp_path / "prepared")
    params = {"train": {"architecture": TINY_NET, "epochs": 1, "eta": 0.5, "lmbda": 0.0, "steps_per_call": 20}}
    train_tracked(stage_training_in(params, prepared, tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nndl-chapter6").experiment_id])
    # the model carries the whole package, so it loads where the pipeline is not installed
    carried = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model/code/pipeline")}
    assert {"core", "data", "nn", "tracking"} <= carried, carried
    # registered as the evaluate stage does, and served by its alias, as the registry's docs say
    with tracked_run(TrackingConfig(), resume_run_id=run.info.run_id) as resumed:
        registered = registry.register(resumed, "served-model", test_accuracy=None)
    assert registered.champion == registered.version == "1"

    port = free_port()
    env = dict(
        os.environ, MLFLOW_TRACKING_URI=uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/served-model@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/ping", server, "mlflow models serve")
        test = load_npz(prepared / "test.npz")
        body = json.dumps({"inputs": test["images"][:8].tolist()}).encode()  # 0-255 grey levels, 28x28
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        refusals = {}
        for name, image, _ in bad_images():  # one server for all the bad inputs
            body = json.dumps({"inputs": [image.tolist()]}).encode()  # NaN and Infinity as JSON allows them
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(request, timeout=60)
            refusals[name] = (error.value.code, json.loads(error.value.read()))
            error.value.close()
    finally:
        stop(server)
    expected = load_model(tmp_path / "model").predict(test["images"][:8])
    assert answer["label"] == expected.tolist()
    probabilities = np.array(answer["probabilities"])
    assert probabilities.shape == (8, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    for name, (code, reply) in refusals.items():
        assert code == 400, (name, code, reply)
        assert reply["error_code"] == "INVALID_PARAMETER_VALUE", (name, reply)
        assert "pixels are grey levels 0-255 (MNIST's) or 0-1 (the book's mnist.pkl.gz)" in reply["message"], reply
