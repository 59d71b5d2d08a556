"""Warm starts of a DEQ's solves across a sequence of related inputs (the steps of an attack or
of a training objective's inner maximisation), owned by the model package.

Nothing outside ``robustdeq.deq`` drives a DEQ's forward solve itself: a caller keeps one
:class:`WarmStart` per batch and passes it to the model (``model.run(x, warm=ws)``, or
:func:`implicit_input_gradient` for the attacks' shrinking-batch implicit gradient), which starts
each solve from the state ``ws`` recorded at the previous call.

The rule. A sample warm-starts only from a solve of its own that converged (and is finite): a
solve stopped at ``max_iter`` returns an iterate that depends on where it started, so
warm-starting it would attack (or train against) another function than the one the model's
inference computes. The other samples start where the model's inference starts
(``init_state``; for the adjoint, the upstream gradient). See :func:`warm_start_rows`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..config import SolverConfig
from ..errors import ConfigError
from . import shrink as _shrink
from .cells import cell_map
from .grad import GradientEstimator, ImplicitGrad

LossFn = Callable[[Tensor, Tensor], Tensor]


def warm_start_rows(prev: Optional[Tensor], ok: Optional[Tensor],
                    cold: Optional[Callable[[], Tensor]], batch: Optional[int] = None):
    """Where a warm-started solve starts: ``prev`` (the previous solution) for the samples whose
    previous solve converged (``ok``; None: all) and is finite, ``cold()`` (the model's initial
    state) for the others. Returns ``(start, warm)`` (``warm``: the (B,) warm-started samples),
    or None when no sample warm-starts (no ``prev``, ``prev`` not of ``batch`` samples, or some
    would need ``cold`` and it is None).

    A solve that stops at ``max_iter`` returns an iterate that depends on where it started, so
    warm-starting a sample whose solve did not converge would attack (or train against) another
    function than the one the model's inference computes."""
    if prev is None or (batch is not None and prev.shape[0] != batch):
        return None
    warm = torch.isfinite(prev.reshape(prev.shape[0], -1)).all(dim=1)
    if ok is not None:
        if ok.shape[0] != prev.shape[0]:
            return None
        warm &= ok
    if not bool(warm.any()):
        return None
    if bool(warm.all()):
        return prev, warm
    if cold is None:
        return None
    view = (-1,) + (1,) * (prev.dim() - 1)
    return torch.where(warm.view(view), prev, cold()), warm


def initial_state_fn(model: nn.Module, x: Tensor) -> Optional[Callable[[], Tensor]]:
    """``() -> z0``: the DEQ's own initial state for inputs ``x`` (no autograd), or None if the
    model does not expose ``init_state``; the ``cold`` of :func:`warm_start_rows`."""
    if not hasattr(model, "init_state"):
        return None

    def cold() -> Tensor:
        with torch.no_grad():
            return model.init_state(model.inject(x.detach()))
    return cold


class WarmStartImplicitGrad(ImplicitGrad):
    """:class:`~robustdeq.deq.grad.ImplicitGrad` whose adjoint solve starts from ``a0`` instead
    of the upstream gradient (JIIO-AT reuses the attack's adjoint: for the training loss
    ``mean_b CE_b`` and the attack objective ``l_b = -CE_b``, the training adjoint is ``-mu*/B``;
    warm-started PGD reuses the previous step's adjoint). ``a0=None`` (or a shape mismatch):
    start from the upstream gradient, as ``ImplicitGrad``; ``ok`` (B,) bool: only those samples
    start from ``a0`` (for example where the adjoint it comes from converged). The solution is
    the same fixed point up to the solver's tolerance; only the number of iterations changes.
    """

    def __init__(self, a0: Optional[Tensor], solver: Optional[SolverConfig] = None,
                 ok: Optional[Tensor] = None):
        super().__init__(solver)
        self.a0 = a0.detach() if a0 is not None else None
        self.ok = ok.detach() if ok is not None else None
        if self.ok is not None and (self.ok.dtype != torch.bool or self.ok.dim() != 1 or (
                self.a0 is not None and self.ok.shape[0] != self.a0.shape[0])):
            n = None if self.a0 is None else self.a0.shape[0]
            raise ConfigError(f"ok must be a (B,) bool mask over a0's {n} samples, got "
                              f"{tuple(self.ok.shape)} {self.ok.dtype}")

    def describe(self) -> dict:
        """The estimator's name and its adjoint solver's name."""
        return {"name": type(self).__name__, "solver": self.solver.name.value}

    def initial_adjoint(self, grad: Tensor) -> Tensor:
        """``a0`` for the samples flagged ``ok`` (all when ``ok`` is None) where it is finite, the
        upstream gradient for the others (:func:`warm_start_rows`); the upstream gradient alone
        when ``a0`` is None or of another shape."""
        a0 = self.a0
        if a0 is None or a0.shape != grad.shape:
            return grad.detach()
        start = warm_start_rows(a0.to(grad), self.ok, grad.detach)
        return grad.detach() if start is None else start[0]


class WarmStart:
    """The warm-start state of a sequence of solves on one batch: the previous forward solution
    ``z`` and adjoint ``a`` with per-sample convergence flags ``z_ok`` / ``a_ok``.

    Pass it to ``DEQClassifier.run(x, warm=ws)``: the forward solve starts from ``z`` where
    ``z_ok`` (the model's initial state elsewhere) and ``ws`` records the new solution; with
    ``adjoint=True`` and the model's estimator exactly :class:`ImplicitGrad`, the implicit backward
    of that call starts from the previous call's adjoint (:class:`WarmStartImplicitGrad`) and is
    picked up at the next call. :meth:`select` follows a shrinking batch; :meth:`reset` forgets.
    """

    def __init__(self, adjoint: bool = True):
        self.adjoint = bool(adjoint)
        self.reset()

    def reset(self) -> None:
        """Forget the recorded solutions and adjoints: the next call starts cold."""
        self.z: Optional[Tensor] = None
        self.z_ok: Optional[Tensor] = None
        self.a: Optional[Tensor] = None
        self.a_ok: Optional[Tensor] = None
        self._est: Optional[WarmStartImplicitGrad] = None

    def _pull_adjoint(self) -> None:
        """The adjoint of the latest backward through a warm estimator (None if none ran)."""
        if self._est is not None:
            lb = self._est.last_backward
            self.a, self.a_ok = (None, None) if lb is None else (lb.z, lb.converged)
            self._est = None

    def select(self, keep: Tensor) -> None:
        """Continue with the samples ``keep`` (indices into the latest call's batch) only."""
        self._pull_adjoint()
        for name in ("z", "z_ok", "a", "a_ok"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v[keep])

    def forward_start(self, cold: Optional[Callable[[], Tensor]], batch: int):
        """``(z0, warm)`` for the next forward solve, or None (a cold start)."""
        return warm_start_rows(self.z, self.z_ok, cold, batch)

    def adjoint_start(self, cold: Optional[Callable[[], Tensor]], batch: int):
        """``(a0, warm)`` for the next adjoint solve, or None (start from the upstream gradient)."""
        self._pull_adjoint()
        return warm_start_rows(self.a, self.a_ok, cold, batch)

    def estimator(self, base: GradientEstimator) -> GradientEstimator:
        """The estimator of the next call: ``base``, or (``adjoint`` and ``base`` exactly
        ``ImplicitGrad``) a :class:`WarmStartImplicitGrad` from the previous adjoint."""
        if not (self.adjoint and type(base) is ImplicitGrad):
            return base
        self._pull_adjoint()
        est = WarmStartImplicitGrad(self.a, solver=base.solver, ok=self.a_ok)
        self._est = est
        return est

    def record_forward(self, z: Tensor, converged: Tensor) -> None:
        """Record a forward solution ``z`` and its per-sample convergence flags (detached)."""
        self.z, self.z_ok = z.detach(), converged.detach()

    def record_adjoint(self, a: Tensor, converged: Tensor) -> None:
        """Record an adjoint ``a`` and its per-sample convergence flags (detached)."""
        self._est = None
        self.a, self.a_ok = a.detach(), converged.detach()


def run_warm(model: nn.Module, x: Tensor, warm: Optional[WarmStart], **kwargs):
    """``model.run(x, warm=warm, **kwargs)``; for a fixed-point model whose ``run`` predates
    ``warm`` (takes ``z0`` only) the start is computed here and the solution recorded."""
    from .model import DEQClassifier
    if warm is None:
        return model.run(x, **kwargs)
    if isinstance(model, DEQClassifier):
        return model.run(x, warm=warm, **kwargs)
    start = warm.forward_start(initial_state_fn(model, x), x.shape[0])
    eq = model.run(x, z0=None if start is None else start[0], **kwargs)
    warm.record_forward(eq.z_star, eq.stats.converged)
    return eq


# -- the attacks' warm-started implicit input gradient --------------------------------------------
@dataclass
class InputGradientResult:
    """What :func:`implicit_input_gradient` returns: the input gradient, the logits (detached),
    the per-sample convergence of the forward solve and the solves' costs."""

    grad: Tensor
    logits: Tensor
    converged: Tensor
    stats: Dict[str, int] = field(default_factory=dict)


def plain_deq_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a ``DEQClassifier`` whose pieces (``run``, ``forward``, ``solve``,
    ``f``, ``inject``, ``readout``) are the class's own: what its inference computes can then be
    recomposed from them (``inject``, solves of ``f``, ``readout``)."""
    from .model import DEQClassifier
    cls = type(model)
    return isinstance(model, DEQClassifier) and all(
        getattr(cls, n) is getattr(DEQClassifier, n)
        for n in ("run", "forward", "solve", "f", "inject", "readout"))


def supports_implicit_input_gradient(model: nn.Module, est) -> bool:
    """Whether :func:`implicit_input_gradient` computes exactly what ``model.run`` with ``est``
    computes: the estimator is exactly ``ImplicitGrad`` and the model a
    :func:`plain_deq_classifier`."""
    return type(est) is ImplicitGrad and plain_deq_classifier(model)


def implicit_input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, est: ImplicitGrad,
                            warm: Optional[WarmStart] = None,
                            check_logits: Optional[Callable[[Tensor], None]] = None) -> InputGradientResult:
    """``d loss_fn(model(x), y) / dx`` as ``DEQClassifier.run`` + ``ImplicitGrad`` compute it
    (logits = readout(f(z*, u)); adjoint ``a = J^T a + g`` solved with the estimator's solver),
    with both solves warm-started from ``warm`` (None: cold) and run on a batch that shrinks as
    samples converge (:func:`robustdeq.deq.shrink.solve_shrinking`; per-sample results unchanged).
    The adjoint uses the cell's closed-form VJP where it has one, else VJPs through one
    evaluation of ``f`` with autograd, which also serves the input VJP. Only for models where
    :func:`supports_implicit_input_gradient` holds. ``warm`` records the new solutions; the
    model counts a non-converged forward solve as ``run`` does."""
    if not supports_implicit_input_gradient(model, est):
        raise ConfigError(f"implicit_input_gradient needs a DEQClassifier and ImplicitGrad, got "
                          f"{type(model).__name__} and {type(est).__name__}")
    # parametrised weights are computed once for the call (as in ``DEQClassifier.solve``)
    with parametrize.cached():
        return _implicit_solves(model, x, y, loss_fn, est, warm, check_logits)


def _implicit_solves(model, x, y, loss_fn, est, warm, check_logits) -> InputGradientResult:
    from .solvers import get_solver
    stats: Dict[str, int] = {}
    xr = x.detach().requires_grad_(True)
    u = model.inject(xr)
    ud = u.detach()
    model.prepare()
    fsolver = get_solver(model.solver_config)
    start = None if warm is None else warm.forward_start(lambda: model.init_state(ud), x.shape[0])
    z0 = model.init_state(ud) if start is None else start[0]
    with torch.no_grad():
        def make_f(idx):
            uu = ud if idx is None else ud[idx]
            return cell_map(model.cell, uu)
        res = _shrink.solve_shrinking(fsolver, make_f, z0.detach())
    stats["forward_nfe"] = res.nfe
    stats["forward_work"] = res.work
    stats["forward_unconverged"] = int((~res.converged).sum())
    model.note_nonconvergence(res.converged)  # as model.run counts it
    z_star = res.z.detach()
    if warm is not None:
        warm.record_forward(z_star, res.converged)
    closed_form = getattr(model.cell, "has_vjp", False)
    # the autograd path needs the graph to z as well; the closed form only the one to x
    z_leaf = z_star if closed_form else z_star.clone().requires_grad_(True)
    z_out = model.f(z_leaf, u)
    logits = model.readout(z_out)
    if check_logits is not None:
        check_logits(logits)
    cost = loss_fn(logits, y)
    g = torch.autograd.grad(cost, z_out, retain_graph=True)[0].detach()

    def make_adjoint(idx):
        if closed_form:  # the cell's closed-form vector-Jacobian product
            vjp = model.cell.vjp_at(z_star if idx is None else z_star[idx],
                                    ud if idx is None else ud[idx])
            gs = g if idx is None else g[idx]
            return lambda a: vjp(a, gs)
        if idx is None:
            return lambda a: torch.autograd.grad(z_out, z_leaf, a, retain_graph=True)[0] + g
        zs = z_star[idx].clone().requires_grad_(True)
        with torch.enable_grad():
            fs = model.f(zs, ud[idx])
        gs = g[idx]
        return lambda a: torch.autograd.grad(fs, zs, a, retain_graph=True)[0] + gs

    astart = None if warm is None else warm.adjoint_start(lambda: g, g.shape[0])
    bsolver = get_solver(est.solver)
    with torch.no_grad():
        ares = _shrink.solve_shrinking(bsolver, make_adjoint, g if astart is None else astart[0])
    stats["backward_nfe"] = ares.nfe
    stats["backward_work"] = ares.work
    stats["backward_unconverged"] = int((~ares.converged).sum())
    a = ares.z.detach()
    if warm is not None:
        warm.record_adjoint(a, ares.converged)
    grad = torch.autograd.grad(z_out, xr, a)[0]
    return InputGradientResult(grad=grad, logits=logits.detach(), converged=res.converged, stats=stats)


__all__ = ["warm_start_rows", "initial_state_fn", "WarmStartImplicitGrad", "WarmStart", "run_warm",
           "InputGradientResult", "plain_deq_classifier",
           "supports_implicit_input_gradient", "implicit_input_gradient"]
