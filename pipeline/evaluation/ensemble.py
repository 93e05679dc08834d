"""Combine the predictions of several trained networks, as the book's five-network ensemble.

The book ("Using an ensemble of networks", chapter 6) trains five of its best network and lets them
vote: each network's most likely digit is one vote, and the ensemble answers the digit with the
most votes. A tie (two digits with two votes each, or five different answers) is broken here by
the networks' confidence: among the tied digits, the one whose probabilities, summed over all the
networks, are largest; a tie that survives that (exactly equal sums) goes to the lowest digit.
Without probabilities a tie goes straight to the lowest digit.

Beyond the book, :func:`average_probabilities` answers the digit with the largest mean probability
over the networks (a "soft" vote); exact ties again go to the lowest digit.

As a command it combines any saved models (the train stage's ``data/model``, a table's
``data/table/<row>/seed<k>/model``, any copy of a model directory) and prints each one's accuracy,
the vote's and the average's:

    python -m pipeline ensemble data/table/8/seed*/model
    python -m pipeline ensemble data/table/8/seed*/model --gallery errors.png   # the digits the vote gets wrong
    python -m pipeline ensemble data/table/8/seed*/model data/table/best/seed*/model --out ensemble.json
    python -m pipeline ensemble m1 m2 m3 --data data/prepared/validation.npz
    python -m pipeline ensemble data/table/bn/seed*/model --test-time-shifts 1  # each network: 5 views of an image

The models run on ``train.engine`` and ``train.device`` of ``--params``. It is not a dvc stage
and logs nothing to MLflow (the models' own runs hold their training); ``--out`` writes the
figures as JSON, with the indices of the images the vote gets wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import PipelineError
from pipeline.core.files import write_json
from pipeline.data.expand import require_shift
from pipeline.data.splits import load_split
from pipeline.evaluation.plots import plot_gallery
from pipeline.evaluation.shifts import shifted_probabilities
from pipeline.nn.model_io import load_model


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
        raise ValueError(
            f"probabilities {probabilities.shape} do not match labels {np.shape(labels)} and {n_classes} classes"
        )
    confidence = probabilities.sum(axis=0)  # (images, classes)
    # argmax keeps the first maximum, so equal sums still go to the lowest digit
    return np.argmax(np.where(tied, confidence, -np.inf), axis=1)


def average_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """The digit with the largest mean probability over the networks, int64 (images,)."""
    probabilities = _check_probabilities(probabilities)
    return np.argmax(probabilities.mean(axis=0), axis=1)


# -- the command ---------------------------------------------------------------------------------
GALLERY_SIZE = 100  # images drawn at most


def ensemble_models(
    *,
    model_dirs: list[Path],
    data_path: Path,
    out_path: Path | None = None,
    gallery_path: Path | None = None,
    engine: str | None = None,
    device: str = "cpu",
    test_time_shifts: int = 0,
    progress: bool = True,
) -> dict:
    """Score each model in ``model_dirs`` and their plurality vote and averaged probabilities on
    ``data_path``; returns the figures (also written to ``out_path`` as JSON when given), and draws
    the images the vote gets wrong into ``gallery_path`` when given. With ``test_time_shifts`` k,
    each network answers from the image and its copies shifted by 1..k pixels
    (:func:`pipeline.evaluation.evaluate.shifted_probabilities`)."""
    model_dirs = [Path(d) for d in model_dirs]
    if len(model_dirs) < 2:
        raise PipelineError(
            f"an ensemble needs at least two models, got {len(model_dirs)}: {', '.join(map(str, model_dirs)) or 'none'}"
        )
    seen = set()
    for model_dir in model_dirs:
        if model_dir.resolve() in seen:  # it would cast two votes
            raise PipelineError(f"model {str(model_dir)!r} is given twice; each model votes once")
        seen.add(model_dir.resolve())
    require_shift("--test-time-shifts", test_time_shifts)
    images, labels = load_split(Path(data_path))  # checked before any model is scored
    # every model loads (or fails with a clear error) before the long scoring starts
    models = [load_model(d, engine=engine, device=device) for d in model_dirs]

    bar = tqdm(models, desc="scoring models", disable=not progress)
    probabilities = np.stack(
        [shifted_probabilities(model, images, test_time_shifts) for model in bar]
    )  # (networks, images, 10)
    answers = probabilities.argmax(axis=2)  # (networks, images)
    vote = plurality_vote(answers, probabilities)  # (images,)
    average = average_probabilities(probabilities)  # (images,)
    result = {
        "data": str(data_path),
        "images": int(len(labels)),
        "test_time_shifts": test_time_shifts,
        "members": [{"model": str(d), "accuracy": float(np.mean(a == labels))} for d, a in zip(model_dirs, answers)],
        "plurality_vote_accuracy": float(np.mean(vote == labels)),
        "averaged_probabilities_accuracy": float(np.mean(average == labels)),
        "plurality_vote_errors": np.flatnonzero(vote != labels).tolist(),  # indices into the data set
    }
    if out_path is not None:
        write_json(out_path, result)
    if gallery_path is not None:
        wrong = np.array(result["plurality_vote_errors"], dtype=np.int64)
        shown = wrong[:GALLERY_SIZE]
        plot_gallery(
            images[shown].reshape(len(shown), 28, 28),
            labels[shown],
            vote[shown],
            gallery_path,
            f"{len(shown)} of the {len(wrong)} images that the vote of {len(models)} networks gets wrong "
            "(true \u2192 answer)",
        )
    return result


def report(result: dict) -> str:
    k = result.get("test_time_shifts", 0)
    views = f", each answering from {1 + 4 * k} views of an image (test-time shifts {k})" if k else ""
    lines = [f"{len(result['members'])} networks on {result['data']} ({result['images']:,} images){views}:"]
    lines += [f"  {100 * m['accuracy']:6.2f}%  {m['model']}" for m in result["members"]]
    lines += [
        f"  {100 * result['plurality_vote_accuracy']:6.2f}%  plurality vote",
        f"  {100 * result['averaged_probabilities_accuracy']:6.2f}%  averaged probabilities",
    ]
    return "\n".join(lines)
