"""The quick table on small synthetic digits, shared by tests/test_table.py and tests/test_table_beyond.py:
the data, the command (in this process) and the report's Markdown table read back."""

from pathlib import Path

import numpy as np

from pipeline.core.files import save_npz
from pipeline.stages import table as table_stage
from pipeline.table import runner

from synthetic import digit_images


def quick_table(data, out_dir, **settings):
    """The quick table of the synthetic data into ``out_dir``, no progress bars."""
    return runner.run_table(
        quick=True,
        prepared_dir=data / "prepared",
        expanded_dir=data / "expanded",
        out_dir=out_dir,
        progress=False,
        **settings,
    )


def write_set(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    save_npz(path, images=digit_images(labels, rng), labels=labels)


def make_data(root: Path) -> Path:
    """Synthetic prepared and expanded sets, and a params file, in ``root``."""
    for name, n, seed in [
        ("prepared/train", 200, 1),
        ("prepared/validation", 60, 2),
        ("prepared/test", 60, 3),
        ("expanded/train", 200, 4),
    ]:
        write_set(root / f"{name}.npz", n, seed)
    (root / "params.yaml").write_text(
        "train:\n  engine: jax\n  device: cpu\ntracking:\n  experiment: table-test\n  enabled: true\n"
    )
    return root


def table_command(data, out_dir, *args, params=None) -> int:
    """``python -m pipeline table --quick ...`` on the synthetic data, in this process."""
    return table_stage.main(
        [
            "--quick",
            "--params",
            str(params or data / "params.yaml"),
            "--prepared",
            str(data / "prepared"),
            "--expanded",
            str(data / "expanded"),
            "--out",
            str(out_dir),
            "--no-progress",
            *args,
        ]
    )


def markdown_rows(report: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}
