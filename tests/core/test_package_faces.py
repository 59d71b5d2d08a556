"""Every package face follows one pattern: a docstring with a table of what is inside, an
explicit ``__all__`` (a literal list or built from a literal table) of public names that all
resolve, and no private name exported."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import robustdeq

ROOT = Path(robustdeq.__file__).parent
PACKAGES = sorted(".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_face(package):
    path = ROOT.parent.joinpath(*package.split("."), "__init__.py")
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and doc.strip(), f"{package}: no docstring"
    assigned = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                and any(getattr(t, "id", None) == "__all__" for t in getattr(n, "targets", [getattr(n, "target", None)]))]
    assert assigned, f"{package}: no explicit __all__"
    if package.startswith("robustdeq.federated"):
        pytest.importorskip("flwr")
    mod = importlib.import_module(package)
    names = list(mod.__all__)
    assert len(names) == len(set(names)), f"{package}: duplicates in __all__"
    private = [n for n in names if n.startswith("_") and n != "__version__"]
    assert not private, f"{package} exports private names {private}"
    for name in names:
        assert getattr(mod, name) is not None or name in ("__version__",), f"{package}.{name}"
