"""The lines of ``results.json``: a training row's figures from its seeds, an ensemble's, and a row of
another row's networks answering with test-time shifts."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.files import write_json
from pipeline.data.splits import load_split
from pipeline.evaluation import ensemble
from pipeline.evaluation.shifts import shifted_probabilities
from pipeline.nn.model_io import load_model
from pipeline.table.datasets import Data
from pipeline.table.rows import BY_KEY, Row
from pipeline.tracking.registry import earliest_best, tie_note


def line_head(row: Row, kind: str) -> dict:
    """What every line of results.json starts with: the row, as ROWS describes it."""
    return {
        "row": row.key,
        "description": row.description,
        "book": row.book,
        "beyond_book": row.beyond_book,
        "kind": kind,
    }


def training_line(row: Row, results: list[dict], n_wanted: int) -> dict:
    """A training row's figures from its seeds' results."""
    line = {
        **line_head(row, "training"),
        "preset": row.preset,
        "settings": row.settings,
        "seeds_wanted": n_wanted,
        "seeds": [
            {k: r[k] for k in ("seed", "best_validation_accuracy", "best_epoch", "test_accuracy", "seconds")}
            for r in results
        ],
    }
    if not results:
        return {**line, "ours": None}
    return {
        **line,
        **pick(results),
        "seconds": round(sum(r["seconds"] for r in results), 1),
        "engine": results[0]["engine"],
        "device": results[0]["device"],
        "code": sorted({r.get("code", "unrecorded") for r in results}),
    }


def pick(seeds: list[dict]) -> dict:
    """The book's figure from seeds' results (best_validation_accuracy, test_accuracy, seed): the test
    accuracy of the seed with the best validation accuracy (``tie``: which seeds had the same), and
    the mean and spread over all seeds."""
    best, tied = earliest_best(seeds, lambda s: s["best_validation_accuracy"])  # ties: the lowest seed
    tests = np.array([s["test_accuracy"] for s in seeds])
    tie = tie_note(f"seed {best['seed']}", [f"seed {s['seed']}" for s in tied], best["best_validation_accuracy"])
    return {
        "ours": best["test_accuracy"],
        "best_seed": best["seed"],
        **({"tie": tie} if tie else {}),
        "mean": float(tests.mean()),
        "std": float(tests.std(ddof=1)) if len(tests) > 1 else None,
        "n": len(seeds),
    }


def ensemble_line(row: Row, members: list[dict], probabilities: list[np.ndarray], labels: np.ndarray) -> dict:
    line = {
        **line_head(row, f"ensemble ({row.method})"),
        "members": [m["seed"] for m in members],
        "seeds_wanted": row.size,
    }
    if len(members) < row.size:
        return {**line, "ours": None}
    stacked = np.stack(probabilities)  # (networks, images, classes)
    if row.method == "vote":
        predicted = ensemble.plurality_vote(stacked.argmax(axis=2), stacked)
    else:
        predicted = ensemble.average_probabilities(stacked)
    wrong = np.flatnonzero(predicted != labels)
    return {
        **line,
        "ours": float(np.mean(predicted == labels)),
        "n": len(members),
        "seconds": round(sum(m["seconds"] for m in members), 1),
        "engine": members[0]["engine"],
        "device": members[0]["device"],
        # which test images, and the ensemble's answers: the book shows the 33 its ensemble gets wrong
        "errors": wrong.tolist(),
        "errors_predicted": predicted[wrong].tolist(),
    }


def shifted_line(
    row: Row,
    results: list[dict],
    n_wanted: int,
    *,
    out_dir: Path,
    data: Data,
    test: dict,
    engine: str,
    device: str,
    progress: bool,
) -> dict:
    """A row of another row's networks answering with test-time shifts: each seed's validation and
    test accuracy with the shifts, the seed with the best validation accuracy picked as for a training."""
    source = BY_KEY[row.shifted_of]
    line = {
        **line_head(row, f"test-time shifts ({row.test_time_shifts})"),
        "shifted_of": source.key,
        "seeds_wanted": n_wanted,
    }
    if not results:
        return {**line, "ours": None, "seeds": []}
    # read only when a network has to be scored: the scores are usually cached
    validation = functools.cache(lambda: load_split(data.prepared / "validation.npz"))
    seeds = []
    for result in tqdm(results, desc=f"row {row.key}: scoring", disable=not progress):
        seed_dir = out_dir / source.key / f"seed{result['seed']}"
        scores = _shifted_scores(
            seed_dir, result, row.test_time_shifts, validation=validation, test=test, engine=engine, device=device
        )
        seeds.append(
            {
                "seed": result["seed"],
                "best_validation_accuracy": scores["validation_accuracy"],
                "test_accuracy": scores["test_accuracy"],
                "seconds": result["seconds"],
            }
        )
    return {
        **line,
        "seeds": seeds,
        **pick(seeds),
        "seconds": round(sum(r["seconds"] for r in results), 1),
        "engine": results[0]["engine"],
        "device": results[0]["device"],
    }


def _shifted_scores(
    seed_dir: Path, result: dict, shifts: int, *, validation: Callable[[], tuple], test: dict, engine: str, device: str
) -> dict:
    """The validation and test accuracy of the network in ``seed_dir`` with ``shifts`` test-time
    shifts; kept in seed_dir/test-time-shifts-<k>.json for as long as the network's result matches.
    ``validation`` returns the (images, labels) of the validation set."""
    path = seed_dir / f"test-time-shifts-{shifts}.json"
    if path.is_file():
        scores = json.loads(path.read_text())
        if scores.get("key") == result["key"]:
            return scores
    model = load_model(seed_dir / "model", engine=engine, device=device)
    accuracies = [
        float(np.mean(shifted_probabilities(model, images, shifts).argmax(axis=1) == labels))
        for images, labels in (validation(), (test["images"], test["labels"]))
    ]
    scores = {
        "key": result["key"],
        "test_time_shifts": shifts,
        "validation_accuracy": accuracies[0],
        "test_accuracy": accuracies[1],
    }
    write_json(path, scores)
    return scores
