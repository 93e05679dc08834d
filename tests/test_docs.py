"""The docs name only what exists: every dotted ``pipeline.`` name in README.md and docs/*.md resolves
to a module, or to an attribute of one, and every ``pipeline/`` or ``tests/`` path is a file or folder
of this checkout."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOTTED = re.compile(r"(?<![\w./-])pipeline(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w./-])(?:pipeline|tests)/[\w./-]*[\w/]")


def dotted_names(text: str) -> set[str]:
    return {m.group(0) for m in DOTTED.finditer(text)}


def resolves(name: str) -> bool:
    """True when ``name`` is a module, or a module followed by attributes that exist."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_the_pattern_finds_names_and_the_resolver_refuses_stale_ones():
    text = "see `pipeline.nn.model_io.load_model`, python -m pipeline.benchmarks.train; pipeline/nn/x.py"
    assert dotted_names(text) == {"pipeline.nn.model_io.load_model", "pipeline.benchmarks.train"}
    assert resolves("pipeline.nn.model_io.load_model")
    assert not resolves("pipeline.nn.model_io.no_such_function")
    assert not resolves("pipeline.no_such_module")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_dotted_pipeline_name_in_the_docs_resolves(doc):
    stale = sorted(name for name in dotted_names(doc.read_text()) if not resolves(name))
    assert not stale, f"{doc.relative_to(ROOT)} names what does not exist: {stale}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_pipeline_and_tests_path_in_the_docs_exists(doc):
    missing = sorted(path for path in PATH.findall(doc.read_text()) if not (ROOT / path).exists())
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"
