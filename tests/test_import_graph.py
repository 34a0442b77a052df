"""The package's shape: no import cycles (imports inside functions count too), no function over 80 lines.

Importing a submodule runs its parent packages' __init__ first; that edge is Python's, not a design choice,
so `from pkg import submodule` counts as depending on the submodule only.
"""

import ast
from pathlib import Path

import esmfold_peft

PACKAGE = Path(esmfold_peft.__file__).parent
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set, name: str = "") -> set:
    """The project modules `path` (the module `name`) imports, anywhere in the file: a function-level import is
    still an import."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import submodule` depends on the submodule; `from pkg import obj`, on pkg's __init__
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import obj`: the module pkg
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def package_graph() -> dict:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) for name, path in mods.items()}


def test_no_import_cycles():
    graph = package_graph()
    assert len(graph) > 60 and any(graph.values())
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    a = {"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": set()}
    assert cycles(a) == [["x", "y", "z"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from esmfold_peft.nlp import train\n")
    assert "esmfold_peft.nlp.train" in imports(source, set(modules()), name="esmfold_peft.fold.m")


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_every_project_import_names_a_module_that_exists():
    """Imports inside functions run only when called: a module moved without them is found here, not by a user."""
    mods = modules()
    missing = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith(PACKAGE.name)):
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base not in mods:
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {base}")
    assert not missing, missing
