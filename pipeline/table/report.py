"""The chapter 6 table's report: ``report.md`` (the book beside ours), ``report.png`` (both
against the row), ``curves.png`` (each row's validation error per epoch) and ``errors-<row>.png``
(the test digits each ensemble gets wrong)."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter, NullFormatter

from pipeline.core.files import write_bytes
from pipeline.evaluation.plots import plot_gallery, plt, save_figure
from pipeline.nn.training import EPOCHS_FILE

log = logging.getLogger(__name__)

QUICK_BANNER = ("**QUICK MODE: NOT a reproduction.** Every network trained {epochs} epoch(s) on the first "
                "{train_images:,} training images ({validation_images:,} validation, {test_images:,} test): "
                "a smoke test of the pipeline, not the book's numbers.")


ZERO_ERROR = 0.01  # percent: where curves.png draws a validation error of 0 (1 image in 10,000)


# -- report --------------------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def report_markdown(results: dict, pictures: dict[str, str] | None = None) -> str:
    """The report; ``pictures`` (file name -> caption) are shown below the table."""
    lines = ["# Chapter 6 results table: the book beside this pipeline", ""]
    if results["quick"]:
        lines += [QUICK_BANNER.format(**results["quick_settings"]), ""]
    lines += [
        "Test accuracy at the epoch of best validation accuracy. *Ours* is the seed with the best validation "
        "accuracy (as the book: best of its runs); *mean ± std* is over all seeds "
        "(std with ddof=1, in percentage points). "
        "Ensembles combine seeds 1-5 of their row (a committee of ten: seeds 1-10). Time is the sum over the row's seeds (for an ensemble: its "
        "members' training). Rows marked *beyond the book* have no book figure.",
        "",
        "| row | network | book | ours (best of seeds by validation) | mean ± std over seeds | Δ vs book (pp) "
        "| time | engine | device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in results["lines"]:
        description = line["description"] + (" *(beyond the book)*" if line["beyond_book"] else "")
        if line["ours"] is None:
            have = len(line.get("seeds", line.get("members", [])))
            status = f"not run ({have} of {line['seeds_wanted']} networks)" if have else "not run"
            empty = " — |" * 5
            lines.append(f"| {line['row']} | {description} | {pct(line['book'])} | {status} |{empty}")
            continue
        if "best_seed" in line:  # a training, or a training's networks with test-time shifts
            ours = f"{pct(line['ours'])} (seed {line['best_seed']})"
            spread = pct(line["mean"]) + (f" ± {100 * line['std']:.2f}" if line["std"] is not None else "")
            spread += f" (n={line['n']}" + (f" of {line['seeds_wanted']})" if line["n"] < line["seeds_wanted"] else ")")
        else:
            ours = pct(line["ours"])
            spread = f"— ({line['kind']} of seeds {', '.join(map(str, line['members']))})"
        diff = "—" if line["book"] is None else f"{100 * (line['ours'] - line['book']):+.2f}"
        lines.append(f"| {line['row']} | {description} | {pct(line['book'])} | {ours} | {spread} | {diff} | "
                     f"{duration(line['seconds'])} | {line['engine']} | {line['device']} |")
    trainings = [line for line in results["lines"] if line["kind"] == "training" and line["ours"] is not None]
    total = sum(line["seconds"] for line in trainings)
    lines += ["", f"Total training time of the rows shown: {duration(total)} "
                  f"({sum(line['n'] for line in trainings)} networks)." + _book_time(results["lines"]), "",
              _code_note(results, trainings), ""]
    for name, caption in (pictures or {}).items():
        lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def _book_time(lines: list[dict]) -> str:
    """The book's rows alone: how many of their networks are trained, and in what time."""
    book = [line for line in lines if line["kind"] == "training" and not line["beyond_book"]]
    done = sum(min(line.get("n", 0), line["seeds_wanted"]) for line in book if line["ours"] is not None)
    wanted = sum(line["seeds_wanted"] for line in book)
    seconds = sum(line["seconds"] for line in book if line["ours"] is not None)
    return f" The book's rows: {done} of their {wanted} networks, {duration(seconds)}."


def _code_note(results: dict, trainings: list[dict]) -> str:
    current = results["code"]
    other = {line["row"]: [c for c in line["code"] if c != current] for line in trainings}
    other = {row: codes for row, codes in other.items() if codes}
    note = f"Training code: `{current}` (a hash of the training sources)"
    if not other:
        return note + "; every row shown was trained by it."
    listed = "; ".join(f"row {row}: {', '.join(f'`{c}`' for c in codes)}" for row, codes in other.items())
    return (note + f". Some networks were trained by other versions of it ({listed}); delete OUT/<row> and run "
            "the command again to retrain a row with the current code.")


def plot_report(results: dict, path: Path) -> None:
    """The book's and our accuracy against the row (Agg backend, written atomically)."""
    lines = results["lines"]
    x = np.arange(len(lines))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(lines) + 2), 4.5))
    book = [100 * line["book"] if line["book"] is not None else math.nan for line in lines]
    ours = [100 * line["ours"] if line["ours"] is not None else math.nan for line in lines]
    ax.plot(x, book, "s", color="tab:gray", label="book", markersize=7)
    ax.plot(x, ours, "o", color="tab:blue", label="ours (best of seeds by validation)")
    means = [(i, 100 * line["mean"], 100 * (line["std"] or 0)) for i, line in enumerate(lines)
             if line.get("mean") is not None]
    if means:
        i, mean, std = zip(*means)
        ax.errorbar(i, mean, yerr=std, fmt="_", color="tab:orange", capsize=3, label="ours: mean ± std over seeds")
    ax.set_xticks(x, [line["row"] for line in lines], rotation=45)
    ax.set_xlabel("row")
    ax.set_ylabel("test accuracy (%)")
    title = "Chapter 6 table: the book and this pipeline"
    ax.set_title(title + ("\nQUICK MODE: not a reproduction" if results["quick"] else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=100, bbox_inches=None)


def learning_curves(results: dict, out_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """(epochs, validation accuracies) of each training row's pick: the seed its figure comes from."""
    curves = {}
    for line in results["lines"]:
        if line["kind"] != "training" or line["ours"] is None:
            continue
        path = Path(out_dir) / line["row"] / f"seed{line['best_seed']}" / "metrics" / EPOCHS_FILE
        if not path.is_file():  # a result copied without its metrics: the report still gets written
            log.warning("row %s: no %s, so no curve for it", line["row"], path)
            continue
        with path.open(newline="") as f:
            epochs = list(csv.DictReader(f))
        curves[line["row"]] = ([int(e["epoch"]) for e in epochs], [float(e["validation_accuracy"]) for e in epochs])
    return curves


def plot_curves(results: dict, curves: dict[str, tuple[list[int], list[float]]], path: Path) -> None:
    """Validation error per epoch, one line per row, on a log scale (the rows span 10% to 0.3%); a
    dot marks the epoch of best validation accuracy, whose test accuracy is the row's figure."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    # strong, distinct colours: neighbouring rows must not look alike
    colours = [*plt.get_cmap("tab10").colors, "black", "darkgoldenrod", "navy", "lime"]
    lowest, highest = math.inf, 0.0
    for i, (row, (epochs, accuracies)) in enumerate(curves.items()):
        # (epochs,) in percent; a perfect epoch (quick mode on a few images) is drawn at the floor,
        # since a log scale has no 0
        error = np.maximum(100 * (1 - np.array(accuracies)), ZERO_ERROR)
        lowest, highest = min(lowest, error.min()), max(highest, error.max())
        colour = colours[i % len(colours)]
        ax.plot(epochs, error, "-" if len(epochs) > 1 else "o", color=colour, label=f"row {row}")
        best = int(np.argmax(accuracies))  # the epoch whose test accuracy is the row's figure
        ax.plot(epochs[best], error[best], "o", color=colour, markersize=4)
    ax.set_yscale("log")
    ax.set_yticks([t for t in (ZERO_ERROR, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50)
                   if lowest / 1.2 <= t <= highest * 1.2])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error (%), log scale")
    title = "Chapter 6 table: validation error per epoch (each row's pick)"
    ax.set_title(title + ("\nQUICK MODE: not a reproduction" if results["quick"] else ""))
    ax.grid(alpha=0.3, which="both")
    if curves:
        ax.legend(loc="upper right", ncol=2, fontsize="small")
    fig.tight_layout()
    save_figure(fig, path, dpi=100, bbox_inches=None)


def plot_ensemble_errors(line: dict, images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """The test digits an ensemble row gets wrong (true -> its answer), as the book shows its 33."""
    wrong = np.array(line["errors"], dtype=np.int64)
    title = f"Row {line['row']}, {line['description']}: the {len(wrong)} test digits it gets wrong (true \u2192 answer)"
    digits = images[wrong].reshape(len(wrong), 28, 28)  # (errors, 28, 28)
    plot_gallery(digits, labels[wrong], np.array(line["errors_predicted"]), path, title)


def write_report(results: dict, out_dir: Path, test: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Write report.png, curves.png, with the ``test`` set (images, labels) errors-<row>.png for
    each ensemble row, and report.md showing them, into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    pictures = {"report.png": "The book's accuracy and ours against the row",
                "curves.png": "Validation error per epoch of each row's pick"}
    plot_report(results, out_dir / "report.png")
    plot_curves(results, learning_curves(results, out_dir), out_dir / "curves.png")
    for line in results["lines"]:
        if test is not None and line["kind"].startswith("ensemble") and line["ours"] is not None:
            name = f"errors-{line['row']}.png"
            plot_ensemble_errors(line, test["images"], test["labels"], out_dir / name)
            pictures[name] = f"The {len(line['errors'])} test digits that row {line['row']} gets wrong"
    write_bytes(out_dir / "report.md", report_markdown(results, pictures).encode())
    return [out_dir / "report.md", *(out_dir / name for name in pictures)]
