"""Sweeps of params.yaml values: the search space (DVC's ``-S`` syntax), grids and Optuna studies."""
