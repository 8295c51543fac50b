"""The one-way dependency rule: book -> experiments -> methods -> train -> models, data (metrics pure)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ubwlib"

#: A module may import only from modules of the same or a lower rank.
RANK = {
    "_paths": 0, "cache": 0, "data": 0, "models": 0, "metrics": 0,
    "train": 1, "stacked": 1,
    "remote": 1, "onnx_model": 1,
    "watermarks": 2, "verify": 2, "defenses": 2, "forgery": 2, "publish": 2, "serve": 2,
    "experiments": 3,
    "book": 4, "bench": 4, "devicecheck": 4, "cli": 4, "sphinx_ext": 4, "__init__": 4,
}


def _top(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_tops(path: Path, source: str | None = None) -> set[str]:
    tree = ast.parse(path.read_text() if source is None else source)
    depth_of_pkg = len(path.relative_to(PKG).parts) - 1  # 0 for ubwlib/x.py, 1 for ubwlib/sub/x.py
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "ubwlib":
                    parts = node.module.split(".")[1:]
                    out.add(parts[0] if parts else "__init__")
                continue
            up = node.level - 1  # levels above the module's own package
            if up > depth_of_pkg:
                continue
            if up == depth_of_pkg:  # resolves to the ubwlib package itself
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out.update(alias.name for alias in node.names)
            else:  # inside the same subpackage
                out.add(_top(path))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ubwlib" and len(parts) > 1:
                    out.add(parts[1])
    return out


MODULES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_one_way(path):
    me = _top(path)
    for other in _imported_tops(path):
        if other == me or other not in RANK:
            continue
        assert RANK[other] <= RANK[me], f"{path.relative_to(PKG)} ({me}) imports {other}, a higher layer"


def test_metrics_are_pure():
    """metrics imports nothing from ubwlib (and no torch): pure functions of predictions and labels."""
    assert _imported_tops(PKG / "metrics.py") == set()
    tree = ast.parse((PKG / "metrics.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in names


def test_the_rule_detects_upward_imports():
    assert "experiments" in _imported_tops(PKG / "train.py", "from .experiments import get_profile\n")
    assert "experiments" in _imported_tops(PKG / "watermarks" / "base.py", "from ..experiments import core\n")
    assert "watermarks" in _imported_tops(PKG / "watermarks" / "base.py", "from .patch import blend\n")
    assert "train" in _imported_tops(PKG / "models.py", "import ubwlib.train\n")
