"""The package layout (issue 13, point 6): the core (monitor, solver, policy, bake, export) reads alone,
the research bench lives in ispa_export.lab, and no two modules import each other.

Imports are read from the source (ast), at module level and inside functions alike; nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ispa_export"
LAB = f"{PACKAGE}.lab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported module, at module level) for each import in the file; `from X import y` counts as
    X.y where that is a module of `known`, else as X."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    # Statements at module level, including those nested in if/try blocks there (not in functions).
    stack = list(tree.body)
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(n, field, []):
                    top.add(id(child))
                    stack.append(child)
        elif isinstance(n, ast.ExceptHandler):
            for child in n.body:
                top.add(id(child))
                stack.append(child)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, id(node) in top))
    return out


def _graph(package: str) -> dict[str, list[tuple[str, bool]]]:
    mods = _modules(package)
    known = set(mods)
    return {name: [(m, level) for m, level in _imports(name, path, known) if m in known and m != name]
            for name, path in mods.items()}


def test_the_lab_package_exists_and_holds_the_bench():
    mods = _modules(PACKAGE)
    for name in ("videos", "train", "evaluate", "methods", "rollouts", "metrics", "report", "regimes", "bench",
                 "bench_report", "bench_stream", "long_video", "gpu_check"):
        assert f"{LAB}.{name}" in mods, name
        assert f"{PACKAGE}.{name}" not in mods, f"{name} is still in the core"


def test_no_two_modules_import_each_other():
    graph = _graph(PACKAGE)
    edges = {(a, b) for a, targets in graph.items() for b, _ in targets}
    mutual = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not mutual, f"modules that import each other: {mutual}"
    # Nor around a longer circle: a depth-first walk finds no back edge.
    adj = {a: sorted({b for b, _ in targets}) for a, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(v: str, path: list[str]) -> None:
        state[v] = 1
        for w in adj[v]:
            assert state.get(w) != 1, f"import cycle: {' -> '.join(path[path.index(w):] + [w])}"
            if w not in state:
                walk(w, path + [w])
        state[v] = 2

    for v in adj:
        if v not in state:
            walk(v, [v])


def test_the_core_does_not_import_the_lab():
    graph = _graph(PACKAGE)
    core = {name: targets for name, targets in graph.items() if name != LAB and not name.startswith(LAB + ".")}
    into_lab = {name: sorted({(m, level) for m, level in targets if m == LAB or m.startswith(LAB + ".")})
                for name, targets in core.items()}
    into_lab = {k: v for k, v in into_lab.items() if v}
    # Only the command line reaches the lab, and only inside the commands that run it (eval, bench):
    # `ispa export`, `run`, `inspect`, `engine` and `verify` never load it.
    assert set(into_lab) <= {f"{PACKAGE}.cli"}, into_lab
    assert not [m for m, level in into_lab.get(f"{PACKAGE}.cli", []) if level], into_lab


def test_runtimes_import_neither_torch_nor_the_exporter():
    for path in sorted((ROOT / "runtimes").rglob("*.py")):
        name = _module_name(path)
        for mod, _ in _imports(name, path, set()):
            root = mod.split(".")[0]
            assert root not in ("torch", PACKAGE), f"{name} imports {mod}"
