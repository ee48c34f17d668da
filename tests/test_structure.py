"""The shape of the code: no import circles in hvkit/ (a lower layer never imports an
upper one, not even for type hints), and each module where its name says."""

from __future__ import annotations

import ast
from pathlib import Path

import hvkit

PACKAGE = Path(hvkit.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the hvkit modules it imports anywhere in its text (top level, inside
    functions and under TYPE_CHECKING alike)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                if target in mods and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_hvkit():
    graph = import_graph()
    assert "hvkit.qemu.vm" in graph and graph["hvkit.qemu.launch"] >= {"hvkit.qemu.vm"}
    groups = circles(graph)
    described = ["; ".join(f"{m} -> {sorted(d for d in graph[m] if d in g)}" for m in g) for g in groups]
    assert not groups, "import circles: " + " | ".join(described)


def test_the_engine_never_imports_the_operations_built_on_it():
    graph = import_graph()
    upper = ("hvkit.forking", "hvkit.sharing", "hvkit.introspect", "hvkit.cli", "hvkit.api", "hvkit.forensics",
             "hvkit.remote")
    for module, deps in graph.items():
        if module.startswith(("hvkit.qemu", "hvkit.memory", "hvkit.kernel", "hvkit.guest", "hvkit.hv",
                              "hvkit.memserver")):
            assert not [d for d in deps if d.startswith(upper)], f"{module} imports {sorted(deps)}"
        if module.startswith("hvkit.forking"):  # remote snapshots are built on forks, not under them
            assert not [d for d in deps if d.startswith("hvkit.remote")], f"{module} imports {sorted(deps)}"


def test_no_module_is_a_house_of_many_concerns():
    """The VM class was once 1,100 lines of ten concerns; no file grows back to that."""
    too_long = {name: n for name, path in _modules().items()
                if (n := len(path.read_text().splitlines())) > 700}
    assert not too_long, f"split these by concern: {too_long}"


def test_no_name_of_the_api_hides_a_module():
    """`hvkit.fork` once was both the API's function and a package: whichever was bound
    last won, and `hvkit.share.sharer` could no longer be reached by its dotted name."""
    hidden = [name for name in hvkit.__all__ if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists()]
    assert not hidden, f"these names of hvkit's API hide its modules: {hidden}"
