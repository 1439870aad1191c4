"""The package's import graph is one-way: no module imports back into a module that imports it (directly or not),
and backends only pick kernels and run graphs (they import neither the pipeline nor the passes)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "zqcompile"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (type-only imports are no dependency)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph() -> nx.DiGraph:
    """Edges module -> zqcompile module it imports, from every import statement (function-level ones too).
    ``from zqcompile.x import y`` counts as importing ``zqcompile.x.y`` when that is a module, else ``zqcompile.x``;
    the parent packages a submodule import initialises are not counted as dependencies."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for target in targets:
                if target in modules and target != name:
                    graph.add_edge(name, target)
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30  # every module was read
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], f"import cycles: {cycles}"


def test_backends_import_neither_the_pipeline_nor_the_passes():
    graph = import_graph()
    backends = [m for m in graph if m == "zqcompile.backends" or m.startswith("zqcompile.backends.")]
    reached = set().union(*(nx.descendants(graph, m) for m in backends))
    assert "zqcompile.pipeline" not in reached
    assert not [m for m in reached if m.startswith("zqcompile.passes")]
    assert "zqcompile.ops" in reached  # the check sees the backends' imports (they register kernels of the ops)
