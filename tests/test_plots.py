import numpy as np

from pipeline.evaluation.plots import confusion_matrix, plot_confusion, plot_gallery


def test_confusion_matrix_counts_by_hand():
    actual = np.array([0, 0, 1, 2, 2, 2], dtype=np.uint8)
    predicted = np.array([0, 1, 1, 2, 0, 2], dtype=np.int64)
    counts = confusion_matrix(actual, predicted, classes=3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_pictures_are_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, (10, 10))
    plot_confusion(counts, tmp_path / "c.png", "title")
    images = rng.integers(0, 256, (13, 28, 28), dtype=np.uint8)
    plot_gallery(images, np.arange(13) % 10, (np.arange(13) + 1) % 10, tmp_path / "g.png", "errors")
    plot_gallery(images[:0], np.array([]), np.array([]), tmp_path / "empty.png", "no errors")
    for name in ("c.png", "g.png", "empty.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "empty.png", "g.png"]
