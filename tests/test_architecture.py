"""The layout is the architecture: the core depends downward only and names no built-in backend."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quantkit"
CORE = PACKAGE / "core"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported quantkit module, whether the import sits inside a function) for each import."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, id(node) in in_function) for n in names if n == "quantkit" or n.startswith("quantkit.")]
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(target: str, known: dict[str, Path]) -> str:
    """The module an import names (``from quantkit.core import errors`` names quantkit.core.errors)."""
    while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def test_no_quantkit_import_hides_in_a_function():
    hidden = [f"{module_name(p)} -> {t}" for p in PACKAGE.rglob("*.py") for t, inside in internal_imports(p) if inside]
    assert not hidden, "imports of quantkit modules inside functions (cycles dodged?):\n" + "\n".join(hidden)


def test_core_import_graph_has_no_cycle_and_stays_in_the_core():
    known = modules()
    graph = {
        name: {resolve(t, known) for t, _ in internal_imports(path)} - {name}
        for name, path in known.items()
        if name.startswith("quantkit.core")
    }
    for name, targets in graph.items():
        outside = [t for t in targets if not t.startswith("quantkit.core")]
        assert not outside, f"{name} imports {outside}: the core must not depend on what sits above it"
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_core_names_no_builtin_backend():
    builtins = [p.name for p in (PACKAGE / "builtin_backends").iterdir() if p.is_dir() and p.name != "__pycache__"]
    words = {*builtins, "bitsandbytes", "BnbConfig", "GPTQConfig", "AWQConfig", "HQQConfig", "GGUFConfig", "RTNConfig"}
    offending = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            values = []
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _is_docstring(node, path):
                values = [node.value]
            elif isinstance(node, ast.Name):
                values = [node.id]
            for value in values:
                if value in words or any(f"builtin_backends.{b}" in value for b in builtins):
                    offending.append(f"{path.name}:{node.lineno}: {value!r}")
    assert not offending, "core modules name built-in backends:\n" + "\n".join(offending)


def _is_docstring(node: ast.Constant, path: Path) -> bool:
    return "\n" in node.value or len(node.value) > 60
