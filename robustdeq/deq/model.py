"""``DEQClassifier``: injection -> fixed point of a cell -> head.

The deep equilibrium model of Bai, Kolter & Koltun ("Deep Equilibrium Models", NeurIPS 2019): the
prediction is read out from the fixed point ``z* = f(z*, u(x))`` of one cell, found by a solver
(:mod:`robustdeq.deq.solvers`) and differentiated by a gradient estimator (:mod:`robustdeq.deq.grad`).

Contract: ``forward(x) -> logits`` in train and eval mode alike, with a
gradient path to ``x`` whenever the chosen estimator provides one (every estimator but ``NoGrad``);
``run(x) -> Equilibrium`` exposes the fixed point, the trajectory and solver statistics;
``readout(z) -> logits`` turns any state into a prediction.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._support import user_stacklevel
from ..config import SolverConfig, from_dict
from ..errors import ConfigError, InputError, NonConvergenceWarning
from .cells import cell_map
from .grad import GradientEstimator, ImplicitGrad, make_estimator
from .solvers import RecordSpec, SolveResult, TrajectoryState, get_solver

if TYPE_CHECKING:  # pragma: no cover
    from .warm import WarmStart

logger = logging.getLogger(__name__)


@dataclass
class SolverStats:
    """Per-sample solver statistics of one forward solve."""

    residual: Tensor      # (B,) residual of the returned iterate
    steps: Tensor         # (B,) evaluations of f used
    converged: Tensor     # (B,) bool
    diverged: Tensor      # (B,) bool
    nfe: int              # evaluations of f for the batch

    @property
    def converged_fraction(self) -> float:
        """Fraction of the batch whose solve reached the tolerance."""
        return float(self.converged.float().mean()) if self.converged.numel() else float("nan")

    @property
    def mean_steps(self) -> float:
        """Mean number of evaluations of ``f`` per sample (nan for an empty batch)."""
        return float(self.steps.float().mean()) if self.steps.numel() else float("nan")

    def summary(self) -> dict:
        """Batch means of the statistics as a JSON-ready dict: ``mean_steps``,
        ``converged_fraction``, ``diverged_fraction``, ``mean_residual``, ``max_residual``,
        ``nfe``."""
        return {
            "mean_steps": float(self.steps.float().mean()),
            "converged_fraction": float(self.converged.float().mean()),
            "diverged_fraction": float(self.diverged.float().mean()),
            "mean_residual": float(self.residual.float().mean()),
            "max_residual": float(self.residual.float().max()),
            "nfe": int(self.nfe),
        }

    @staticmethod
    def from_result(res: SolveResult) -> "SolverStats":
        """The statistics of a solver's :class:`~robustdeq.deq.solvers.SolveResult`."""
        return SolverStats(res.residual.detach(), res.steps, res.converged, res.diverged, res.nfe)


@dataclass
class Equilibrium:
    """What ``run`` returns: logits of the read-out state, that state ``z`` (with the gradient
    path of the estimator), the raw solver output ``z_star``, the trajectory and the statistics."""

    logits: Tensor
    z: Tensor
    z_star: Tensor
    trajectory: List[TrajectoryState]
    stats: SolverStats
    u: Optional[Tensor] = None

    def state(self, step: int) -> TrajectoryState:
        """The recorded trajectory state with step index ``step``; a ``ConfigError`` naming the
        recorded steps if it was not recorded (pass ``record=`` to ``run``)."""
        for t in self.trajectory:
            if t.step == step:
                return t
        raise ConfigError(f"state {step} was not recorded (recorded: {[t.step for t in self.trajectory]})")


def _merge_record(record: RecordSpec, extra: Sequence[int]) -> RecordSpec:
    if not extra:
        return record
    if isinstance(record, str) and record == "all":
        return record
    base = [] if record is None or record == "none" else ([record] if isinstance(record, int) else list(record))
    return sorted(set(base) | set(extra))


@contextlib.contextmanager
def parametrized_once(module: nn.Module) -> Iterator[None]:
    """Within the block, every parametrised tensor (``torch.nn.utils.parametrize``: spectral or
    weight normalisation, ...) is computed at most once and reused (``parametrize.cached()``);
    those of ``module`` (all its submodules) are computed on entry, under the caller's grad
    mode, so that a later first use without autograd (a solve) does not cache a weight without
    the graph to its parameters. In train mode a spectrally normalised weight then takes one
    power-iteration step per block, as a plain module's forward does. Inside a caller's own
    ``parametrize.cached()`` the weights already cached there are the ones used."""
    with parametrize.cached():
        for m in module.modules():
            if parametrize.is_parametrized(m):
                for name in m.parametrizations:
                    getattr(m, name)
        yield


#: the weight scope of the evaluation in progress (:func:`shared_weights`): an ExitStack that
#: holds the parametrisation cache of its first :func:`one_weight` block open until the scope ends
_SHARED: contextvars.ContextVar = contextvars.ContextVar("robustdeq_shared_weights", default=None)


@contextlib.contextmanager
def one_weight(model: nn.Module, *, join: bool = False) -> Iterator[None]:
    """The block computes each parametrised weight of ``model`` once (:func:`parametrized_once`)
    when ``model`` is a :class:`DEQClassifier` (one cell, one weight at every evaluation of its
    map); for any other model a no-op: a weight-tied model substitutes masked parameters per
    layer (a cache would reuse one layer's weight in every layer), a plain module computes its
    weights in its own forward. Nested in another block (any ``parametrize.cached()``) it uses
    the weights cached there.

    ``join=True`` (a training objective's loss): inside a :func:`shared_weights` scope the cache
    opened by the scope's first such block stays open until the scope ends, so that the later
    blocks use the same weights. Training objectives compute their loss in such a block: in train
    mode a spectrally normalised weight then takes one power-iteration step per objective
    evaluation. Blocks that may run inside an attack (in eval mode, with frozen parameters, whose
    weights have no graph to the parameters) must not join."""
    if not isinstance(model, DEQClassifier):
        yield
        return
    stack = _SHARED.get() if join else None
    if stack is not None and not getattr(stack, "opened", False):
        stack.enter_context(parametrized_once(model))
        stack.opened = True
    with parametrized_once(model):
        yield


@contextlib.contextmanager
def shared_weights() -> Iterator[None]:
    """Within the block every ``one_weight(..., join=True)`` block uses the weights computed by the
    first one (a composite objective: a base objective's loss and a penalty added to it, e.g.
    :class:`~robustdeq.defenses.lyapunov.LyapunovStability`). The cache opens at the first
    ``one_weight(..., join=True)`` block, not on entry: a base objective's attack, which runs
    before its loss in eval mode with frozen parameters, computes its own weights. Nested scopes
    join the outer one."""
    if _SHARED.get() is not None:
        yield
        return
    with contextlib.ExitStack() as stack:
        token = _SHARED.set(stack)
        try:
            yield
        finally:
            _SHARED.reset(token)


class EquilibriumModel(nn.Module):
    """What DEQs and weight-tied models share: ``injection``, ``cell``, ``head``, the gradient
    estimator in force, input checks and the read-out of any state."""

    @property
    def estimator(self) -> GradientEstimator:
        """The estimator in force (innermost ``gradient`` override, else the model's default)."""
        return self._grad_stack[-1] if self._grad_stack else self.grad

    def check_input(self, x: Tensor, *, in_range: bool = True) -> Tensor:
        """Validate ``x`` (shape, finiteness, [0, 1] unless ``in_range=False``; skipped with
        ``validate_inputs=False``), refuse an empty batch, and cast floating-point inputs of another
        dtype (float64 images for a float32 model) to the model's dtype; gradients flow back to
        ``x`` in its own dtype."""
        if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == 0:
            raise InputError(f"x is an empty batch (shape {tuple(x.shape)}): pass at least one sample")
        if self.validate_inputs:
            from ..data import validate_inputs
            x = validate_inputs(x, expected_shape=self.input_shape, check_range=in_range)
        return self.as_model_dtype(x)

    def as_model_dtype(self, x: Tensor) -> Tensor:
        """``x`` cast to the dtype of the model's parameters when both are floating point."""
        if isinstance(x, Tensor) and x.is_floating_point():
            p = next(self.parameters(), None)
            if p is not None and p.is_floating_point() and p.dtype != x.dtype:
                return x.to(p.dtype)
        return x

    def inject(self, x: Tensor) -> Tensor:
        """The input injection ``u`` of ``x`` (cast to the model's dtype)."""
        return self.injection(self.as_model_dtype(x))

    def readout(self, z: Tensor) -> Tensor:
        """Logits of any state ``z`` (the final fixed point or an intermediate state)."""
        return self.head(z)

    def init_state(self, u: Tensor) -> Tensor:
        """The state the solve starts from (the cell's ``init_state``)."""
        return self.cell.init_state(u)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch ``x``: ``run(x).logits``."""
        return self.run(x).logits


class DEQClassifier(EquilibriumModel):
    """A deep equilibrium classifier.

    Args:
        injection: ``x -> u`` (normalisation lives here).
        cell: ``f(z, u)`` with ``init_state(u)``.
        head: ``z -> logits``.
        solver: forward :class:`SolverConfig` (or a dict of its options).
        grad: default gradient estimator (instance or name); overridable per call with
            :func:`robustdeq.gradient` or ``run(grad=...)``.
        input_shape: per-sample input shape, checked on every call (``InputError`` otherwise).
            Floating-point inputs of another dtype (float64 images for a float32 model) are cast
            to the model's dtype; an empty batch is an ``InputError``.
        validate_inputs: check shape, finiteness and the [0, 1] range of inputs.
        warn_nonconvergence: emit :class:`NonConvergenceWarning` when samples do not converge.
    """

    def __init__(self, injection: nn.Module, cell: nn.Module, head: nn.Module, *,
                 solver: Union[SolverConfig, dict, None] = None,
                 grad: Union[GradientEstimator, str, None] = None,
                 input_shape: Optional[Tuple[int, ...]] = None,
                 validate_inputs: bool = True, warn_nonconvergence: bool = True):
        super().__init__()
        self.injection, self.cell, self.head = injection, cell, head
        self.solver_config = from_dict(SolverConfig, solver)
        self.grad = make_estimator(grad) if grad is not None else ImplicitGrad()
        self.check_estimator(self.grad)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.validate_inputs = validate_inputs
        self.warn_nonconvergence = warn_nonconvergence
        self._grad_stack: List[GradientEstimator] = []
        self.last_stats: Optional[SolverStats] = None
        self._warned = False
        self.nonconvergence_events = 0

    # -- pieces -----------------------------------------------------------------------------------
    def check_estimator(self, est: GradientEstimator) -> None:
        """``ConfigError`` unless ``est`` is a gradient estimator this model can use."""
        if not isinstance(est, GradientEstimator):
            raise ConfigError(f"not a gradient estimator: {est!r}")

    def f(self, z: Tensor, u: Tensor) -> Tensor:
        """The equilibrium map ``f(z, u)`` (the cell)."""
        return self.cell(z, u)

    def f_bound(self, u: Tensor) -> Callable[[Tensor], Tensor]:
        """``z -> f(z, u)`` for the evaluations of one solve without autograd (fixed ``u`` and
        weights): the cell's ``bind_input(u)`` where the model's map is its cell's (the same
        values without a module call per evaluation), else ``self.f``."""
        return cell_map(self.cell, u) if self._f_is_cell else (lambda z: self.f(z, u))

    @property
    def closed_form_vjp(self) -> bool:
        """Whether ``cell.vjp_at`` is the vector-Jacobian product of this model's map ``f``."""
        return self._f_is_cell and bool(getattr(self.cell, "has_vjp", False))

    @property
    def _f_is_cell(self) -> bool:
        """Whether ``f`` is the cell's map (not a subclass's changed one)."""
        return type(self).f is DEQClassifier.f

    def prepare(self) -> None:
        """Let the cell recompute what depends on its weights (e.g. the step size of a
        ``MonotoneCell``) before solves."""
        if hasattr(self.cell, "prepare"):
            self.cell.prepare()

    def unroll(self, u: Tensor, z: Tensor, steps: int, damping: float = 1.0) -> Tensor:
        """``steps`` (damped) steps of ``f(., u)`` from ``z`` with autograd as enabled."""
        for _ in range(steps):
            fz = self.cell(z, u)
            z = fz if damping == 1.0 else (1 - damping) * z + damping * fz
        return z

    # -- solving ----------------------------------------------------------------------------------
    def solve(self, u: Tensor, *, z0: Optional[Tensor] = None, record: RecordSpec = None,
              solver: Union[SolverConfig, dict, None] = None, keep_graph: bool = False) -> SolveResult:
        """Solve ``z = f(z, u)``; without ``keep_graph`` the solve runs without autograd."""
        cfg = self.solver_config if solver is None else from_dict(SolverConfig, solver)
        self.prepare()
        z0 = self.init_state(u) if z0 is None else z0
        if z0.shape[0] != u.shape[0]:
            raise InputError(f"z0 has batch size {z0.shape[0]} but the input has {u.shape[0]}")
        slv = get_solver(cfg)
        # parametrised weights (spectral / weight normalisation) are computed once per solve,
        # not at every evaluation of f: the same weights, fewer operations per iteration
        with parametrize.cached():
            if keep_graph:
                return slv.solve(lambda z: self.cell(z, u), z0, record=record)
            with torch.no_grad():
                ud = u.detach()
                return slv.solve(cell_map(self.cell, ud), z0.detach(), record=record)

    def iterates(self, u: Tensor, n: Tensor) -> Tensor:
        """Per sample ``b``, the model solver's ``n[b]``-th iterate ``z_n`` from
        ``z_0 = init_state(u)`` with no early stop, without autograd: the random intermediate
        states of RIS training (``n`` (B,) int64 >= 1). ``z_n`` is the state after ``n`` solver
        steps (``n`` evaluations of ``f``, at ``z_0 .. z_{n-1}``; ``z_n`` itself is not
        evaluated): the recorded trajectory state ``n`` of a solve with ``tol = 0``, and what a
        solve with ``max_iter = n + 1``, ``tol = 0``, ``select="last"`` returns (one with
        ``max_iter = n`` returns its last evaluated iterate, ``z_{n-1}``). All ``n`` steps use one
        weight (:func:`parametrized_once`: in train mode a spectral normalisation takes one
        power-iteration step per call, not one per step, so the iterates are of one map)."""
        cfg = self.solver_config.replace(max_iter=int(n.max()), tol=0.0)
        slv = get_solver(cfg)
        with parametrized_once(self):
            self.prepare()
            with torch.no_grad():
                ud = u.detach()
                f = lambda z: self.f(z, ud)  # noqa: E731
                state = slv.init(f, self.init_state(ud))
                zn = state.z.clone()
                n_dev = n.to(state.z.device)
                for k in range(1, int(n.max()) + 1):
                    state = slv.step(f, state)
                    zn = torch.where((n_dev == k)[:, None], state.z, zn)
                return zn.view(state.shape)

    def run(self, x: Tensor, *, record: RecordSpec = None, z0: Optional[Tensor] = None,
            grad: Union[GradientEstimator, str, None] = None,
            solver: Union[SolverConfig, dict, None] = None,
            warm: Optional["WarmStart"] = None, in_range: bool = True) -> Equilibrium:
        """Full forward pass returning the :class:`Equilibrium` (logits, z, trajectory, stats).

        ``in_range=False`` accepts inputs outside [0, 1] (randomized smoothing's noisy inputs).

        ``z0`` starts the solver from a given state (e.g. the joint iterate of a JIIO solve).
        ``warm`` (a :class:`robustdeq.deq.warm.WarmStart`, one per batch) warm-starts a sequence
        of calls: the solve starts from the previous call's fixed point for the samples whose
        previous solve converged (the initial state for the others), the implicit backward from
        the previous adjoint (``WarmStart(adjoint=True)`` and an ``ImplicitGrad`` estimator), and
        ``warm`` records this call's solutions. ``z0`` and ``warm`` are exclusive.

        One call computes each parametrised weight once (:func:`parametrized_once`): the solve,
        the estimator's ``f(z*, u)``, the read-out and the implicit backward's vector-Jacobian
        products (built here, at the forward, and applied when the backward runs) all use the
        same weights, with their autograd graph. In train mode a spectrally normalised weight
        thus takes one power-iteration step per call, and ``z*`` is the fixed point of the
        weight the logits are computed with (``stats.residual`` is its residual there).
        """
        x = self.check_input(x, in_range=in_range)
        est = make_estimator(grad) if grad is not None else self.estimator
        self.check_estimator(est)
        with parametrized_once(self):
            u = self.inject(x)
            if warm is not None:
                if z0 is not None:
                    raise ConfigError("run(): pass z0 or warm, not both")
                est = warm.estimator(est)
                ud = u.detach()

                def cold() -> Tensor:
                    with torch.no_grad():
                        return self.init_state(ud)
                start = warm.forward_start(cold, u.shape[0])
                z0 = None if start is None else start[0]
            rec = _merge_record(record, est.required_record())
            result = self.solve(u, z0=z0, record=rec, solver=solver,
                                keep_graph=est.full_graph and torch.is_grad_enabled())
            z = est.attach(self.cell, u, result.z, result.trajectory)
            logits = self.readout(z)
            stats = SolverStats.from_result(result)
            if warm is not None:
                warm.record_forward(result.z, stats.converged)
            self.last_stats = stats
            self._maybe_warn(stats)
            return Equilibrium(logits=logits, z=z, z_star=result.z, trajectory=result.trajectory,
                               stats=stats, u=u)

    def _maybe_warn(self, stats: SolverStats) -> None:
        """Warn (once per model until :meth:`reset_warnings`) when samples did not converge.

        Every occurrence is counted in ``nonconvergence_events`` and logged; in training mode the
        event is logged only (short solves are common while training and are not a trust issue).
        """
        n_bad = int((~stats.converged).sum())
        if not self.note_nonconvergence(stats.converged):
            return
        n_div = int(stats.diverged.sum())
        msg = (f"forward solve: {n_bad}/{stats.converged.numel()} samples did not reach tol "
               f"{self.solver_config.tol:g} in {self.solver_config.max_iter} iterations"
               + (f" ({n_div} diverged)" if n_div else "")
               + f"; max residual {float(stats.residual.max()):.2e}")
        if self.training or not self.warn_nonconvergence or self._warned:
            logger.debug(msg)
            return
        self._warned = True
        warnings.warn(msg + " (further warnings from this model are suppressed; see "
                      "model.nonconvergence_events and Equilibrium.stats)",
                      NonConvergenceWarning, stacklevel=user_stacklevel())

    def note_nonconvergence(self, converged: Tensor) -> bool:
        """Count one non-convergence event in ``nonconvergence_events`` when some sample of a
        forward solve (per-sample flags ``converged``) did not converge; returns whether one did.
        Every forward solve of the model reports here (``run`` and the warm-started solves of
        :mod:`robustdeq.deq.warm`)."""
        if bool(converged.all()):
            return False
        self.nonconvergence_events += 1
        return True

    def reset_warnings(self) -> None:
        """Let the next non-convergence warn again and zero ``nonconvergence_events``."""
        self._warned = False
        self.nonconvergence_events = 0


#: the methods of :class:`DEQClassifier` that make up what it computes: ``forward(x)`` is
#: ``readout(z*)``, ``z*`` a ``solve`` of ``f(., inject(x))`` (``run``), and ``f`` its cell
COMPOSITION = ("forward", "run", "inject", "f", "readout", "solve")


def changed_composition(model: nn.Module, names: Sequence[str] = COMPOSITION) -> Optional[str]:
    """Why ``model``, a :class:`DEQClassifier`, does not compute what its injection, cell and head
    compose (a subclass overriding one of ``names``, named), or None when it does or is not a
    ``DEQClassifier``: certificates bound the parts, so a changed composition is another function."""
    from .cells import overridden
    if not isinstance(model, DEQClassifier):
        return None
    bad = overridden(model, DEQClassifier, names)
    if not bad:
        return None
    return (f"{type(model).__name__} subclasses DEQClassifier but overrides {', '.join(bad)}, so what it "
            "computes need not be its injection, cell and head composed, which the certificates bound")


__all__ = ["EquilibriumModel", "DEQClassifier", "Equilibrium", "SolverStats", "COMPOSITION",
           "changed_composition"]
