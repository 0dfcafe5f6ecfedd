"""The package's layers, read from its import statements (no imports are executed).

``tokenring`` is layered (docs/architecture.md): the shared vocabulary
(``options``), the schedules as data (pure), a call's description (pure), running
schedules on tensors (``execution``), the cost model (``planner``), the state kept
between calls (``runtime``), the front door (``api``) and the model integrations.
A module may import only from its own layer or the ones below, so there are no
import circles, and the pure layers never reach process-wide state.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "tokenring"

LAYERS = {
    "options": 0,
    "schedules": 1,
    "call": 2,
    "execution": 3,
    "planner": 4,
    "runtime": 4,
    "api": 5,
    "integrations": 6,
    "": 7,  # tokenring/__init__.py: re-exports the front door
}
PURE = ("schedules", "call")
"""Layers that must not import process-wide state, torch.distributed or the layers above."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports (absolute names), skipping ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    here = _module_name(path)
    package = here if _is_package(path) else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            found.add(root)
            for alias in node.names:  # `from . import x` may name a submodule
                found.add(f"{root}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SOURCE.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_go_down_the_layers():
    wrong = [
        f"{module} ({_layer(module) or 'tokenring'}) imports {target} ({_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if LAYERS[_layer(target)] > LAYERS[_layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("layer", PURE)
def test_pure_layers_use_no_process_state(layer):
    """Schedules and call descriptions are data: no torch.distributed, no runtime."""
    for path in (SOURCE / layer).rglob("*.py"):
        imports = _imports(path)
        bad = {m for m in imports if m.startswith(("torch.distributed", "tokenring.runtime"))}
        assert not bad, f"{path.relative_to(SOURCE)} imports {sorted(bad)}"


def test_every_module_sits_in_a_known_layer():
    unknown = {m for m in _graph() if _layer(m) not in LAYERS}
    assert not unknown, f"modules outside the layers of docs/architecture.md: {sorted(unknown)}"
