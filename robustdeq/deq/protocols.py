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
    """A model with a state trajectory (a DEQ or a weight-tied network)."""

    def inject(self, x: Tensor) -> Tensor:
        """The input injection ``u`` of ``x``."""
        ...

    def run(self, x: Tensor, **kwargs: Any) -> Any:
        """The forward pass with its state, trajectory and statistics."""
        ...

    def unroll(self, u: Tensor, z: Tensor, steps: int, **kwargs: Any) -> Tensor:
        """``steps`` applications of the map from the state ``z``."""
        ...

    def readout(self, z: Tensor) -> Tensor:
        """Logits of a state ``z``."""
        ...


@runtime_checkable
class FixedPointModel(Protocol):
    """A model whose state is the fixed point of ``f(., u)``, found by a solve."""

    def inject(self, x: Tensor) -> Tensor:
        """The input injection ``u`` of ``x``."""
        ...

    def run(self, x: Tensor, **kwargs: Any) -> Any:
        """The forward pass with its fixed point, trajectory and statistics."""
        ...

    def readout(self, z: Tensor) -> Tensor:
        """Logits of a state ``z``."""
        ...

    def f(self, z: Tensor, u: Tensor) -> Tensor:
        """The equilibrium map ``f(z, u)``."""
        ...

    def solve(self, u: Tensor, **kwargs: Any) -> Any:
        """The solve of ``z = f(z, u)``."""
        ...

    def init_state(self, u: Tensor) -> Tensor:
        """The state the solve starts from."""
        ...


@runtime_checkable
class SolverModel(FixedPointModel, Protocol):
    """A fixed-point model that also exposes its ``cell``, ``solver_config`` and ``estimator``."""

    cell: Any
    solver_config: Any
    estimator: Any


@runtime_checkable
class IteratingModel(FixedPointModel, Protocol):
    """A fixed-point model that can return its solver's n-th iterate (``iterates(u, n)``)."""

    solver_config: Any

    def iterates(self, u: Tensor, n: Tensor) -> Tensor:
        """Per sample ``b``, the solver's ``n[b]``-th iterate ``z_n`` from the initial state
        ``z_0`` (after ``n`` steps, no early stop; see :meth:`DEQClassifier.iterates`)."""
        ...


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
