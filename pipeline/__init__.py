"""Nielsen's network3.py as a reproducible DVC + MLflow pipeline on PyTensor."""

__version__ = "0.1.0"
