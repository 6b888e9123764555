"""The package's layers (docs/architecture.md), read from its imports with ``ast``: each module
imports only from its own layer or below, and no import cycle exists, type-only and
function-level imports included."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Layer of each module, by the longest matching name prefix.
LAYERS = {
    "adan.numeric": 0,
    "adan.state": 1,
    "adan.kernels": 2,
    "adan.checks": 3, "adan.stepping": 3,
    "adan.release": 4, "adan.distributed": 4, "adan.checkpoint": 4,
    "adan.optimizer": 5,
    "adan": 6,  # the package, the CLI, the demo, the optax port
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")),
               key=len)
    return LAYERS[best]


def _imports(path: Path, module: str) -> set[str]:
    """Every ``adan`` module ``path`` imports, wherever the import statement stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == "adan" or n.startswith("adan."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.joinpath("adan").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # ``from adan.x import y`` names a module x.y where it exists, else x itself
        graph[name] = {target for target in _imports(path, name) if target in modules} - {name}
    return graph


def test_every_module_has_a_layer():
    assert all(_layer(name) is not None for name in _graph())


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [(m, t) for m, targets in _graph().items() for t in targets
              if _layer(t) > _layer(m) and not (m.startswith(t + ".") or t == "adan")]
    assert upward == []


def test_no_import_cycle():
    """Parent packages are left out: ``import adan.state.formats`` runs ``adan/state``'s
    ``__init__`` first, which is Python's order, not a dependency of ours."""
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in _graph().items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_release_uses_nothing_private_of_the_optimizer():
    """Gradient release reaches the optimizer only through torch's public attributes."""
    tree = ast.parse(SRC.joinpath("adan", "release.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "adan.optimizer" not in imported

    def is_optimizer(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == "opt") or (
            isinstance(node, ast.Attribute) and node.attr == "opt")

    private = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
               and n.attr.startswith("_") and not n.attr.startswith("__")
               and is_optimizer(n.value)]
    assert private == []


def test_the_layer_check_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a kernel importing the optimizer is caught."""
    fake = tmp_path / "adan"
    (fake / "kernels").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "optimizer.py").write_text("from adan.kernels import bad\n")
    (fake / "kernels" / "__init__.py").write_text("")
    (fake / "kernels" / "bad.py").write_text("from adan.optimizer import Adan\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    with pytest.raises(AssertionError):
        test_no_module_imports_from_a_layer_above_its_own()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
