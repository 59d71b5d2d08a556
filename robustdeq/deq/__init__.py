"""The shared DEQ backbone: solvers, gradient estimators, cells, models and the model zoo.

Every public name of the submodules is available here (``from robustdeq.deq import MLPCell``),
imported on first use.
"""
from __future__ import annotations

import importlib

_MODULES = ("solvers", "grad", "cells", "model", "weight_tied", "views", "zoo", "multiscale",
            "regularizers")
_SUBMODULES = set(_MODULES)


def _index() -> dict:
    out = {}
    for name in _MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ImportError:  # an optional piece that is not there
            continue
        for attr in getattr(mod, "__all__", ()):
            out.setdefault(attr, mod)
    return out


_NAMES: dict = {}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if not _NAMES:
        _NAMES.update(_index())
    mod = _NAMES.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    if not _NAMES:
        _NAMES.update(_index())
    return sorted(set(globals()) | set(_NAMES) | _SUBMODULES)
