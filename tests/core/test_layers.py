"""The layers of docs/ARCHITECTURE.md, enforced on the import statements of every module of
robustdeq/ (imports inside functions included): a lower layer never imports a higher one."""
from __future__ import annotations

import ast
from pathlib import Path

import robustdeq

ROOT = Path(robustdeq.__file__).parent

#: the foundation: errors, configs, registries, guards, tensor helpers, data, process groups
CORE = {"robustdeq", "errors", "config", "registry", "guard", "_tensor", "_support", "data",
        "distributed", "runlock"}
LAYERED = {"deq", "attacks", "certify", "defenses", "eval", "checkpoint", "train", "federated",
           "interop", "demo", "cli", "__main__"}
_ABOVE_DEQ = LAYERED - {"deq"}

#: unit -> the units it must not import (anything else of robustdeq is allowed)
FORBIDDEN = {
    **{core: LAYERED for core in CORE},
    "deq": _ABOVE_DEQ,
    "interop": _ABOVE_DEQ,
    "checkpoint": _ABOVE_DEQ,
    "attacks": _ABOVE_DEQ - {"interop"},
    "certify": _ABOVE_DEQ - {"checkpoint", "interop"},
    "defenses": {"eval", "checkpoint", "train", "federated", "cli"},
    "eval": {"defenses", "train", "federated", "cli"},
    "train": {"eval", "federated", "cli"},
    "federated": {"cli"},
    "demo": {"federated", "cli"},
}
#: the registry names every built-in by a "module:attribute" string; it imports only the errors
REGISTRY_IMPORTS = {"errors"}

#: known exceptions, each with its reason (none at present)
EXCEPTIONS: dict = {}


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "robustdeq"
    head = parts[1]
    return head if (ROOT / head).is_dir() or (ROOT / f"{head}.py").is_file() else "robustdeq"


def imports(path: Path, root: Path = ROOT):
    """``(line, module)`` for every import of robustdeq in ``path`` (a file under ``root``, the
    robustdeq folder), at any depth: inside functions, classes and ``if`` blocks too."""
    rel = path.relative_to(root.parent).with_suffix("").parts
    package = rel[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "robustdeq":
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                if node.module:
                    yield node.lineno, ".".join(base + [node.module])
                else:
                    for a in node.names:
                        yield node.lineno, ".".join(base + [a.name])
            elif node.module and node.module.split(".")[0] == "robustdeq":
                yield node.lineno, node.module


def edges():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        src = _unit(mod)
        for line, target in imports(path):
            yield src, _unit(target), f"{path.relative_to(ROOT.parent)}:{line}", mod


def test_the_import_table_is_respected():
    known = CORE | LAYERED
    bad = []
    units = set()
    for src, dst, where, mod in edges():
        units.add(src)
        if dst != src and dst in FORBIDDEN.get(src, ()) and (src, dst) not in EXCEPTIONS:
            bad.append(f"{where}: {src} imports {dst}")
        if mod == "robustdeq.registry" and dst not in REGISTRY_IMPORTS:
            bad.append(f"{where}: the registry imports {dst} (it names built-ins by string only)")
    assert not bad, "layer violations:\n" + "\n".join(bad)
    # a new top-level module or package must be placed in the table
    assert units <= known, f"add {sorted(units - known)} to the layer table of {__file__}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "robustdeq" / "deq" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text("import robustdeq.errors\n"
                                "from . import sibling\n"
                                "class A:\n"
                                "    def f(self):\n"
                                "        if True:\n"
                                "            from ...certify.api import certify\n"
                                "        from robustdeq.eval import evaluate\n")
    found = sorted(t for _, t in imports(pkg / "mod.py", tmp_path / "robustdeq"))
    assert found == ["robustdeq.certify.api", "robustdeq.deq.sub.sibling", "robustdeq.errors",
                     "robustdeq.eval"]
    assert _unit("robustdeq.certify.api") == "certify" and "certify" in FORBIDDEN["deq"]
