"""Run by MLflow, by path, when it loads the pyfunc model ("models from code", no pickle)."""

import mlflow.models

from pipeline.tracking.serving import digit_classifier

mlflow.models.set_model(digit_classifier())
