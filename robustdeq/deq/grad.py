"""Gradient estimators: how the loss gradient flows through the fixed point.

An estimator turns the (detached) solver output ``z*`` into a tensor with the value of an
equilibrium state and a gradient path to the injection ``u`` (hence to ``x``) and to the
parameters of the cell. It is chosen per model (``DEQClassifier(grad=...)``) and overridden per
call without touching ``train()``/``eval()``::

    with robustdeq.gradient(model, UnrolledGrad(steps=8)):
        loss(model(x), y).backward()

=================  ====================================================================
``ImplicitGrad``   exact (IFT): solves the adjoint ``a = J^T a + g`` with its own solver
``PhantomGrad``    k damped steps ``z <- (1 - tau) z + tau f(z)`` from detached z*
``UnrolledGrad``   ``steps`` plain steps from a recorded state (default: from z*)
``FullBackprop``   autograd through every solver iteration (memory grows with iterations)
``NoGrad``         the state is detached; no gradient reaches ``x`` or the parameters
=================  ====================================================================
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .._support import user_stacklevel
from ..config import BACKWARD_DEFAULT, SolverConfig, from_dict
from ..errors import ConfigError, NonConvergenceWarning
from ..registry import ESTIMATORS

logger = logging.getLogger(__name__)

CellFn = Callable[[Tensor, Tensor], Tensor]


class GradientEstimator:
    """Base class. ``attach(f, u, z_star, trajectory)`` returns the state used for the read-out."""

    #: the forward solve must keep the autograd graph (full backpropagation)
    full_graph: bool = False

    def required_record(self) -> List[int]:
        """Trajectory steps the forward solve must record for this estimator."""
        return []

    def attach(self, f: CellFn, u: Tensor, z_star: Tensor,
               trajectory: Optional[list] = None) -> Tensor:  # pragma: no cover
        """The state handed to the read-out: the value of the equilibrium ``z_star`` (computed
        without autograd) with this estimator's gradient path to ``u`` and the parameters of
        ``f``.

        Args:
            f: the cell ``f(z, u)``.
            u: the input injection (carries the graph to ``x``).
            z_star: the solver's output, detached or not.
            trajectory: the recorded :class:`~robustdeq.deq.solvers.TrajectoryState` list of the
                forward solve (what :meth:`required_record` asked for).
        """
        raise NotImplementedError

    def describe(self) -> dict:
        """The estimator's name and public settings as a JSON-ready dict (a solver config is
        given by its solver's name)."""
        d = {"name": type(self).__name__}
        d.update({k: (v if not isinstance(v, SolverConfig) else v.name.value)
                  for k, v in vars(self).items() if not k.startswith(("_", "last_"))})
        return d

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith(("_", "last_")))
        return f"{type(self).__name__}({args})"


class ImplicitGrad(GradientEstimator):
    """Implicit-function-theorem gradient (Bai, Kolter & Koltun, NeurIPS 2019).

    The output is ``f(z*, u)`` (one extra evaluation, carrying the graph to ``u`` and the
    parameters); a backward hook replaces its upstream gradient ``g`` by the solution ``a`` of the
    adjoint fixed point ``a = J^T a + g``, ``J = df/dz`` at z*, solved with ``solver`` (vector-
    Jacobian products from the cell's closed form ``vjp_at`` where it has one, else through one
    retained call of ``f``). Memory does not grow with iterations.

    The vector-Jacobian products are built in :meth:`attach`, at the forward, from the weights in
    force there (the closed form captures the cell's weight; the autograd path a retained call of
    ``f``): the backward, which runs after the forward returned, computes no weight of its own.
    ``DEQClassifier.run`` computes each parametrised weight once per call, so the solve, ``f(z*,
    u)`` and the adjoint all use one weight (one power-iteration step of a spectral
    normalisation in train mode).
    """

    def __init__(self, solver: SolverConfig | dict | None = None):
        self.solver = from_dict(SolverConfig, solver) if solver is not None else BACKWARD_DEFAULT
        self.last_backward = None  # SolveResult of the latest adjoint solve (diagnostics)
        self._warned = False

    def attach(self, f, u, z_star, trajectory=None):
        """``f(z*, u)`` with a backward hook that solves the adjoint fixed point (see the class);
        without autograd (or when the output needs no gradient) the plain evaluation."""
        z_star = z_star.detach()
        z_out = f(z_star, u)
        if not (torch.is_grad_enabled() and z_out.requires_grad):
            return z_out
        if getattr(f, "has_vjp", False):  # the cell's closed-form vector-Jacobian product
            vjp = f.vjp_at(z_star, u)
        else:
            z0 = z_star.clone().requires_grad_(True)
            with torch.enable_grad():
                f0 = f(z0, u.detach())

            def vjp(a: Tensor, c: Tensor) -> Tensor:
                return torch.autograd.grad(f0, z0, a, retain_graph=True)[0] + c
        from .solvers import get_solver  # local import: solvers <-> grad are peers
        solver = get_solver(self.solver)
        est = self

        def hook(grad: Optional[Tensor]) -> Optional[Tensor]:
            if grad is None:  # undefined upstream gradient: nothing to transform
                return None
            grad_d = grad.detach()

            def adjoint_map(a: Tensor) -> Tensor:
                return vjp(a, grad_d)
            with torch.no_grad():
                res = solver.solve(adjoint_map, est.initial_adjoint(grad))
            est.last_backward = res
            if not bool(res.converged.all()) and not est._warned:
                est._warned = True
                warnings.warn(
                    f"implicit backward: adjoint solve did not converge for "
                    f"{int((~res.converged).sum())}/{res.converged.numel()} samples "
                    f"(max residual {float(res.residual.max()):.2e}, tol {solver.config.tol:g}); "
                    "further warnings from this estimator are suppressed",
                    NonConvergenceWarning, stacklevel=user_stacklevel())
            return res.z

        z_out.register_hook(hook)
        return z_out

    def initial_adjoint(self, grad: Tensor) -> Tensor:
        """Where the adjoint solve starts (the upstream gradient; subclasses may warm-start)."""
        return grad.detach()


class PhantomGrad(GradientEstimator):
    """Phantom gradient (Geng et al., "On Training Implicit Models", NeurIPS 2021): ``k`` damped
    steps from detached z*, backpropagated."""

    def __init__(self, k: int = 5, tau: float = 0.5):
        if k < 1:
            raise ConfigError(f"PhantomGrad.k must be >= 1, got {k}")
        if not 0 < tau <= 1:
            raise ConfigError(f"PhantomGrad.tau must be in (0, 1], got {tau}")
        self.k, self.tau = int(k), float(tau)

    def attach(self, f, u, z_star, trajectory=None):
        """``k`` damped steps of ``f(., u)`` from the detached ``z_star``, with autograd."""
        z = z_star.detach()
        for _ in range(self.k):
            z = (1 - self.tau) * z + self.tau * f(z, u) if self.tau != 1 else f(z, u)
        return z


class UnrolledGrad(GradientEstimator):
    """``steps`` undamped steps ``z <- f(z, u)`` with autograd, from the recorded state
    ``from_state`` (a trajectory step index) or from z* when ``from_state`` is None."""

    def __init__(self, steps: int = 8, from_state: Optional[int] = None):
        if steps < 1:
            raise ConfigError(f"UnrolledGrad.steps must be >= 1, got {steps}")
        if from_state is not None and from_state < 0:
            raise ConfigError(f"UnrolledGrad.from_state must be >= 0, got {from_state}")
        self.steps, self.from_state = int(steps), from_state

    def required_record(self):
        """``[from_state]`` when set (that state must be recorded), else ``[]``."""
        return [] if self.from_state is None else [self.from_state]

    def attach(self, f, u, z_star, trajectory=None):
        """``steps`` steps of ``f(., u)`` with autograd from the detached recorded state
        ``from_state`` (from ``z_star`` when it is None); a ``ConfigError`` if that state is not
        in ``trajectory``."""
        if self.from_state is None:
            z = z_star.detach()
        else:
            match = [t for t in (trajectory or []) if t.step == self.from_state]
            if not match:
                raise ConfigError(f"UnrolledGrad(from_state={self.from_state}): state not recorded")
            z = match[0].z.detach()
        for _ in range(self.steps):
            z = f(z, u)
        return z


class FullBackprop(GradientEstimator):
    """Backpropagation through every iteration of the forward solver (reference / checks)."""

    full_graph = True

    def attach(self, f, u, z_star, trajectory=None):
        """``z_star`` itself: the forward solve kept the graph of every iteration."""
        return z_star


class NoGrad(GradientEstimator):
    """No gradient: the equilibrium is detached from ``u`` and the parameters."""

    def attach(self, f, u, z_star, trajectory=None):
        """``z_star`` detached."""
        return z_star.detach()


def make_estimator(spec, **options) -> GradientEstimator:
    """An estimator from an instance or a name of :data:`robustdeq.registry.ESTIMATORS` (``ift``,
    ``phantom``, ``unrolled``, ``full``, ``none`` or a registered one)."""
    if isinstance(spec, GradientEstimator):
        if options:
            raise ConfigError("options given together with an estimator instance")
        return spec
    if not isinstance(spec, str) or spec not in ESTIMATORS:
        raise ConfigError(f"unknown gradient estimator {spec!r}; expected one of {', '.join(ESTIMATORS)}")
    try:
        return ESTIMATORS.get(spec)(**options)
    except TypeError as e:
        raise ConfigError(f"bad options for gradient estimator {spec!r}: {e}") from None


@contextlib.contextmanager
def gradient(model: nn.Module, estimator):
    """Override the gradient estimator of every DEQ inside ``model`` for the ``with`` block."""
    est = make_estimator(estimator)
    targets = [m for m in model.modules() if hasattr(m, "_grad_stack")]
    if not targets:
        raise ConfigError(f"{type(model).__name__} contains no DEQ whose gradient can be chosen")
    for m in targets:
        m.check_estimator(est)
        m._grad_stack.append(est)
    try:
        yield est
    finally:
        for m in targets:
            m._grad_stack.pop()


__all__ = ["GradientEstimator", "ImplicitGrad", "PhantomGrad", "UnrolledGrad", "FullBackprop",
           "NoGrad", "make_estimator", "gradient"]
