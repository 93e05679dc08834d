"""Plurality vote and probability averaging against hand-made predictions, ties included; the
``ensemble`` command against saved models scored by plain NumPy."""

import json

import numpy as np
import pytest

from pipeline.core.config import PipelineError
from pipeline.core.files import load_npz
from pipeline.evaluation.ensemble import average_probabilities, ensemble_models, plurality_vote, report, votes
from pipeline.nn.architecture import build, resolve
from pipeline.nn.model_io import save_model
from pipeline.stages.ensemble import main

from reference import np_shift, python_vote
from synthetic import TINY_NET, write_prepared


def one_hot_ish(labels, confidence):
    """Probabilities (networks, images, 10) whose argmax is ``labels``, with that class at ``confidence``."""
    labels, confidence = np.asarray(labels), np.asarray(confidence, dtype=float)
    rest = (1 - confidence) / 9
    probabilities = np.repeat(rest[..., None], 10, axis=-1)
    np.put_along_axis(probabilities, labels[..., None], confidence[..., None], axis=-1)
    return probabilities


def test_votes_count_each_networks_answer():
    labels = np.array([[3, 1], [3, 2], [7, 2]])  # 3 networks, 2 images
    counts = votes(labels)
    assert counts.shape == (2, 10)
    assert counts[0].tolist() == [0, 0, 0, 2, 0, 0, 0, 1, 0, 0]
    assert counts[1].tolist() == [0, 1, 2, 0, 0, 0, 0, 0, 0, 0]


def test_the_majority_wins_however_confident_the_minority():
    labels = np.array([[4], [4], [4], [9], [9]])
    probabilities = one_hot_ish(labels, [[0.3], [0.3], [0.3], [0.99], [0.99]])
    assert plurality_vote(labels).tolist() == [4]
    assert plurality_vote(labels, probabilities).tolist() == [4]
    # averaging the probabilities listens to the confident minority: mean p(9) > mean p(4)
    assert average_probabilities(probabilities).tolist() == [9]


def test_a_two_two_tie_goes_to_the_digit_with_more_summed_probability():
    # five networks answer 2, 2, 8, 8, 5: digits 2 and 8 tie on two votes
    labels = np.array([[2], [2], [8], [8], [5]])
    probabilities = one_hot_ish(labels, [[0.5], [0.6], [0.9], [0.8], [0.99]])
    # summed p(8) = 0.9 + 0.8 + 3 * small > summed p(2) = 0.5 + 0.6 + 3 * small; 5 is not tied, however sure
    assert plurality_vote(labels, probabilities).tolist() == [8]
    assert plurality_vote(labels).tolist() == [2]  # without probabilities: the lowest tied digit


def test_five_different_answers_go_to_the_most_confident_overall():
    labels = np.array([[0], [1], [2], [3], [4]])
    probabilities = one_hot_ish(labels, [[0.4], [0.95], [0.5], [0.6], [0.7]])
    assert plurality_vote(labels, probabilities).tolist() == [1]
    assert plurality_vote(labels).tolist() == [0]


def test_exactly_equal_sums_go_to_the_lowest_tied_digit():
    labels = np.array([[6], [6], [1], [1]])
    probabilities = one_hot_ish(labels, [[0.8], [0.8], [0.8], [0.8]])
    assert plurality_vote(labels, probabilities).tolist() == [1]
    assert average_probabilities(probabilities).tolist() == [1]


def test_many_images_match_a_plain_python_vote():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10) * 0.3, size=(5, 400))  # (networks, images, classes)
    labels = probabilities.argmax(axis=2)
    expected_vote, expected_average = [], []
    for image in range(400):
        answers = labels[:, image].tolist()
        best_count = max(answers.count(d) for d in range(10))
        tied = [d for d in range(10) if answers.count(d) == best_count]
        sums = {d: sum(probabilities[n, image, d] for n in range(5)) for d in tied}
        expected_vote.append(max(tied, key=lambda d: (sums[d], -d)))
        means = [sum(probabilities[n, image, d] for n in range(5)) / 5 for d in range(10)]
        expected_average.append(max(range(10), key=lambda d: (means[d], -d)))
    assert plurality_vote(labels, probabilities).tolist() == expected_vote
    assert average_probabilities(probabilities).tolist() == expected_average
    assert sum(len(set(labels[:, i])) < 5 for i in range(400)) > 100  # the data does exercise real votes


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        plurality_vote(np.array([[10]]))
    with pytest.raises(ValueError, match="do not match"):
        plurality_vote(np.array([[1, 2]]), np.zeros((1, 3, 10)))
    with pytest.raises(ValueError, match=r"\(networks, images, classes\)"):
        average_probabilities(np.zeros((4, 10)))


# -- the command, on saved models ------------------------------------------------------------------
def numpy_probabilities(model_dir, images):
    """TINY_NET's forward pass in plain NumPy from the saved arrays: sigmoid FC 30, softmax 10."""
    weights = load_npz(model_dir / "model.npz")
    x = images.reshape(len(images), 784) / 255.0  # (N, 784)
    hidden = 1 / (1 + np.exp(-(x @ weights["layer0.w"] + weights["layer0.b"])))  # (N, 30)
    logits = hidden @ weights["layer1.w"] + weights["layer1.b"]  # (N, 10)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def saved_models(tmp_path):
    """Three TINY_NET models, random weights around shared ones (so that they agree on some images
    and not on others), and a test set."""
    network = build(resolve(TINY_NET), rng=np.random.default_rng(0))
    shared = [np.random.default_rng(99).normal(0, 0.3, v.shape) for v in network.get_values()]
    model_dirs = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        values = [(s + rng.normal(0, 0.2, s.shape)).astype(np.float32) for s in shared]
        save_model(tmp_path / f"model{seed}", network, values)
        model_dirs.append(tmp_path / f"model{seed}")
    data_dir = write_prepared(tmp_path / "prepared", sizes={"test": 300})
    return model_dirs, data_dir / "test.npz"


def test_the_command_scores_each_model_and_both_ensembles_as_plain_numpy(saved_models, tmp_path):
    model_dirs, test_path = saved_models
    result = ensemble_models(model_dirs=model_dirs, data_path=test_path, out_path=tmp_path / "out.json", progress=False)

    test = load_npz(test_path)
    probabilities = np.stack([numpy_probabilities(d, test["images"]) for d in model_dirs])  # (3, 300, 10)
    answers = probabilities.argmax(axis=2)
    three_ways = (answers[0] != answers[1]) & (answers[0] != answers[2]) & (answers[1] != answers[2])
    majority = ~three_ways & ~np.all(answers == answers[0], axis=0)
    expected_vote, expected_average = python_vote(probabilities), probabilities.mean(axis=0).argmax(axis=1)
    # the data exercises ties, 2-1 majorities, and the vote and the average disagreeing
    assert three_ways.sum() > 5 and majority.sum() > 20 and np.sum(expected_vote != expected_average) > 2
    for member, model_dir, a in zip(result["members"], model_dirs, answers):
        assert member == {"model": str(model_dir), "accuracy": pytest.approx(np.mean(a == test["labels"]))}
    assert result["plurality_vote_accuracy"] == pytest.approx(np.mean(expected_vote == test["labels"]))
    assert result["averaged_probabilities_accuracy"] == pytest.approx(np.mean(expected_average == test["labels"]))
    assert result["images"] == 300
    assert result["plurality_vote_errors"] == np.flatnonzero(expected_vote != test["labels"]).tolist()
    assert json.loads((tmp_path / "out.json").read_text()) == result


def test_the_command_line_prints_every_figure(saved_models, tmp_path, capsys):
    model_dirs, test_path = saved_models
    (tmp_path / "params.yaml").write_text("train:\n  engine: jax\n")
    args = ["--params", str(tmp_path / "params.yaml"), "--data", str(test_path), "--no-progress"]
    assert (
        main(
            [*map(str, model_dirs), *args, "--out", str(tmp_path / "e.json"), "--gallery", str(tmp_path / "errors.png")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    assert printed.splitlines()[0] == f"3 networks on {test_path} (300 images):"
    for member in result["members"]:
        assert f"{100 * member['accuracy']:6.2f}%  {member['model']}" in printed
    assert f"{100 * result['plurality_vote_accuracy']:6.2f}%  plurality vote" in printed
    assert f"{100 * result['averaged_probabilities_accuracy']:6.2f}%  averaged probabilities" in printed
    assert (tmp_path / "errors.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_named_before_any_scoring(saved_models, tmp_path, capsys):
    model_dirs, test_path = saved_models
    with pytest.raises(PipelineError, match="at least two models, got 1: .*model0"):
        ensemble_models(model_dirs=model_dirs[:1], data_path=test_path, progress=False)
    (tmp_path / "elsewhere").mkdir()
    again = tmp_path / "elsewhere" / ".." / "model0"  # the same directory, spelled differently
    with pytest.raises(PipelineError, match=r"model '.*elsewhere/\.\./model0' is given twice"):
        ensemble_models(model_dirs=[*model_dirs, again], data_path=test_path, progress=False)
    with pytest.raises(PipelineError, match="no trained model in '.*nowhere'"):
        ensemble_models(model_dirs=[model_dirs[0], tmp_path / "nowhere"], data_path=test_path, progress=False)
    with pytest.raises(PipelineError, match="missing.npz not found"):
        ensemble_models(model_dirs=model_dirs, data_path=tmp_path / "missing.npz", progress=False)
    np.savez(tmp_path / "unlabelled.npz", images=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(
        PipelineError, match=r"unlabelled.npz: expected arrays 'images' and 'labels', found \['images'\]"
    ):
        ensemble_models(model_dirs=model_dirs, data_path=tmp_path / "unlabelled.npz", progress=False)
    np.savez(tmp_path / "short.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(3, np.uint8))
    with pytest.raises(PipelineError, match=r"short.npz: one label per image, shape \(4,\), got shape \(3,\)"):
        ensemble_models(model_dirs=model_dirs, data_path=tmp_path / "short.npz", progress=False)
    # on the command line: one line naming the problem, exit status 1
    (tmp_path / "params.yaml").write_text("train: {}\n")
    assert main([str(model_dirs[0]), "--params", str(tmp_path / "params.yaml"), "--data", str(test_path)]) == 1
    assert "error: an ensemble needs at least two models" in capsys.readouterr().err


def test_test_time_shifts_average_each_networks_five_views_as_plain_numpy(saved_models, tmp_path):
    model_dirs, test_path = saved_models
    result = ensemble_models(model_dirs=model_dirs, data_path=test_path, test_time_shifts=1, progress=False)

    test = load_npz(test_path)
    views = [test["images"], *(np_shift(test["images"], dy, dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)))]
    probabilities = np.stack(
        [np.mean([numpy_probabilities(d, v) for v in views], axis=0) for d in model_dirs]
    )  # (3, 300, 10)
    plain = np.stack([numpy_probabilities(d, test["images"]) for d in model_dirs])
    assert np.sum(probabilities.argmax(axis=2) != plain.argmax(axis=2)) > 10  # the shifts change answers
    for member, answers in zip(result["members"], probabilities.argmax(axis=2)):
        assert member["accuracy"] == pytest.approx(np.mean(answers == test["labels"]))
    assert result["plurality_vote_accuracy"] == pytest.approx(np.mean(python_vote(probabilities) == test["labels"]))
    average = probabilities.mean(axis=0).argmax(axis=1)
    assert result["averaged_probabilities_accuracy"] == pytest.approx(np.mean(average == test["labels"]))
    assert result["test_time_shifts"] == 1
    report_line = report(result).splitlines()[0]
    assert report_line.endswith("(300 images), each answering from 5 views of an image (test-time shifts 1):")


def test_bad_test_time_shifts_are_named_before_any_scoring(saved_models, tmp_path, capsys):
    model_dirs, test_path = saved_models
    with pytest.raises(PipelineError, match="Got --test-time-shifts=14: must be 0..13 pixels"):
        ensemble_models(model_dirs=model_dirs, data_path=test_path, test_time_shifts=14, progress=False)
    (tmp_path / "params.yaml").write_text("train: {}\n")
    args = [*map(str, model_dirs), "--params", str(tmp_path / "params.yaml"), "--test-time-shifts", "-1"]
    assert main(args) == 1
    assert "Got --test-time-shifts=-1" in capsys.readouterr().err
