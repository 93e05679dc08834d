"""The package's layout is its architecture: library folders never import a stage module,
dependencies between the folders point one way (core <- data <- nn <- tracking <- evaluation <-
cluster <- table; sweep sits beside table, above cluster, and only stages import it), and no module
imports, by any path, one that imports it back (imports inside functions and for type checking count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# what each library folder may import from the package (besides itself)
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "nn": {"core", "data"},
    "tracking": {"core", "data", "nn"},
    "evaluation": {"core", "data", "nn", "tracking"},
    "cluster": {"core", "data", "nn", "tracking"},
    "table": {"core", "data", "nn", "tracking", "evaluation", "cluster"},
    "benchmarks": {"core", "data", "nn", "tracking", "evaluation", "cluster", "table"},
    "sweep": {"core", "data", "nn", "tracking", "evaluation", "cluster"},
}
MAX_LINES = 400


def imported(path: Path) -> set[str]:
    """Every ``pipeline...`` module or name that ``path`` imports, inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pipeline":
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline")
    return names


def library_modules() -> list[Path]:
    return sorted(path for folder in ALLOWED for path in (PACKAGE / folder).rglob("*.py"))


def test_every_library_folder_is_known():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(ALLOWED) | {"stages"}


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_code_imports_no_stage_and_only_the_folders_below_it(path):
    folder = path.relative_to(PACKAGE).parts[0]
    for name in imported(path):
        parts = name.split(".")
        assert parts[1] != "stages" and name != "pipeline.__main__", f"{path} imports the stage module {name}"
        assert parts[1] in ALLOWED[folder] | {folder}, (
            f"{path} imports {name}: {folder}/ may import only from {sorted(ALLOWED[folder])}"
        )


def test_only_stages_import_sweep():
    importers = sorted(folder for folder, allowed in ALLOWED.items() if "sweep" in allowed)
    assert not importers, f"{importers} may import sweep/, which only the stages may use"


def test_the_folder_order_has_no_cycle():
    def below(folder: str, seen: frozenset = frozenset()) -> set[str]:
        assert folder not in seen, f"the folder order loops through {folder}"
        return {lower for allowed in ALLOWED.get(folder, ()) for lower in {allowed} | below(allowed, seen | {folder})}

    for folder in ALLOWED:
        below(folder)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports (a name imported from a
    module counts as that module)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}

    def module_of(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    return {name: {module_of(n) for n in imported(path)} - {name} for name, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not (Tarjan's strongly connected
    components of more than one module)."""
    index, low, stack, circles = {}, {}, [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_modules_import_each_other():
    assert import_circles(import_graph()) == []


def test_the_circle_check_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({**graph, "c": {"d"}}) == []


def test_the_layout_check_sees_an_import_of_a_stage(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.stages import train\n")
    assert "pipeline.stages.train" in imported(module)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_long_without_a_reason(path):
    lines = len(path.read_text().splitlines())
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or "Longer than" in docstring, (
        f"{path} has {lines} lines: split it, or say in its docstring why it is longer than {MAX_LINES} lines"
    )


def test_every_module_of_nn_is_a_training_source_or_said_not_to_compute_a_step():
    """A new module of the training code must enter TRAINING_SOURCES, or a change to it would neither
    invalidate the checkpoints nor mark the table's networks as trained by other code."""
    from pipeline.nn.checkpoint import TRAINING_SOURCES

    not_steps = {"nn/__init__.py", "nn/model_io.py", "nn/outputs.py", "nn/compile_cache.py"}
    modules = {f"nn/{path.name}" for pattern in ("*.py", "*.cc") for path in (PACKAGE / "nn").glob(pattern)}
    assert modules - not_steps == set(TRAINING_SOURCES) - {"data/distort.py"}
