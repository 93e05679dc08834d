"""Plurality vote and probability averaging against hand-made predictions, ties included."""

import numpy as np
import pytest

from pipeline.ensemble import average_probabilities, plurality_vote, votes


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
