"""The trained network as an MLflow pyfunc model, defined from code: nothing is pickled.

MLflow's "models from code" loads this file and the saved weights (``model.npz`` plus
``architecture.json``) instead of unpickling an object, so ``mlflow models serve`` answers
predictions from the same files the pipeline writes:

    mlflow models serve -m runs:/<run id>/model --env-manager local --port 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[[0, 0, ...28 values...], ...28 rows...]]}'

Input: images of 28x28 pixels (or 784 values each) with MNIST's 0-255 grey levels, or 0-1 as in the
book's ``mnist.pkl.gz``. Output: for each image, the predicted ``label`` and the ten ``probabilities``.
Anything else (another shape, NaN or infinite pixels, values below 0 or above 255) is answered with
HTTP 400 and a message that says what is accepted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/: the model carries the whole package
ACCEPTED = "pixels are grey levels 0-255 (MNIST's) or 0-1 (the book's mnist.pkl.gz)"


class BadInput(ValueError):
    """Input the model cannot answer; serving turns it into HTTP 400 with this message."""


def as_images(model_input) -> np.ndarray:
    """Whatever the server hands us (DataFrame, list, array) as float32 images (N, 28, 28) in [0, 1].

    Raises BadInput for another shape and for pixels that are not finite numbers in 0-255."""
    try:
        array = np.asarray(getattr(model_input, "values", model_input), dtype=np.float32)
    except (TypeError, ValueError) as e:  # ragged lists, strings
        raise BadInput(
            f"expected images of 28x28 or 784 numbers each ({ACCEPTED}); cannot read the input: {e}"
        ) from None
    if array.ndim == 1 or array.shape == (28, 28):
        array = array[None]
    if array.shape[1:] not in ((28, 28), (784,)):
        raise BadInput(f"expected images of 28x28 or 784 pixels, got an input of shape {array.shape}")
    array = array.reshape(-1, 28, 28)
    bad = ~np.isfinite(array) | (array < 0) | (array > 255)
    if bad.any():
        image, row, col = (int(i) for i in np.argwhere(bad)[0])
        raise BadInput(
            f"{ACCEPTED}; got {array[image, row, col]} at image {image}, row {row}, column {col} "
            f"({int(bad.sum())} such pixels)"
        )
    if array.size and array.max() > 1.0:  # MNIST's 0-255 grey levels
        array = array / 255.0
    return array


def digit_classifier():
    """A fresh pyfunc PythonModel; its weights are read in ``load_context``."""
    import mlflow.pyfunc

    class DigitClassifier(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from pipeline.nn.model_io import load_model

            self.model = load_model(Path(context.artifacts["model_dir"]))

        # np.ndarray is the one hint MLflow neither validates nor converts (the tensor signature
        # already makes serving's JSON an array); without a hint every load warns about it
        def predict(self, context, model_input: np.ndarray, params=None):
            from mlflow.exceptions import MlflowException

            try:
                images = as_images(model_input)
            except BadInput as e:  # INVALID_PARAMETER_VALUE: the scoring server answers 400, not 500
                raise MlflowException.invalid_parameter_value(str(e)) from None
            probabilities = self.model.predict_proba(images)
            return {"label": probabilities.argmax(axis=1), "probabilities": probabilities}

    return DigitClassifier()


def log_pyfunc(run, model_dir: Path, artifact_path: str = "model") -> None:
    """Save the model in MLflow's pyfunc format (code + weights, no pickle) and log it to ``run``."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.int64), (-1,), "label"),
                TensorSpec(np.dtype(np.float32), (-1, 10), "probabilities"),
            ]
        ),
    )
    # MLflow reloads the saved model to check the input example: no per-file progress bars for that
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(
            path=Path(tmp) / artifact_path,
            python_model=str(PACKAGE_DIR / "tracking" / "pyfunc_model.py"),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=np.zeros((1, 28, 28), dtype=np.float32),  # MLflow checks the model answers it
            pip_requirements=_requirements(),
        )
        run.log_artifacts(Path(tmp) / artifact_path, artifact_path)


def _requirements() -> list[str]:
    from importlib.metadata import version

    from pipeline.nn.backend import graph

    # the environment that trained the model: PyTensor's, or theano-pymc's own (numpy 1.23)
    engine = ("theano-pymc",) if graph.library == "theano-pymc" else ("pytensor", "jax", "jaxlib")
    return [f"{name}=={version(name)}" for name in ("numpy", "scipy", *engine, "mlflow")]
