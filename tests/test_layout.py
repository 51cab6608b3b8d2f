"""Architecture rules of DESIGN.md section 2, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["structlora", "pipeline", "data", "eval", "app"]

# package -> top-level modules it must never import
FORBIDDEN = {
    "structlora": {"pipeline", "data", "eval", "app", "transformers", "accelerate", "timm", "webdataset", "gradio"},
    "data": {"structlora", "pipeline", "eval", "app"},
    "eval": {"structlora", "pipeline", "app"},
    "app": {"structlora", "accelerate", "pipeline"},
}
# structlora may import peft only lazily (inside a function), for export
LAZY_ONLY = {"structlora": {"peft"}}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module.split(".")[0], top))
            visit(child, inner)

    visit(tree, True)
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_boundaries(package):
    bad = [f"{f.relative_to(ROOT)} imports {mod}" for f in _files(package) for mod, _ in _imports(f)
           if mod in FORBIDDEN[package]]
    assert not bad, bad


@pytest.mark.parametrize("package", sorted(LAZY_ONLY))
def test_lazy_only_imports(package):
    bad = [f"{f.relative_to(ROOT)} imports {mod} at module level" for f in _files(package)
           for mod, top in _imports(f) if mod in LAZY_ONLY[package] and top]
    assert not bad, bad


def test_structlora_depends_on_torch_and_safetensors_only():
    import sys

    allowed = set(sys.stdlib_module_names) | {"torch", "safetensors", "structlora", "peft", "__future__"}
    bad = [f"{f.relative_to(ROOT)} imports {mod}" for f in _files("structlora") for mod, _ in _imports(f)
           if mod not in allowed]
    assert not bad, bad


# most lines a file may have: product modules 350, tests and benchmarks 450
LINE_LIMITS = {**dict.fromkeys(PACKAGES, 350), "tests": 450, "bench": 450}


def test_no_file_is_huge():
    big = [f"{f.relative_to(ROOT)}: {n} lines (limit {limit})" for pkg, limit in LINE_LIMITS.items()
           for f in _files(pkg) if (n := len(f.read_text(encoding="utf-8").splitlines())) > limit]
    assert not big, f"split these by responsibility: {big}"


def _module_imports(path: Path) -> set[str]:
    """Dotted first-party modules a file imports, at any depth (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_import_cycle_between_modules():
    """A module never imports (even lazily) one that imports it back, through any chain: the
    stages import pipeline.context, and only the runner knows every stage."""
    modules = {".".join(f.relative_to(ROOT).with_suffix("").parts): f for pkg in PACKAGES for f in _files(pkg)}
    graph = {name: {m for m in _module_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, [*stack, nxt], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], done)
    assert not cycles, cycles
