"""User registrations (solvers, recipes, objectives, models, attacks, datasets...) in the clients.

Flower's simulation engine runs every client in a worker process of its own, which imports
robustdeq afresh: a solver or recipe registered in the driver with ``register_solver`` /
``register_recipe`` is not registered there. The server therefore sends, with the model, a
reference to every user registration (registry, name and the ``module:qualname`` of the
registered object, plus the driver's import path), and the ``ClientApp`` imports and registers
them again before it reads the run's settings (:func:`install`).

Only objects that can be imported by name can travel this way. A registration used by the run
(its solver, recipe, model, dataset, or a name in its options) whose object cannot (defined in
``__main__``, inside a function, or not an importable module attribute) is refused before the
first round with an error saying why (:func:`user_registrations`); others are left out with a
debug message.
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
from typing import Any, Dict, List, Optional, Set

from ..errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["user_registrations", "install", "REGISTRATIONS_KEY"]

REGISTRATIONS_KEY = "robustdeq-registrations"

# the registries of robustdeq.registry that clients may look names up in
_REGISTRIES = ("SOLVERS", "ESTIMATORS", "RECIPES", "OBJECTIVES", "MODELS", "ATTACKS", "ATTACK_SPECS", "SUITES",
               "DATASETS", "WRAPPERS")


def _reference(obj: Any) -> Optional[str]:
    """``module:qualname`` that imports back to ``obj`` in a fresh process, or None (with the
    reason in the caller's message)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    if module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        return None
    return f"{module}:{qualname}"


def _resolve(ref: str) -> Any:
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _why_not(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module == "__main__":
        return "it is defined in __main__ (a script or an interactive session)"
    if isinstance(qualname, str) and ("<locals>" in qualname or "<lambda>" in qualname):
        return "it is defined inside a function (or is a lambda)"
    if not isinstance(qualname, str):
        return f"it is a {type(obj).__name__} instance, not a module-level function or class"
    return "it cannot be imported back by its name"


def _used_names(cfg) -> Dict[str, Set[str]]:
    """Names the run looks up, per registry (options' string values count as possible names)."""
    strings: Set[str] = set()

    def walk(v):
        if isinstance(v, str):
            strings.add(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(dict(cfg.defense_options))
    walk(dict(cfg.model_options))
    return {"SOLVERS": {cfg.solver} | strings, "ESTIMATORS": strings, "RECIPES": {cfg.defense},
            "MODELS": {cfg.model, cfg.recipe_model} | strings, "DATASETS": {cfg.dataset},
            "OBJECTIVES": strings, "ATTACKS": strings, "ATTACK_SPECS": strings, "SUITES": set(),
            "WRAPPERS": strings}


def user_registrations(cfg) -> str:
    """JSON list of the user registrations to re-create in the clients, with the import path.

    Raises:
        ConfigError: a registration the run uses cannot be imported by name in another process.
    """
    from .. import registry
    used = _used_names(cfg)
    entries: List[Dict[str, Any]] = []
    for reg_name in _REGISTRIES:
        reg = getattr(registry, reg_name)
        for name in reg.names():
            if reg.is_builtin(name):
                continue
            obj = reg.get(name)
            if reg_name == "DATASETS":  # a data.Dataset record: its loader is what is imported
                obj = obj.loader
            ref = _reference(obj)
            ok = False
            if ref is not None:
                try:
                    ok = _resolve(ref) is obj
                except Exception:  # noqa: BLE001 - any failure means: not importable by name
                    ok = False
            if not ok:
                if name in used[reg_name]:
                    raise ConfigError(
                        f"{reg.kind} {name!r} is registered in this process only: {_why_not(obj)}, "
                        "so Flower's client processes cannot import it; define it at module level "
                        "in an importable module (and register it there) to use it in federate")
                logger.debug("registration %s %r not sent to the clients (%s)", reg.kind, name, _why_not(obj))
                continue
            entry = {"registry": reg_name, "name": name, "ref": ref}
            if reg_name == "DATASETS":
                from ..data import dataset_info
                info = dataset_info(name)
                entry["shape"] = list(info["shape"])
                entry["num_classes"] = int(info["num_classes"])
            entries.append(entry)
    return json.dumps({"entries": entries, "path": [p for p in sys.path if isinstance(p, str)]})


def install(payload: str) -> int:
    """Register (again) in this process the entries of :func:`user_registrations` (importing a
    module may register its entries itself); returns how many entries are in place. The driver's
    import path is appended to ``sys.path`` first."""
    from .. import registry
    data = json.loads(payload) if payload else {"entries": [], "path": []}
    for p in data.get("path", []):
        if p not in sys.path:
            sys.path.append(p)
    added = 0
    for e in data.get("entries", []):
        reg = getattr(registry, e["registry"])
        try:
            obj = _resolve(e["ref"])
        except Exception as exc:  # noqa: BLE001 - name the registration, keep the cause
            raise ConfigError(f"{reg.kind} {e['name']!r}: cannot import {e['ref']} in this client "
                              f"process ({type(exc).__name__}: {exc})") from exc
        current = reg.get(e["name"]) if e["name"] in reg and not reg.is_builtin(e["name"]) else None
        if e["registry"] == "DATASETS" and current is not None:
            current = current.loader
        if current is obj:
            added += 1
            continue
        if e["registry"] == "SOLVERS":
            from ..deq.solvers import register_solver
            register_solver(e["name"], obj, replace=True)
        elif e["registry"] == "MODELS":
            from ..deq import zoo
            zoo.register(e["name"], replace=True)(obj)
        elif e["registry"] == "DATASETS":
            from ..data import register_dataset
            register_dataset(e["name"], obj, shape=e["shape"], num_classes=e["num_classes"], replace=True)
        else:
            reg.register(e["name"], obj, replace=True)
        added += 1
    return added
