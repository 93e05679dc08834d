"""What a sweep found: sweep.json (every trial, the best by validation accuracy) and sweep.png."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.evaluation.plots import plt, save_figure
from pipeline.tracking.registry import earliest_best, tie_note

if TYPE_CHECKING:
    from pipeline.sweep.config import SweepConfig


def sweep_summary(sweep: SweepConfig, results: list[dict]) -> dict:
    """sweep.json's content: the trials in order, and the best one, chosen by validation accuracy
    (ties: the earlier trial, and ``tie`` says which trials it tied with), never by test accuracy."""
    trials = sorted(results, key=lambda r: (r.get("number") is None, r.get("number") or 0, r["key"]))
    scored = [r for r in trials if "validation_accuracy" in r]
    best, tied = earliest_best(scored, lambda r: r["validation_accuracy"])
    return {
        "name": sweep.name,
        "search": sweep.search,
        "space": [axis.typed for axis in sweep.space.axes],
        "trials": trials,
        "finished": len(scored),
        "failed": len(trials) - len(scored),
        "best": best,
        "tie": tie_note(trial_name(best), [trial_name(r) for r in tied], best["validation_accuracy"]) if best else "",
    }


def trial_name(result: dict) -> str:
    """ "trial 3" (its Optuna number), or for a grid's point "trial <key>"."""
    return f"trial {result['number'] if result.get('number') is not None else result['key']}"


def write_plot(summary: dict, path: Path) -> None:
    """Validation accuracy of each trial, in order, then against each swept value."""
    scored = [r for r in summary["trials"] if "validation_accuracy" in r]
    keys = sorted({key for r in scored for key in r["point"]})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.2 * (1 + len(keys)), 3.6), squeeze=False)
    order, by_value = axes[0][0], axes[0][1:]
    accuracy = [100 * r["validation_accuracy"] for r in scored]
    order.plot(range(1, len(scored) + 1), accuracy, "o-", color="tab:blue")
    order.set(xlabel="trial", ylabel="best validation accuracy (%)", title=f"{summary['name']} ({summary['search']})")
    for ax, key in zip(by_value, keys):
        values = [r["point"].get(key) for r in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        xs = values if numeric else [labels.index(str(v)) for v in values]
        ax.scatter(xs, accuracy, color="tab:orange")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        elif values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="best validation accuracy (%)")
    if summary["best"] is not None:
        order.axhline(100 * summary["best"]["validation_accuracy"], color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    save_figure(fig, path)
