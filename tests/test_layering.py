"""The package's imports run one way (DESIGN "Imports run one way"), counting imports inside functions.

Floors, bottom to top: ``errors``/``files`` → ``quant``, ``models`` → ``data``, ``loading``,
``hf_integration``, ``eval``, ``training``, ``export`` → the package's API (``paretoq/__init__``, ``registration``),
``sweep``, ``demo``, ``assets`` → ``cli``.
A module may import its own floor or a lower one, never a higher one; and no two modules import
each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "paretoq"

FLOORS = [
    {"errors", "files"},
    {"quant", "models"},
    {"data", "loading", "hf_integration", "eval", "training", "export"},
    {"__init__", "registration", "sweep", "demo", "assets", "allocate"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = ["paretoq", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The paretoq modules ``path`` imports anywhere (top level or inside functions)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from paretoq.quant import config` imports the module paretoq.quant.config;
            # `from paretoq.quant import QuantConfig` imports paretoq.quant
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"  # the package itself: its public API
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_is_on_a_floor_and_imports_only_its_floor_or_lower():
    upward = [f"{a} imports {b}" for a, deps in graph().items() for b in sorted(deps) if floor(b) > floor(a)]
    assert upward == []


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_the_checker_sees_imports_inside_functions_and_finds_cycles():
    """Negative controls: a function-level import counts, and a two-module loop is a cycle."""
    source = "def f():\n    from paretoq.cli import main\n"
    tree_file = SRC / "quant" / "functional.py"
    modules = {"paretoq.cli", "paretoq.quant.functional"}
    fake = tree_file.with_name("_layering_probe.py")
    try:
        fake.write_text(source)
        assert imports_of(fake, modules) == {"paretoq.cli"}
    finally:
        fake.unlink()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("pattern", ["torch._C", "torch._dynamo", "_debug_get_cache_entry"])
def test_no_private_torch_internals(pattern):
    hits = [f"{p.relative_to(SRC)}" for p in SRC.rglob("*.py") if pattern in p.read_text()]
    assert hits == []
