"""The package layout is the pipeline: no import cycles, no reaching into other modules' privates, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "replace_wrap"
MAX_LINES = 400  # "modules of ~400 lines or less" (issue 11)
STAGES = ("analysis", "selection", "synthesis", "surgery", "io", "integrations", "cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """Every ``(module, imported names)`` that ``name`` imports from the package, at any depth of the file
    (imports inside functions count: a late import is still a dependency)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("replace_wrap"):
                continue
            names = [a.name for a in node.names]
            # "from . import api" imports a submodule, not a name of the package
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for sub in subs:
                found.append((sub, []))
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest:
                found.append((target, rest))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("replace_wrap")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _ in _imports(name, path, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name and target in modules:
                graph[name].add(target)
    return graph


def test_every_stage_is_a_subpackage():
    assert all((PACKAGE / stage / "__init__.py").is_file() for stage in STAGES)


def test_no_import_cycles():
    graph = _graph()
    # the package root imports everything and nothing imports it back; leave it out, and every module's
    # own package __init__ (imported on the way to it) which only holds a docstring here
    graph = {m: {t for t in ts if t != "replace_wrap"} for m, ts in graph.items() if m != "replace_wrap"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_nothing_imported_by_the_package_root_is_imported_back():
    graph = _graph()
    assert not [m for m, ts in graph.items() if "replace_wrap" in ts and not m.startswith(("replace_wrap.cli", "replace_wrap.__main__"))]


def test_subpackage_inits_import_nothing():
    # an __init__ that imports its modules drags them (and their imports) into every sibling's import
    graph = _graph()
    assert {stage: graph[f"replace_wrap.{stage}"] for stage in STAGES if stage != "cli"} == {
        stage: set() for stage in STAGES if stage != "cli"
    }


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offenders = [
        f"{name} imports {n} from {target}"
        for name, path in modules.items()
        for target, names in _imports(name, path, modules)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target != name
    ]
    assert not offenders, offenders


def test_the_core_never_imports_the_command_line():
    graph = _graph()
    core = [m for m in graph if not m.startswith("replace_wrap.cli") and m != "replace_wrap.__main__"]
    assert not [m for m in core if any(t.startswith("replace_wrap.cli") for t in graph[m])]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_stay_small(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by concept (limit {MAX_LINES})"
