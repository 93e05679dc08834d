"""The table's learning-curve plot reads each row's pick, the seed the row's figure comes from."""

import csv
import json
import warnings
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from pipeline.table import report as table_report
from pipeline.table.report import learning_curves, plot_curves, write_report


def write_epochs(path, accuracies):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_cost", "validation_accuracy", "seconds", "images_per_second", "eta"])
        writer.writerows([i + 1, 0.1, a, 1.0, 100.0, 0.1] for i, a in enumerate(accuracies))


def line(row, best_seed, ours=0.99, book=0.99):
    return {
        "row": row,
        "description": f"row {row}",
        "book": book,
        "beyond_book": False,
        "kind": "training",
        "ours": ours,
        "best_seed": best_seed,
        "mean": ours,
        "std": None,
        "n": 2,
        "seeds_wanted": 2,
        "seconds": 10.0,
        "engine": "jax",
        "device": "cpu",
        "code": ["abc"],
        "seeds": [],
    }


@pytest.fixture
def table_dir(tmp_path):
    write_epochs(tmp_path / "1" / "seed1" / "metrics" / "train_epochs.csv", [0.5, 0.6, 0.7])
    write_epochs(tmp_path / "1" / "seed2" / "metrics" / "train_epochs.csv", [0.9, 0.95, 0.97, 0.96])  # the pick
    write_epochs(tmp_path / "8" / "seed1" / "metrics" / "train_epochs.csv", [0.99, 0.995])
    results = {
        "quick": False,
        "quick_settings": None,
        "code": "abc",
        "lines": [
            line("1", best_seed=2),
            line("8", best_seed=1),
            {**line("5", best_seed=None), "ours": None},  # not run: no curve
            {
                "row": "9",
                "description": "vote",
                "book": 0.9967,
                "beyond_book": False,
                "kind": "ensemble (vote)",
                "ours": 0.996,
                "members": [1, 2, 3, 4, 5],
                "seeds_wanted": 5,
                "n": 5,
                "seconds": 1.0,
                "engine": "jax",
                "device": "cpu",
                "errors": [1, 3],
                "errors_predicted": [7, 0],
            },
        ],
    }
    return tmp_path, results


def test_each_row_curve_is_its_picks_validation_accuracy_per_epoch(table_dir):
    out, results = table_dir
    assert learning_curves(results, out) == {"1": ([1, 2, 3, 4], [0.9, 0.95, 0.97, 0.96]), "8": ([1, 2], [0.99, 0.995])}


def test_a_pick_without_its_metrics_file_has_no_curve_and_a_warning(table_dir, caplog):
    out, results = table_dir
    (out / "8" / "seed1" / "metrics" / "train_epochs.csv").unlink()
    assert list(learning_curves(results, out)) == ["1"]
    assert "row 8: no " in caplog.text


def test_the_report_writes_the_table_and_both_plots(table_dir):
    out, results = table_dir
    paths = write_report(results, out)
    assert [p.name for p in paths] == ["report.md", "report.png", "curves.png"]  # no test set: no error gallery
    report = paths[0].read_text()
    assert "| 1 | row 1 | 99.00% | 99.00% (seed 2) |" in report
    # rows 1 and 8 have both their seeds, row 5 none; the ensemble row trains nothing of its own
    assert "(4 networks). The book's rows: 4 of their 6 networks, 20 s." in report
    assert "![Validation error per epoch of each row's pick](curves.png)" in report  # shown where the report is read
    assert "errors-9.png" not in report
    height, width, _ = matplotlib.image.imread(paths[2]).shape
    assert (width, height) == (900, 550)


def test_no_curves_still_make_a_plot(tmp_path):
    plot_curves({"quick": True, "lines": []}, {}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_perfect_epoch_is_drawn_at_the_floor_of_the_log_scale(tmp_path):
    curves = {"1": ([1, 2], [1.0, 1.0])}  # quick mode on a few images can reach 100%
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a log scale with no positive values
        plot_curves({"quick": True, "lines": [line("1", best_seed=1)]}, curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_row_with_test_time_shifts_shows_its_pick_and_is_not_counted_as_training(table_dir):
    out, results = table_dir
    shifted = {
        **line("bn-shifts", best_seed=2, ours=0.9966),
        "kind": "test-time shifts (1)",
        "shifted_of": "1",
        "beyond_book": True,
        "book": None,
    }
    paths = write_report({**results, "lines": [*results["lines"], shifted]}, out)
    report = paths[0].read_text()
    assert "| bn-shifts | row bn-shifts *(beyond the book)* | — | 99.66% (seed 2) | 99.66% (n=2) | — |" in report
    assert "(4 networks)." in report  # its networks are row 1's, counted there


def test_an_ensembles_errors_are_drawn_from_the_test_set(table_dir, monkeypatch):
    out, results = table_dir
    images = np.repeat(np.arange(4, dtype=np.uint8)[:, None], 784, axis=1)  # image i is all i
    labels = np.array([5, 1, 2, 3], np.uint8)
    drawn = {}
    monkeypatch.setattr(table_report, "plot_gallery", lambda *args: drawn.update(args=args))
    paths = write_report(results, out, {"images": images, "labels": labels})
    assert [p.name for p in paths] == ["report.md", "report.png", "curves.png", "errors-9.png"]
    digits, actual, predicted, path, title = drawn["args"]
    assert digits.shape == (2, 28, 28) and digits[:, 5, 5].tolist() == [1, 3]
    assert actual.tolist() == [1, 3] and predicted.tolist() == [7, 0]
    assert path == out / "errors-9.png"
    assert "![The 2 test digits that row 9 gets wrong](errors-9.png)" in paths[0].read_text()
    assert title.startswith("Row 9, vote: the 2 test digits it gets wrong")


def test_the_docs_results_page_is_generated_from_its_results_json(tmp_path):
    """docs/results.md is what the report code makes of docs/results.json, so the two cannot drift."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    copy = tmp_path / "results.json"
    copy.write_bytes((docs / "results.json").read_bytes())
    assert table_report.main([str(copy)]) == 0  # python -m pipeline.table.report docs/results.json
    assert (tmp_path / "results.md").read_text() == (docs / "results.md").read_text(), (
        "docs/results.md is stale: run python -m pipeline.table.report docs/results.json"
    )
    results = json.loads(copy.read_text())
    page = (docs / "results.md").read_text()
    for line in results["lines"]:  # every measured figure is on the page
        if line["ours"] is not None:
            assert f"| {line['row']} | " in page and table_report.pct(line["ours"]) in page


def test_the_results_page_command_names_a_missing_results_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        table_report.main([str(tmp_path / "nope.json")])
    assert stop.value.code == 2
    assert f"no results file at '{tmp_path / 'nope.json'}'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
