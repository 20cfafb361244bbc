"""attnopt's own import graph: no cycles, and the layers import downwards only.

Data flows model -> compiler -> passes -> ops -> codegen; reports are written by the passes and
read by inspection, never the other way round. Every import statement counts, also those inside
functions (a "local import to break a cycle" is still a cycle); importing a package's submodule
does not count as importing the package's __init__.
"""

import ast
from pathlib import Path

import attnopt

ROOT = Path(attnopt.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module and package under attnopt/ (also folders without an __init__.py)."""
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted(p for p in ROOT.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        mods.setdefault(".".join(path.relative_to(ROOT.parent).parts), path / "__init__.py")
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the attnopt modules it imports anywhere in its source."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        source = path.read_text() if path.exists() else ""
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import sub` imports the submodule; `from pkg import name` the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_every_module_imports():
    import importlib

    for name in _modules():
        if not name.endswith("__main__"):  # `python -m attnopt` would run the CLI
            importlib.import_module(name)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_passes_ops_codegen_never_import_inspection_or_the_top():
    graph = import_graph()
    for name, deps in graph.items():
        if name.split(".")[1:2] and name.split(".")[1] in ("passes", "ops", "codegen"):
            bad = {d for d in deps if d.startswith("attnopt.inspection") or d in ("attnopt", "attnopt.compiler",
                                                                                     "attnopt.cli")}
            assert not bad, f"{name} imports {sorted(bad)}"
