"""The data sets a table trains on: the pipeline's, a row's own expanded set, or quick mode's first images."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.files import save_npz, sha256_file
from pipeline.data.expand import ExpandConfig, expand
from pipeline.data.splits import load_split
from pipeline.table.rows import QUICK, Row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Data:
    prepared: Path
    expanded: Path
    test: Path

    def train_path(self, dataset: str) -> Path:
        return (self.prepared if dataset == "prepared" else self.expanded) / "train.npz"


def row_data(row: Row, data: Data, out_dir: Path, progress: bool = False) -> Data:
    """The data ``row`` trains on: the table's, or for a row with its own ``expand`` settings that set,
    made once from the prepared training images by the expand stage's worker under OUT/datasets/."""
    if not row.expand:
        return data
    config = ExpandConfig(**row.expand)
    source = data.prepared / "train.npz"
    name = hashlib.sha256(
        json.dumps({"expand": dataclasses.asdict(config), "source": file_sha256(source)}, sort_keys=True).encode()
    ).hexdigest()[:12]
    directory = out_dir / "datasets" / f"expand-{name}"
    if not (directory / "train.npz").is_file():  # written atomically: a partial set is never found
        log.info("row %s: making its training set %s (%s)", row.key, directory, row.expand)
        expand(config=config, train_path=source, out_dir=directory, progress=progress)
    return dataclasses.replace(data, expanded=directory)


def source_of(row: Row, data: Data) -> Path:
    """The file a training row needs before it starts."""
    return data.prepared / "train.npz" if row.expand else data.train_path(row.settings["dataset"])


def quick_data(prepared: Path, expanded: Path, out: Path) -> Data:
    """The first images of each set, written once under OUT/quick-data (same bytes every time, so resume works)."""
    sources = {
        "prepared/train.npz": (prepared / "train.npz", QUICK["train_images"]),
        "prepared/validation.npz": (prepared / "validation.npz", QUICK["validation_images"]),
        "prepared/test.npz": (prepared / "test.npz", QUICK["test_images"]),
        "expanded/train.npz": (expanded / "train.npz", QUICK["train_images"]),
    }
    for name, (source, count) in sources.items():
        target = out / "quick-data" / name
        if target.is_file() or not source.is_file():
            continue
        images, labels = load_split(source)
        save_npz(target, images=images[:count].reshape(-1, 28, 28), labels=labels[:count])
    root = out / "quick-data"
    return Data(root / "prepared", root / "expanded", root / "prepared" / "test.npz")


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.cache
def _sha256_of(path: Path, mtime_ns: int, size: int) -> str:
    return sha256_file(path)  # once per file version: a row's seeds share the 200 MB expanded set
