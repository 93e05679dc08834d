"""Pictures people would rather look at than read: the confusion matrix and the misclassified digits."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.files import atomic_path  # noqa: E402


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, classes: int = 10) -> np.ndarray:
    """counts[i, j]: images of digit i predicted as j."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (actual.astype(np.int64), predicted.astype(np.int64)), 1)
    return counts


def save_figure(fig, path: Path, dpi: int = 110, bbox_inches: str | None = "tight") -> None:
    """Write ``fig`` as a PNG (atomically: a half-written picture never replaces a good one) and close it;
    ``bbox_inches=None`` keeps the figure's own size."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches=bbox_inches)
    plt.close(fig)


def plot_confusion(counts: np.ndarray, path: Path, title: str) -> None:
    """The matrix with every count written in its cell; errors (off the diagonal) in their own colour scale."""
    classes = len(counts)
    errors = counts.astype(float).copy()
    np.fill_diagonal(errors, np.nan)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(errors, cmap="Reds")
    darkest = np.nanmax(errors) if np.isfinite(errors).any() else 0
    fig.colorbar(image, ax=ax, label="misclassified images")
    for i in range(classes):
        for j in range(classes):
            if counts[i, j]:
                on_dark = i != j and darkest and counts[i, j] > 0.6 * darkest
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if on_dark else "black",
                    fontweight="bold" if i == j else "normal",
                )
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title)
    save_figure(fig, path)


def plot_gallery(images: np.ndarray, actual: np.ndarray, predicted: np.ndarray, path: Path, title: str) -> None:
    """The misclassified digits, as the book shows its errors: true label, then the network's guess."""
    count = max(len(images), 1)
    cols = min(count, 10)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.45 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, true, guess in zip(axes.flat, images, actual, predicted):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"{true} \u2192 {guess}", fontsize=9, color="firebrick")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
