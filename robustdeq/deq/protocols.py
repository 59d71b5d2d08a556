"""What "a DEQ" means to the rest of the package, as structural types (no attribute probing).

- :class:`TrajectoryModel`: a model with a state trajectory (a DEQ or a weight-tied network):
  ``inject(x) -> u``, ``run(x, record=...)``, ``unroll(u, z, steps)`` and ``readout(z) -> logits``;
- :class:`FixedPointModel`: a model with a fixed-point solve (``DEQClassifier`` and its
  subclasses): additionally ``f(z, u)``, ``solve(u, z0=...)`` and ``init_state(u)``;
- :class:`SolverModel`: a fixed-point model that also exposes its ``cell``, ``solver_config`` and
  gradient ``estimator`` (what code that runs the model's solve with its own estimator needs);
- :class:`IteratingModel`: a fixed-point model that returns its solver's n-th iterate.

All are ``runtime_checkable``: ``isinstance(model, FixedPointModel)`` checks the members by name.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class TrajectoryModel(Protocol):
    def inject(self, x: Tensor) -> Tensor: ...
    def run(self, x: Tensor, **kwargs: Any) -> Any: ...
    def unroll(self, u: Tensor, z: Tensor, steps: int, **kwargs: Any) -> Tensor: ...
    def readout(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class FixedPointModel(Protocol):
    def inject(self, x: Tensor) -> Tensor: ...
    def run(self, x: Tensor, **kwargs: Any) -> Any: ...
    def readout(self, z: Tensor) -> Tensor: ...
    def f(self, z: Tensor, u: Tensor) -> Tensor: ...
    def solve(self, u: Tensor, **kwargs: Any) -> Any: ...
    def init_state(self, u: Tensor) -> Tensor: ...


@runtime_checkable
class SolverModel(FixedPointModel, Protocol):
    cell: Any
    solver_config: Any
    estimator: Any


@runtime_checkable
class IteratingModel(FixedPointModel, Protocol):
    """A fixed-point model that can return its solver's n-th iterate (``iterates(u, n)``)."""

    solver_config: Any

    def iterates(self, u: Tensor, n: Tensor) -> Tensor: ...


def is_fixed_point_model(model: Any) -> bool:
    """``isinstance(model, FixedPointModel)``."""
    return isinstance(model, FixedPointModel)


def is_trajectory_model(model: Any) -> bool:
    """``isinstance(model, TrajectoryModel)``."""
    return isinstance(model, TrajectoryModel)


def find_fixed_point_model(model: Any):
    """The :class:`~robustdeq.deq.model.DEQClassifier` of ``model`` (itself, or its first
    submodule that is one), or None."""
    from .model import DEQClassifier
    if isinstance(model, DEQClassifier):
        return model
    for m in getattr(model, "modules", lambda: [])():
        if isinstance(m, DEQClassifier):
            return m
    return None


__all__ = ["TrajectoryModel", "FixedPointModel", "SolverModel", "IteratingModel", "is_fixed_point_model",
           "is_trajectory_model", "find_fixed_point_model"]
