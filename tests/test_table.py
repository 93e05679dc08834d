"""The chapter 6 table command in quick mode, end to end on small synthetic digits: every book row
trains, the report has the book's figure and ours for each, the ensembles agree with a plain
recomputation, the MLflow parent and child runs exist, and a second invocation trains nothing."""

import json
import re
import shutil

import numpy as np
import pytest

from pipeline.cluster.config import ClusterConfig
from pipeline.core.config import ConfigError
from pipeline.core.files import load_npz
from pipeline.nn.model_io import load_model
from pipeline.table import lines as table_lines
from pipeline.table import report as table_report
from pipeline.table import results as table_results
from pipeline.table import rows as table_rows
from pipeline.table import runner
from pipeline.table.config import TableConfig
from pipeline.tracking import TrackingConfig, registry

from reference import python_vote
from table_quick import make_data, markdown_rows, quick_table, table_command


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("table-data"))


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    """The command line once, in quick mode with one repeat (row 8 still gets five seeds)."""
    out = tmp_path_factory.mktemp("table")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(out)  # the git tags are looked up in the working directory
        code = table_command(data, out / "table", "--repeats", "1")
    assert code == 0
    return out, uri


def test_every_book_row_trains_and_is_reported_beside_the_book(first_run):
    out, _ = first_run
    report = (out / "table" / "report.md").read_text()
    assert "QUICK MODE: NOT a reproduction" in report.splitlines()[2]
    rows = markdown_rows(report)
    for row in table_rows.ROWS:
        cells = rows[row.key]
        if row.book is not None:
            assert cells[2] == f"{100 * row.book:.2f}%"
        if row.key not in table_rows.BOOK_ROWS:  # beyond the book and not asked for: listed, never filled in
            assert cells[3] == "not run"
            continue
        assert re.fullmatch(r"\d+\.\d\d%( \(seed \d\))?", cells[3]), cells
        assert cells[7] == "jax"
    results = json.loads((out / "table" / "results.json").read_text())
    lines = {line["row"]: line for line in results["lines"]}
    assert results["quick"] is True
    assert lines["1"]["n"] == 1 and lines["8"]["n"] == 5 and lines["9"]["members"] == [1, 2, 3, 4, 5]
    for name in ("report.png", "curves.png"):
        assert (out / "table" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figures_are_the_saved_models_test_accuracy_and_the_ensembles_votes(first_run, data):
    out, _ = first_run
    lines = {line["row"]: line for line in json.loads((out / "table" / "results.json").read_text())["lines"]}
    test = load_npz(out / "table" / "quick-data" / "prepared" / "test.npz")
    labels = test["labels"]
    assert len(labels) == 60  # the quick subset keeps all of a set smaller than the subset size

    predicted = load_model(out / "table" / "4" / "seed1" / "model").predict(test["images"])
    assert lines["4"]["ours"] == pytest.approx(np.mean(predicted == labels))

    probabilities = np.stack(
        [load_npz(out / "table" / "8" / f"seed{k}" / "test_probabilities.npz")["probabilities"] for k in range(1, 6)]
    ).astype(np.float64)  # (5, images, 10)
    answers = probabilities.argmax(axis=2)
    vote, average = [], []
    for i in range(len(labels)):  # plain Python: most votes, ties to the most summed probability, then lowest
        counts = [list(answers[:, i]).count(d) for d in range(10)]
        tied = [d for d in range(10) if counts[d] == max(counts)]
        vote.append(max(tied, key=lambda d: (probabilities[:, i, d].sum(), -d)))
        average.append(int(np.argmax(probabilities[:, i].mean(axis=0))))
    assert lines["9"]["ours"] == pytest.approx(np.mean(np.array(vote) == labels))
    assert lines["9avg"]["ours"] == pytest.approx(np.mean(np.array(average) == labels))
    assert lines["9"]["errors"] == np.flatnonzero(np.array(vote) != labels).tolist()
    assert lines["9"]["errors_predicted"] == [vote[i] for i in lines["9"]["errors"]]
    for row in ("9", "9avg"):  # the digits each ensemble gets wrong, drawn
        assert (out / "table" / f"errors-{row}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    seeds = lines["8"]["seeds"]
    best = sorted(seeds, key=lambda s: (-s["best_validation_accuracy"], s["seed"]))[0]  # ties: the lowest seed
    assert lines["8"]["ours"] == best["test_accuracy"]
    assert lines["8"]["mean"] == pytest.approx(np.mean([s["test_accuracy"] for s in seeds]))
    assert lines["8"]["std"] == pytest.approx(np.std([s["test_accuracy"] for s in seeds], ddof=1))


def test_mlflow_has_one_parent_run_with_a_child_per_training(first_run):
    from mlflow.tracking import MlflowClient

    out, uri = first_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("table-test")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["table"] == "chapter6" and parent.data.params["quick"] == "True"
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "report.md",
        "report.png",
        "curves.png",
        "errors-9.png",
        "results.json",
    }

    children = {(r.data.tags["row"], int(r.data.tags["seed"])): r for r in runs if r is not parent}
    results = json.loads((out / "table" / "results.json").read_text())
    expected = {(line["row"], s["seed"]): s for line in results["lines"] for s in line.get("seeds", [])}
    assert set(children) == set(expected) and len(children) == len(runs) - 1 == 15  # 10 rows x 1 + row 8 x 5
    for key, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.metrics["test_accuracy"] == pytest.approx(expected[key]["test_accuracy"])


def test_a_second_invocation_trains_nothing_and_an_interrupted_seed_resumes(first_run, data, monkeypatch):
    out, uri = first_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(out)
    report = (out / "table" / "report.md").read_bytes()
    results = (out / "table" / "results.json").read_bytes()
    kwargs = dict(
        rows=None,
        repeats=1,
        quick=True,
        prepared_dir=data / "prepared",
        expanded_dir=data / "expanded",
        out_dir=out / "table",
        tracking_config=TrackingConfig(experiment="table-test"),
        progress=False,
    )

    again = runner.run_table(**kwargs)
    assert again["trained"] == []
    assert (out / "table" / "report.md").read_bytes() == report
    assert (out / "table" / "results.json").read_bytes() == results

    # killed after its last epoch but before its result was written: only that seed runs, from its checkpoint
    (out / "table" / "3" / "seed1" / "result.json").unlink()
    resumed = runner.run_table(**kwargs)
    assert resumed["trained"] == [("3", 1)]
    assert (
        json.loads((out / "table" / "3" / "seed1" / "metrics" / "train_timings.json").read_text())["resumed_from_epoch"]
        == 1
    )
    assert _same_but_time(resumed["lines"], json.loads(results)["lines"])


def test_report_only_trains_nothing_and_names_what_is_missing(first_run, data, tmp_path, capsys):
    out, _ = first_run
    copy = tmp_path / "table"
    shutil.copytree(out / "table", copy)
    (copy / "report.md").unlink()
    # seed 2 of row 8 interrupted before its result was written; best and distort never trained
    (copy / "8" / "seed2" / "result.json").unlink()
    code = table_command(data, copy, "--repeats", "1", "--rows", "all", "--report-only")
    assert code == 0
    printed = capsys.readouterr().out
    assert "trained 0 networks" in printed
    assert (
        "not trained (--report-only): 8 (seed 2), best (seeds 1, 2, 3, 4, 5), distort (seeds 1, 2, 3, 4, 5), "
        "deep (seeds 1, 2, 3, 4, 5), bn (seeds 1, 2, 3, 4, 5, 6, 7, 8, 9, 10), bn-elastic (seeds 1, 2, 3, 4, 5)\n"
    ) in printed  # all rows: bn-10's committee wants ten bn networks
    assert not (copy / "best").exists() and not (copy / "datasets").exists()  # nothing made for untrained rows
    assert not (copy / "8" / "seed2" / "result.json").exists()
    rows = markdown_rows((copy / "report.md").read_text())
    for key in ("best", "distort", "deep", "bn", "bn-elastic"):
        assert rows[key][3] == "not run", key
    assert rows["8"][4].endswith("(n=4 of 5)")  # the four seeds on disk
    assert rows["9"][3] == "not run (4 of 5 networks)"
    results = json.loads((copy / "results.json").read_text())
    assert [s["seed"] for s in next(line for line in results["lines"] if line["row"] == "8")["seeds"]] == [1, 3, 4, 5]


def test_finished_rows_outlive_a_code_change_and_the_report_names_them(first_run, data, monkeypatch):
    out, uri = first_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(out)
    trained_by = json.loads((out / "table" / "1" / "seed1" / "result.json").read_text())["code"]
    assert trained_by == table_results.code_version() and re.fullmatch(r"[0-9a-f]{12}", trained_by)
    assert (
        f"Training code: `{trained_by}` (a hash of the training sources); every row shown was trained by it."
        in (out / "table" / "report.md").read_text()
    )

    monkeypatch.setattr(runner, "code_version", lambda: "0123456789ab")  # as after an edit of layers.py
    again = quick_table(data, out / "table", rows="1,2", repeats=1)
    assert again["trained"] == []
    report = (out / "table" / "report.md").read_text()
    assert "Training code: `0123456789ab`" in report
    assert f"row 1: `{trained_by}`; row 2: `{trained_by}`" in report

    # code shown to train the same weights as the current code is re-stamped, not named as other code
    # (also through a version in between)
    monkeypatch.setitem(table_results.SAME_WEIGHTS_AS, trained_by, "aaaaaaaaaaaa")
    monkeypatch.setitem(table_results.SAME_WEIGHTS_AS, "aaaaaaaaaaaa", "0123456789ab")
    quick_table(data, out / "table", rows="1,2", repeats=1)
    assert "every row shown was trained by it" in (out / "table" / "report.md").read_text()
    monkeypatch.delitem(table_results.SAME_WEIGHTS_AS, trained_by)

    # a seed never trained is trained, by the current code
    more = quick_table(data, out / "table", rows="1", repeats=2)
    assert more["trained"] == [("1", 2)]
    assert json.loads((out / "table" / "1" / "seed2" / "result.json").read_text())["code"] == "0123456789ab"

    # and a later call with fewer repeats still reports every seed finished on disk
    fewer = quick_table(data, out / "table", rows="2", repeats=1)
    row1 = next(line for line in fewer["lines"] if line["row"] == "1")
    assert fewer["trained"] == [] and [s["seed"] for s in row1["seeds"]] == [1, 2] and row1["n"] == 2
    assert "| 1 | FC 100, softmax; sigmoid | 97.80% |" in (out / "table" / "report.md").read_text()


def test_jobs_train_as_tasks_of_a_local_ray_with_the_same_results(first_run, data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    pytest.importorskip("ray", reason="--jobs runs on Ray: pip install -e '.[cluster]'")
    out, _ = first_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the worker processes inherit it
    monkeypatch.chdir(tmp_path)
    parallel = quick_table(
        data,
        tmp_path / "table",
        rows="1,2",
        repeats=1,
        # both at once, each on as many CPU devices as this process (conftest.py): the same weights
        cluster=ClusterConfig(jobs=4, cpus_per_training=2),
        tracking_config=TrackingConfig(experiment="table-jobs"),
    )
    assert sorted(parallel["trained"]) == [("1", 1), ("2", 1)]
    for row in ("1", "2"):
        serial = json.loads((out / "table" / row / "seed1" / "result.json").read_text())
        result = json.loads((tmp_path / "table" / row / "seed1" / "result.json").read_text())
        for name in ("key", "best_validation_accuracy", "best_epoch", "test_accuracy"):
            assert result[name] == serial[name], (row, name)
        serial_weights = load_npz(out / "table" / row / "seed1" / "model" / "model.npz")
        weights = load_npz(tmp_path / "table" / row / "seed1" / "model" / "model.npz")
        assert serial_weights.keys() == weights.keys()
        for name in weights:
            np.testing.assert_array_equal(weights[name], serial_weights[name])

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("table-jobs").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r is not parent]
    assert sorted((r.data.tags["row"], r.info.status) for r in children) == [("1", "FINISHED"), ("2", "FINISHED")]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    # a local instance stays on loopback: it never advertises this machine's external address
    assert {r.data.tags["ray.node_ip"] for r in children} == {"127.0.0.1"}


def test_register_makes_the_best_single_network_by_validation_the_champion(first_run, data, monkeypatch, capsys):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    out, uri = first_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(out)
    client = MlflowClient(tracking_uri=uri)
    assert table_command(data, out / "table", "--rows", "1,2", "--repeats", "1", "--register") == 0  # trains nothing
    printed = capsys.readouterr().out.splitlines()[-1]

    # every training of the table counts, not only rows 1 and 2: the best by validation accuracy, ties to
    # the earlier row, then the lower seed; the ensembles (9, 9avg) have no run of their own
    runs = client.search_runs([client.get_experiment_by_name("table-test").experiment_id], max_results=1000)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    order = {row.key: i for i, row in enumerate(table_rows.ROWS)}
    ranked = sorted(
        (r for r in runs if r is not parent),
        key=lambda r: (
            -r.data.metrics["final_best_validation_accuracy"],
            order[r.data.tags["row"]],
            int(r.data.tags["seed"]),
        ),
    )
    best, runner_up = ranked[0], ranked[1]
    accuracy = best.data.metrics["final_best_validation_accuracy"]
    tied = [r for r in ranked[1:] if r.data.metrics["final_best_validation_accuracy"] == accuracy]
    names = [f"row {r.data.tags['row']} seed {r.data.tags['seed']}" for r in (best, *tied)]
    tie = f"; tie with {', '.join(names[1:])} at {100 * accuracy:.2f}%: the earlier, {names[0]}, is registered"
    assert printed == "registered table-test-model version 1 (champion: version 1)" + (tie if tied else "")
    champion = client.get_model_version_by_alias("table-test-model", "champion")
    assert str(champion.version) == "1" and champion.run_id == best.info.run_id
    seed_dir = out / "table" / best.data.tags["row"] / f"seed{best.data.tags['seed']}"
    result = json.loads((seed_dir / "result.json").read_text())
    assert float(champion.tags["validation_accuracy"]) == result["best_validation_accuracy"]
    assert float(champion.tags["test_accuracy"]) == result["test_accuracy"]
    tags = client.get_run(parent.info.run_id).data.tags
    assert (tags["registered.run_id"], tags["registered.row"], tags["registered.seed"], tags["registered.version"]) == (
        best.info.run_id,
        best.data.tags["row"],
        best.data.tags["seed"],
        "1",
    )
    # the pyfunc model is logged to the registered network's run only
    with_pyfunc = [r for r in ranked if any(a.path == "model" for a in client.list_artifacts(r.info.run_id))]
    assert with_pyfunc == [best]
    images = load_npz(out / "table" / "quick-data" / "prepared" / "test.npz")["images"][:8]
    served = mlflow.pyfunc.load_model("models:/table-test-model@champion").predict(images.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(served["label"]), load_model(seed_dir / "model").predict(images))

    # the best network's run deleted: the next best is a new version, and the champion does not move to it
    client.delete_run(best.info.run_id)
    try:
        again = quick_table(
            data,
            out / "table",
            rows="1",
            repeats=1,
            register=True,
            tracking_config=TrackingConfig(experiment="table-test"),
        )
    finally:
        client.restore_run(best.info.run_id)
    accuracy = runner_up.data.metrics["final_best_validation_accuracy"]
    tied = [r for r in ranked[2:] if r.data.metrics["final_best_validation_accuracy"] == accuracy]
    names = [f"row {r.data.tags['row']} seed {r.data.tags['seed']}" for r in (runner_up, *tied)]
    tie = f"tie with {', '.join(names[1:])} at {100 * accuracy:.2f}%: the earlier, {names[0]}, is registered"
    assert again["registered"] == registry.Registered("table-test-model", "2", "1", tie=tie if tied else "")
    assert client.get_model_version("table-test-model", "2").run_id == runner_up.info.run_id
    assert client.get_model_version_by_alias("table-test-model", "champion").run_id == best.info.run_id


@pytest.mark.parametrize(
    "tracking, says",
    [("enabled: false", "tracking.enabled: false"), ("registered_model: ''", "tracking.registered_model: ''")],
)
def test_register_with_nothing_to_register_in_is_one_line_before_anything_is_written(
    data, tmp_path, capsys, tracking, says
):
    params = tmp_path / "params.yaml"
    params.write_text(f"train:\n  engine: jax\n  device: cpu\ntracking:\n  experiment: table-test\n  {tracking}\n")
    assert table_command(data, tmp_path / "out", "--rows", "1", "--register", params=params) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: Got --register with {says}: nothing to register in"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("repeats", [1, 100])
def test_repeats_of_1_and_100_are_accepted(repeats):
    assert TableConfig(keys=("1",), repeats=repeats).seeds_wanted(table_rows.BY_KEY["1"]) == repeats


@pytest.mark.parametrize("repeats", [0, -5, 101, 10**9])
def test_repeats_outside_1_to_100_are_refused(data, tmp_path, repeats):
    with pytest.raises(ConfigError, match=rf"Got --repeats {repeats}: must be 1 to 100"):
        runner.run_table(
            rows="1",
            quick=True,
            repeats=repeats,
            prepared_dir=data / "prepared",
            expanded_dir=data / "expanded",
            out_dir=tmp_path,
        )
    assert list(tmp_path.iterdir()) == []


def test_jobs_must_be_at_least_one(data, tmp_path):
    with pytest.raises(ConfigError, match="Got --jobs 0"):
        runner.run_table(
            rows="1",
            quick=True,
            prepared_dir=data / "prepared",
            expanded_dir=data / "expanded",
            out_dir=tmp_path,
            cluster=ClusterConfig(jobs=0),
        )


def _same_but_time(a: list[dict], b: list[dict]) -> bool:
    """The figures agree; only the resumed seed's wall time (its test scoring redone) may differ."""

    def strip(lines):
        return [
            {k: v for k, v in line.items() if k not in ("seconds", "seeds")}
            | {"seeds": [{k: v for k, v in s.items() if k != "seconds"} for s in line.get("seeds", [])]}
            for line in lines
        ]

    return strip(a) == strip(b)


def test_row_selection_and_seed_counts():
    assert table_rows.select_rows("1,6") == ["1", "6a", "6b"]
    assert table_rows.select_rows("9") == ["8", "9", "9avg"]  # the ensemble brings the networks it combines
    assert table_rows.select_rows(None)[-1] == "9avg" and "best" not in table_rows.select_rows(None)
    assert table_rows.select_rows("all") == [row.key for row in table_rows.ROWS]
    assert table_rows.select_rows("bn-shifts") == ["bn", "bn-shifts"]  # test-time shifts bring the networks they score
    assert table_rows.select_rows("bn") == ["bn", "bn-vote", "bn-avg", "bn-shifts"]
    # the committee of ten is asked for by name: only then does bn train ten seeds
    assert table_rows.select_rows("bn-10") == ["bn", "bn-10-vote", "bn-10-avg"]
    assert (
        table_rows.n_seeds(table_rows.BY_KEY["bn"], 3) == 5
        and table_rows.n_seeds(table_rows.BY_KEY["bn"], 3, ["bn-10-avg"]) == 10
    )
    assert table_rows.n_seeds(table_rows.BY_KEY["bn"], 12, ["bn-10-avg"]) == 12
    assert table_rows.n_seeds(table_rows.BY_KEY["8"], 3) == 5 and table_rows.n_seeds(table_rows.BY_KEY["8"], 7) == 7
    assert table_rows.n_seeds(table_rows.BY_KEY["4"], 3) == 3
    with pytest.raises(ConfigError, match="Got --rows '10'"):
        table_rows.select_rows("1,10")
    for nothing in ("", ",,", " "):
        with pytest.raises(ConfigError, match=f"Got --rows {nothing!r}: name at least one row"):
            table_rows.select_rows(nothing)


def test_the_distort_row_is_row_8_with_fresh_distortions_every_epoch():
    assert table_rows.select_rows("distort") == ["distort", "distort-vote", "distort-avg"]
    assert table_rows.n_seeds(table_rows.BY_KEY["distort"], 3) == 5  # its ensembles combine five
    config = table_rows.train_config(
        table_rows.BY_KEY["distort"], 1, quick=False, engine="jax", device="cpu", steps_per_call=500
    )
    row8 = table_rows.train_config(
        table_rows.BY_KEY["8"], 1, quick=False, engine="jax", device="cpu", steps_per_call=500
    )
    assert config.distortion() == {"rotation": 10.0, "scale": 0.1, "alpha": 34.0, "sigma": 5.0}
    assert row8.distortion() is None
    assert (config.epochs, config.lr_decay, row8.lr_decay) == (30, 0.92, 1.0)
    same = ("architecture", "dataset", "eta", "lmbda", "batch_size")
    assert [getattr(config, k) for k in same] == [getattr(row8, k) for k in same]


def test_the_rows_use_the_books_settings():
    row5, row8 = table_rows.BY_KEY["5"], table_rows.BY_KEY["8"]
    assert (row5.preset, row5.settings) == (
        "conv2_relu",
        {"epochs": 60, "eta": 0.03, "lmbda": 0.1, "dataset": "expanded"},
    )
    assert (row8.preset, row8.settings["epochs"], row8.settings["lmbda"]) == ("conv2_relu_dropout", 40, 0.0)
    config = table_rows.train_config(
        table_rows.BY_KEY["1"], 2, quick=False, engine="jax", device="cpu", steps_per_call=500
    )
    settings = (config.architecture, config.epochs, config.eta, config.batch_size, config.seed)
    assert settings == ("shallow", 60, 0.1, 10, 2)


def test_a_row_takes_the_seed_with_the_best_validation_accuracy_ties_to_the_lowest_seed():
    def result(seed, validation, test):
        return {
            "seed": seed,
            "best_validation_accuracy": validation,
            "best_epoch": 1,
            "test_accuracy": test,
            "seconds": 1.0,
            "engine": "jax",
            "device": "cpu",
            "code": "c",
        }

    row = table_rows.BY_KEY["4"]
    tied = table_lines.training_line(row, [result(1, 0.98, 0.97), result(2, 0.99, 0.96), result(3, 0.99, 0.95)], 3)
    assert (tied["best_seed"], tied["ours"]) == (2, 0.96)
    assert tied["tie"] == "tie with seed 3 at 99.00%: the earlier, seed 2, is kept"
    line = table_lines.training_line(row, [result(1, 0.97, 0.97), result(2, 0.96, 0.99)], 3)
    assert (line["best_seed"], line["ours"], line["n"]) == (1, 0.97, 2) and "tie" not in line
    assert line["mean"] == pytest.approx(0.98) and line["std"] == pytest.approx(np.std([0.97, 0.99], ddof=1))

    # the report names the tie, once, and no row without one
    results = {"quick": False, "quick_settings": None, "code": "c", "lines": [tied, {**line, "row": "5"}]}
    report = table_report.report_markdown(results)
    assert report.count("tie with") == 1
    assert "Ties of validation accuracy: row 4: tie with seed 3 at 99.00%: the earlier, seed 2, is kept." in report


def test_a_committee_of_ten_combines_seeds_1_to_10_and_waits_for_all_ten():
    rng = np.random.default_rng(5)
    probabilities = rng.dirichlet(np.ones(10) * 0.3, size=(10, 400))  # (networks, images, classes)
    labels = rng.integers(0, 10, 400)
    members = [{"seed": seed, "seconds": 60.0, "engine": "jax", "device": "cpu"} for seed in range(1, 11)]
    for key, expected in (
        ("bn-10-avg", probabilities.mean(axis=0).argmax(axis=1)),
        ("bn-10-vote", python_vote(probabilities)),
    ):
        line = table_lines.ensemble_line(table_rows.BY_KEY[key], members, list(probabilities), labels)
        assert line["ours"] == pytest.approx(np.mean(expected == labels))
        assert line["errors"] == np.flatnonzero(expected != labels).tolist()
        assert (line["members"], line["seeds_wanted"], line["seconds"]) == (list(range(1, 11)), 10, 600.0)
        nine = table_lines.ensemble_line(table_rows.BY_KEY[key], members[:9], list(probabilities[:9]), labels)
        assert (nine["ours"], nine["seeds_wanted"]) == (None, 10)
