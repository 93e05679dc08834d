"""Combine the predictions of several trained networks, as the book's five-network ensemble.

The book ("Using an ensemble of networks", chapter 6) trains five of its best network and lets them
vote: each network's most likely digit is one vote, and the ensemble answers the digit with the
most votes. A tie (two digits with two votes each, or five different answers) is broken here by
the networks' confidence: among the tied digits, the one whose probabilities, summed over all the
networks, are largest; a tie that survives that (exactly equal sums) goes to the lowest digit.
Without probabilities a tie goes straight to the lowest digit.

Beyond the book, :func:`average_probabilities` answers the digit with the largest mean probability
over the networks (a "soft" vote); exact ties again go to the lowest digit.
"""

from __future__ import annotations

import numpy as np


def _check_labels(labels: np.ndarray, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise ValueError(f"expected labels of shape (networks, images), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _check_probabilities(probabilities: np.ndarray) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 3 or probabilities.shape[0] == 0:
        raise ValueError(f"expected probabilities of shape (networks, images, classes), got {probabilities.shape}")
    return probabilities


def votes(labels: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """How many networks answered each digit: int64 (images, classes) from labels (networks, images)."""
    labels = _check_labels(labels, n_classes)
    counts = np.zeros((labels.shape[1], n_classes), dtype=np.int64)
    for answers in labels:  # one network at a time: (images,)
        counts[np.arange(labels.shape[1]), answers] += 1
    return counts


def plurality_vote(labels: np.ndarray, probabilities: np.ndarray | None = None, n_classes: int = 10) -> np.ndarray:
    """The ensemble's digit for each image, int64 (images,).

    ``labels``: each network's answer, (networks, images). ``probabilities``: optionally each
    network's class probabilities, (networks, images, classes), used only to break ties (see the
    module docstring); ``labels`` must then be their argmax.
    """
    counts = votes(labels, n_classes)  # (images, classes)
    tied = counts == counts.max(axis=1, keepdims=True)  # (images, classes): the digits with the most votes
    if probabilities is None:
        return np.argmax(tied, axis=1)  # argmax takes the first True: the lowest tied digit
    probabilities = _check_probabilities(probabilities)
    if probabilities.shape[:2] != np.shape(labels) or probabilities.shape[2] != n_classes:
        raise ValueError(f"probabilities {probabilities.shape} do not match labels {np.shape(labels)} "
                         f"and {n_classes} classes")
    confidence = probabilities.sum(axis=0)  # (images, classes)
    # argmax keeps the first maximum, so equal sums still go to the lowest digit
    return np.argmax(np.where(tied, confidence, -np.inf), axis=1)


def average_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """The digit with the largest mean probability over the networks, int64 (images,)."""
    probabilities = _check_probabilities(probabilities)
    return np.argmax(probabilities.mean(axis=0), axis=1)
