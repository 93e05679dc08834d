"""Trainings side by side on Ray: one machine (``--jobs N``) or a cluster (``--ray ADDRESS``), with the
data and checkpoints in shared storage so that any node can run, and resume, any training."""
