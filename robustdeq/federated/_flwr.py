"""Lazy access to Flower (``flwr``), an optional dependency (the ``federated`` extra)."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import RobustDEQError

__all__ = ["MissingExtraError", "require_flwr", "INSTALL_HINT"]

INSTALL_HINT = 'pip install -e ".[federated]"  (or: pip install "robustdeq[federated]")'


class MissingExtraError(RobustDEQError, ImportError):
    """An optional dependency of robustdeq is not installed."""


def require_flwr() -> ModuleType:
    """Import and return ``flwr``, or raise :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module("flwr")
    except ImportError as exc:
        raise MissingExtraError(
            "robustdeq.federated needs Flower (flwr with its simulation extra), which is not "
            f"installed: install robustdeq's 'federated' extra: {INSTALL_HINT} ({exc})"
        ) from exc
