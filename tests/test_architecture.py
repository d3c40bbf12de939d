"""The package's shape, checked: layers that depend one way, no import cycle, a loop that names
no stage or task, pure objectives, and the size limits that keep modules readable.

Every ``import`` counts, at module level or inside a function: a function-local import is a
dependency all the same (it only hides a cycle until the function runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tether"

# Top to bottom. A module may import from its own layer or any layer below, never above.
LAYERS: list[tuple[str, ...]] = [
    ("tether.cli", "tether.__main__"),
    ("tether.studies", "tether.bench"),
    ("tether.engine",),
    ("tether.stages",),
    ("tether.eval",),
    ("tether.generation", "tether.scoring", "tether.rewards"),
    ("tether.models",),
    ("tether.objectives", "tether.distributions"),
    # the stage registry is data that config validates against: below its package (a
    # module's most specific prefix decides its layer)
    (
        "tether.tasks",
        "tether.config",
        "tether.batches",
        "tether.distributed",
        "tether.stages.registry",
    ),
]
FACADE = "tether"  # the package itself: the public API, imported lazily


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: Iterable[str]) -> set[str]:
    """The tether modules ``path`` imports, anywhere in the file. ``from tether.x import y``
    counts as tether.x.y when that is a module, else as tether.x."""
    known = set(known)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tether":
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "tether":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m != FACADE}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix that names ``module`` or a package above it."""
    found = [
        (len(p), i)
        for i, prefixes in enumerate(LAYERS)
        for p in prefixes
        if module == p or module.startswith(p + ".")
    ]
    return max(found)[1] if found else None


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def upward_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(graph.items()):
        if source == FACADE:
            continue
        here = layer_of(source)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there < here:
                bad.append(f"{source} -> {target}")
    return bad


# ----------------------------------------------------------------------------- the checks


def test_the_checker_finds_a_cycle_and_an_upward_import():
    """The checks below can fail: a two-module cycle and an import from a lower layer up."""
    graph = {
        "tether.objectives.a": {"tether.objectives.b"},
        "tether.objectives.b": {"tether.objectives.a"},
        "tether.tasks.x": {"tether.engine.loop"},
        "tether.engine.loop": set(),
    }
    assert find_cycles(graph) == [["tether.objectives.a", "tether.objectives.b"]]
    assert upward_imports(graph) == ["tether.tasks.x -> tether.engine.loop"]


def test_every_module_has_a_layer():
    unplaced = [m for m in all_modules() if m != FACADE and layer_of(m) is None]
    assert unplaced == []


def test_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_dependencies_point_down():
    assert upward_imports(import_graph()) == []


def test_objectives_are_pure():
    """Losses take tensors and return tensors: no collectives, no I/O, no models."""
    graph = import_graph()
    allowed = ("tether.objectives", "tether.distributions")
    bad = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith("tether.objectives")
        for t in targets
        if not t.startswith(allowed)
    ]
    assert bad == []


def _stage_and_task_names() -> set[str]:
    from tether.config import TaskConfig, TrainConfig

    stages = set(TrainConfig.model_fields["stage"].annotation.__args__)  # type: ignore[union-attr]
    tasks = set(TaskConfig.model_fields["name"].annotation.__args__)  # type: ignore[union-attr]
    return stages | tasks


@pytest.mark.parametrize("module", ["tether.engine.loop"])
def test_the_loop_names_no_stage_and_no_task(module):
    path = all_modules()[module]
    imports = imported_modules(path, all_modules())
    specific = [
        m
        for m in imports
        if (
            m.startswith("tether.stages.")
            and m not in ("tether.stages.base", "tether.stages.registry")
        )
        or (m.startswith("tether.tasks.") and m != "tether.tasks")
    ]
    assert specific == []
    names = _stage_and_task_names()
    strings = {
        node.value
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert sorted(strings & names) == []


def test_few_top_level_modules_and_none_too_long():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top
    long = {
        module_name(p): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 700
    }
    assert long == {}


def test_commands_are_thin():
    """A command parses its options, calls one library function and renders: 60 lines at most."""
    long = {}
    for path in (PACKAGE / "cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef):
                continue
            commands = [
                d
                for d in node.decorator_list
                if isinstance(d, ast.Call)
                and isinstance(d.func, ast.Attribute)
                and d.func.attr == "command"
            ]
            if commands:
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > 60:
                    long[f"{module_name(path)}.{node.name}"] = node.end_lineno - start + 1
    assert long == {}
