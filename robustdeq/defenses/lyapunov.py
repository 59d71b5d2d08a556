"""LyaDEQ: a DEQ whose fixed point is Lyapunov stable, followed by an orthogonal separation layer.

Chu, Wei, Liu, Zhao (+ Miyatake), "Lyapunov-Stable Deep Equilibrium Models" (AAAI 2024; arXiv
2304.12707). The paper has no public code; its building blocks do: the positive-definite Lyapunov
function and projected dynamics of Manek & Kolter 2019 (locuslab/stable_dynamics) and the orthogonal
fully connected layer of SODEF (Kang et al. 2021).

What is implemented (a documented reconstruction, **not verified against the paper**)
-----------------------------------------------------------------------------------------
* ``V(e) = ReHU_d(g(e) - g(0)) + eps_V ||e||^2`` with ``g`` an input-convex network (non-negative
  hidden-to-hidden weights through softplus, convex non-decreasing activations). ``V(0) = 0``,
  ``V(e) >= eps_V ||e||^2 > 0`` for ``e != 0``, ``V`` is strictly convex and C^1 (C^1 needs the
  smooth ``icnn_act="softplus"``, the default; ``"relu"`` is the piecewise-linear variant of the
  reference code).
* The DEQ's continuous-time dynamics ``fhat(z) = f(z, u) - z`` (zero exactly at the DEQ fixed
  point) are projected, in the shifted coordinate ``e = z - z_ref``, to::

      F(e) = fhat - grad V(e) * ReLU(grad V(e)^T fhat + alpha V(e)) / ||grad V(e)||^2

  so that ``dV/dt = grad V^T F <= -alpha V`` along every trajectory (exponential stability).

The centring choice (why the solver's fixed point ``z*`` is the centre)
-----------------------------------------------------------------------
``V`` is strictly convex with its unique minimum at ``e = 0``, so ``grad V(e) != 0`` for every
``e != 0`` and the projected field ``F`` vanishes only at ``e = 0``: *whatever point V is centred at
becomes the unique equilibrium of the stabilised dynamics*. Centring at the origin of state space or
at a learned per-class anchor would therefore replace the implicit, input-dependent fixed point by
an explicit point (the DEQ would stop being a DEQ). The only centre that keeps the model implicit is
the fixed point itself. LyaDEQ is hence a two-stage model:

1. the base map ``f`` is solved for ``z*(x)`` with any solver / gradient estimator of the backbone
   (LyaDEQ *is* a :class:`~robustdeq.deq.model.DEQClassifier`: trajectories, ``readout``, attack
   views, checkpoints and the zoo all apply unchanged);
2. ``V`` is centred at the (detached) ``z*`` and governs state perturbations: the *stabilised map*
   ``z -> z + h F(z - z*)`` (:meth:`LyaDEQ.stable_map`; with ``h = 1`` it equals ``f(z, u)`` wherever
   ``f`` already decreases ``V`` to first order) has ``z*`` as its only fixed point (when ``z*`` is
   the exact fixed point of ``f``; see the last paragraph), and trajectories
   started at ``z* + delta`` decrease ``V``. With a fixed step the decrease is guaranteed only for
   small enough ``h``; :meth:`LyaDEQ.stable_step` backtracks (Armijo, halving ``h``) so that every
   accepted discrete step satisfies ``V(z_{k+1}) <= (1 - sigma h alpha) V(z_k)``.

The prediction is ``classifier(Q features(z*))`` with ``Q`` orthogonal
(``torch.nn.utils.parametrizations.orthogonal``; it preserves distances between fixed points, so it
cannot collapse separated classes). Training: with the plain cross-entropy the Lyapunov network gets
no gradient (the projection does not change ``z*``); :class:`LyapunovStability` adds a penalty on
states ``z* + delta`` around the fixed point (and a few plain iterates from there) that learns ``V``
and pushes the *unprojected* DEQ dynamics to satisfy the decrease condition themselves, in
continuous time (``condition="flow"``: ``grad V^T fhat <= -alpha V``) or for the solver's plain
iteration (``condition="map"``: ``V(f(z) - z*) <= (1 - alpha) V(z - z*)``); where it holds the
projection is inactive and the model's own dynamics are certified on that cloud. It wraps any other
objective (PGD-AT, TRADES, ...) for the "LyaDEQ + AT" combinations.

Diagnostics: :func:`lyapunov_trace` follows the projected dynamics from ``z* + delta`` and
returns the per-step decrease of ``V`` (and the continuous-time margin) for certificates and tests.

What the guarantee is: stability of ``z*`` under perturbations of the *state* (the paper's "minor
initial perturbations"), **not** a certified radius in input space: an input perturbation moves
``z*`` itself. The solver returns ``z*`` only up to its tolerance, so ``fhat(z*) = r != 0``: the
decrease ``grad V^T F <= -alpha V`` still holds exactly at every ``e != 0`` (so ``V -> 0`` along the
flow), but ``F(z*) = r`` and a fixed-step discrete map stalls at a distance of order ``h ||r||``
from ``z*``, where ``V`` can no longer decrease; :func:`lyapunov_trace` therefore solves the
centre tightly by default.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from .._tensor import seeded_generator
from ..config import SolverConfig
from ..deq.cells import ConvCell, ConvInjection, MLPCell, MLPInjection
from ..deq.model import DEQClassifier, one_weight, shared_weights
from ..errors import ConfigError, InputError

logger = logging.getLogger(__name__)

_ACTS = ("softplus", "relu")


# ------------------------------------------------------------------------------ Lyapunov function
def rehu(s: Tensor, d: float = 1.0) -> Tensor:
    """Rectified Huber unit: ``0`` (s <= 0), ``s^2 / (2d)`` (0 < s < d), ``s - d/2`` (s >= d); C^1."""
    sc = s.clamp_min(0.0)
    return torch.where(sc < d, sc * sc / (2.0 * d), sc - d / 2.0)


class ICNN(nn.Module):
    """Input-convex network ``g: (B, D) -> (B,)`` (Manek & Kolter 2019)::

        h_1 = act(W_0 e + b_0)
        h_{i+1} = act(W_i e + b_i + softplus(U_i) h_i / n_i)
        g(e) = W_L e + b_L + softplus(U_L) h_L / n_L

    ``act`` is convex and non-decreasing and the ``h``-path weights are non-negative, so ``g`` is
    convex in ``e``.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), act: str = "softplus"):
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or any(h < 1 for h in hidden):
            raise ConfigError(f"icnn_hidden must be a non-empty list of positive widths, got {hidden}")
        if act not in _ACTS:
            raise ConfigError(f"unknown ICNN activation {act!r}; expected one of {', '.join(_ACTS)}")
        self.dim, self.hidden, self.act = int(dim), hidden, act
        self.W = nn.ModuleList([nn.Linear(dim, h) for h in hidden] + [nn.Linear(dim, 1)])
        outs = hidden[1:] + [1]
        self.U = nn.ParameterList([nn.Parameter(torch.randn(o, i) * 0.1 - 1.0)
                                   for i, o in zip(hidden, outs)])

    def _act(self, t: Tensor) -> Tensor:
        return F.softplus(t) if self.act == "softplus" else F.relu(t)

    def forward(self, e: Tensor) -> Tensor:
        """``g(e)`` (B,) of flattened states ``e`` (B, D)."""
        h = self._act(self.W[0](e))
        for i in range(1, len(self.W)):
            pre = self.W[i](e) + F.linear(h, F.softplus(self.U[i - 1])) / h.shape[1]
            h = pre if i == len(self.W) - 1 else self._act(pre)
        return h[:, 0]


class LyapunovFunction(nn.Module):
    """``V(e) = ReHU_d(g(e) - g(0)) + eps ||e||^2`` on flattened states ``e: (B, D) -> (B,)``."""

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), *, eps: float = 0.01,
                 d: float = 1.0, act: str = "softplus"):
        super().__init__()
        if not eps > 0:
            raise ConfigError(f"eps_v must be > 0 (it makes V positive definite), got {eps}")
        if not d > 0:
            raise ConfigError(f"rehu_d must be > 0, got {d}")
        self.icnn = ICNN(dim, hidden, act)
        self.eps, self.d, self.dim = float(eps), float(d), int(dim)

    def forward(self, e: Tensor) -> Tensor:
        """``V(e)`` (B,) of states ``e`` (flattened to (B, D)); an ``InputError`` if they do not
        have ``dim`` features."""
        e = e.flatten(1)
        if e.shape[1] != self.dim:
            raise InputError(f"Lyapunov function expects states with {self.dim} features, got {e.shape[1]}")
        g0 = self.icnn(torch.zeros_like(e[:1]))
        return rehu(self.icnn(e) - g0, self.d) + self.eps * e.pow(2).sum(1)

    def value_and_grad(self, e: Tensor, create_graph: bool = False) -> Tuple[Tensor, Tensor]:
        """``(V(e), grad V(e))`` with shapes (B,), (B, D). With ``create_graph`` both carry the
        autograd graph (to ``e`` when it requires grad, and to the parameters)."""
        e = e.flatten(1)
        with torch.enable_grad():
            ee = e if (create_graph and e.requires_grad) else e.detach().requires_grad_(True)
            v = self(ee)
            (gv,) = torch.autograd.grad(v.sum(), ee, create_graph=create_graph)
        if not create_graph:
            v, gv = v.detach(), gv.detach()
        return v, gv


def project_dynamics(fhat: Tensor, grad_v: Tensor, v: Tensor, alpha: float) -> Tensor:
    """``F = fhat - grad_v ReLU(grad_v^T fhat + alpha v) / ||grad_v||^2`` per sample.

    Shapes: ``fhat, grad_v`` (B, D), ``v`` (B,). Where ``grad_v = 0`` (only at ``e = 0``, where the
    correction's numerator ``ReLU(0 + 0)`` vanishes too) the correction is 0.
    """
    gn2 = grad_v.pow(2).sum(1)
    viol = F.relu((grad_v * fhat).sum(1) + alpha * v)
    tiny = torch.finfo(fhat.dtype).tiny
    coef = torch.where(gn2 > tiny, viol / gn2.clamp_min(tiny), torch.zeros_like(viol))
    return fhat - coef[:, None] * grad_v


# --------------------------------------------------------------------------------------- model
class SeparationHead(nn.Module):
    """``logits = classifier(Q features(z))`` with ``Q`` a square orthogonal matrix (no bias)."""

    def __init__(self, features: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.separation = parametrizations.orthogonal(nn.Linear(dim, dim, bias=False))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        """Logits of a state ``z``: ``classifier(Q features(z))``."""
        return self.classifier(self.separation(self.features(z)))


class _PoolFlatten(nn.Module):
    def __init__(self, pool: int):
        super().__init__()
        self.pool = int(pool)

    def forward(self, z: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(z, self.pool).flatten(1)


class LyaDEQ(DEQClassifier):
    """A :class:`DEQClassifier` with a Lyapunov stability module and an orthogonal separation head.

    Args (beyond those of ``DEQClassifier``):
        head: a :class:`SeparationHead` (its ``separation`` layer is exposed as ``model.separation``).
        state_dim: number of features of a (flattened) state ``z``.
        icnn_hidden, icnn_act: widths and activation of the ICNN inside ``V``.
        alpha: decay rate of the projected dynamics (``dV/dt <= -alpha V``).
        eps_v, rehu_d: ``eps`` and ``d`` of ``V``.
        step: Euler step ``h`` of the stabilised map.
        backtrack: maximum halvings of ``h`` in :meth:`stable_step` (0: plain Euler, no check).
        armijo: sufficient-decrease constant ``sigma`` in (0, 1).
    """

    def __init__(self, injection: nn.Module, cell: nn.Module, head: SeparationHead, *, state_dim: int,
                 icnn_hidden: Sequence[int] = (64, 64), icnn_act: str = "softplus", alpha: float = 0.01,
                 eps_v: float = 0.01, rehu_d: float = 1.0, step: float = 1.0, backtrack: int = 20,
                 armijo: float = 0.5, **kw):
        super().__init__(injection, cell, head, **kw)
        if not isinstance(head, SeparationHead):
            raise ConfigError(f"LyaDEQ needs a SeparationHead, got {type(head).__name__}")
        if not alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {alpha}")
        if not step > 0:
            raise ConfigError(f"step must be > 0, got {step}")
        if not (isinstance(backtrack, int) and backtrack >= 0):
            raise ConfigError(f"backtrack must be an int >= 0, got {backtrack!r}")
        if not 0 < armijo < 1:
            raise ConfigError(f"armijo must be in (0, 1), got {armijo}")
        self.lyapunov_fn = LyapunovFunction(state_dim, icnn_hidden, eps=eps_v, d=rehu_d, act=icnn_act)
        self.alpha, self.step, self.backtrack, self.armijo = float(alpha), float(step), backtrack, float(armijo)
        self.state_dim = int(state_dim)

    @property
    def separation(self) -> nn.Linear:
        """The orthogonal separation layer (``separation.weight`` is orthogonal)."""
        return self.head.separation

    # -- Lyapunov machinery -------------------------------------------------------------------
    def lyapunov(self, z: Tensor, z_ref: Tensor) -> Tensor:
        """``V(z - z_ref)``: (B, ...) x (B, ...) -> (B,)."""
        return self.lyapunov_fn(z - z_ref)

    def lyapunov_and_grad(self, z: Tensor, z_ref: Tensor, create_graph: bool = False):
        """``(V, grad V)`` at ``e = z - z_ref``; shapes (B,), (B, D) (flattened)."""
        return self.lyapunov_fn.value_and_grad(z - z_ref, create_graph=create_graph)

    def stable_dynamics(self, z: Tensor, u: Tensor, z_ref: Tensor,
                        create_graph: Optional[bool] = None) -> Tensor:
        """Projected field ``F(z - z_ref)`` (shape of ``z``) of the dynamics ``f(z, u) - z``.

        ``create_graph`` (default: whether autograd is enabled) keeps ``F`` differentiable.
        """
        cg = torch.is_grad_enabled() if create_graph is None else create_graph
        b = z.shape[0]
        fhat = (self.f(z, u) - z).reshape(b, -1)
        v, gv = self.lyapunov_and_grad(z, z_ref, create_graph=cg)
        return project_dynamics(fhat, gv, v, self.alpha).view(z.shape)

    def stable_map(self, z: Tensor, u: Tensor, z_ref: Tensor, h: Optional[float] = None) -> Tensor:
        """The explicit Euler map ``z + h F(z - z_ref)``: its only fixed point is ``z_ref``
        (usable as a cell with any solver: ``solver.solve(lambda z: m.stable_map(z, u, zs), z0)``)."""
        h = self.step if h is None else float(h)
        return z + h * self.stable_dynamics(z, u, z_ref)

    @torch.no_grad()
    def stable_step(self, z: Tensor, u: Tensor, z_ref: Tensor, h: Optional[float] = None,
                    backtrack: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """One Euler step of the projected dynamics with per-sample Armijo backtracking.

        Starting from ``h``, halve the step (at most ``backtrack`` times) until
        ``V(z + h F) <= (1 - armijo * h * alpha) V(z)``; samples for which no step is accepted stay
        put (step 0). With ``backtrack=0`` a plain Euler step of size ``h`` is taken unchecked.
        Returns ``(z_next, h_used)`` with shapes ``z.shape`` and (B,). No autograd.
        """
        h0 = self.step if h is None else float(h)
        nb = self.backtrack if backtrack is None else int(backtrack)
        b = z.shape[0]
        Fz = self.stable_dynamics(z, u, z_ref, create_graph=False).reshape(b, -1)
        zf, zr = z.reshape(b, -1), z_ref.reshape(b, -1)
        hs = torch.full((b,), h0, dtype=z.dtype, device=z.device)
        if nb == 0:
            return (zf + hs[:, None] * Fz).view(z.shape), hs
        v0 = self.lyapunov_fn(zf - zr)
        accepted = torch.zeros(b, dtype=torch.bool, device=z.device)
        out = zf.clone()
        for _ in range(nb + 1):
            cand = zf + hs[:, None] * Fz
            vc = self.lyapunov_fn(cand - zr)
            ok = (~accepted) & (vc <= (1 - self.armijo * hs * self.alpha) * v0) & (v0 > 0)
            out = torch.where(ok[:, None], cand, out)
            accepted |= ok
            if bool(accepted.all()):
                break
            hs = torch.where(accepted, hs, hs / 2)
        hs = torch.where(accepted, hs, torch.zeros_like(hs))
        return out.view(z.shape), hs

    def settle(self, u: Tensor, z_start: Tensor, z_ref: Tensor, steps: int, h: Optional[float] = None,
               backtrack: Optional[int] = None) -> Tuple[List[Tensor], List[Tensor]]:
        """``steps`` :meth:`stable_step` s from ``z_start``: (states z_0..z_steps, step sizes)."""
        zs, hs = [z_start], []
        z = z_start
        for _ in range(int(steps)):
            z, hk = self.stable_step(z, u, z_ref, h=h, backtrack=backtrack)
            zs.append(z)
            hs.append(hk)
        return zs, hs


# ------------------------------------------------------------------------------ diagnostics
@dataclass
class LyapunovTrace:
    """Lyapunov values along projected-dynamics trajectories started at ``z* + delta``.

    ``values``: (steps+1, B) ``V(z_k - z*)``; ``margins``: (steps, B) ``V_k - V_{k+1}`` (> 0 means
    decrease); ``flow_margins``: (steps, B) ``-(grad V^T F + alpha V)`` at ``z_k`` (>= 0 is the
    continuous-time guarantee ``dV/dt <= -alpha V``, up to rounding); ``step_sizes``: (steps, B);
    ``z_star``: the centre; ``residual``/``converged``: of the solve that produced it.
    """

    values: Tensor
    margins: Tensor
    flow_margins: Tensor
    step_sizes: Tensor
    z_star: Tensor
    residual: Tensor
    converged: Tensor
    alpha: float

    @property
    def relative_margins(self) -> Tensor:
        """(steps, B) decrease relative to the value before the step,
        ``(V_k - V_{k+1}) / V_k``."""
        return self.margins / self.values[:-1].clamp_min(torch.finfo(self.values.dtype).tiny)

    @property
    def decreasing(self) -> Tensor:
        """(B,) bool: V decreased strictly at every step."""
        return (self.margins > 0).all(0)

    def summary(self) -> dict:
        """The trace reduced to a JSON-ready dict: whether (and for which fraction of samples) V
        decreased at every step, the smallest absolute, relative and flow margins, the mean step
        size, the number of zero steps, the largest ``V_final / V_0`` and the fraction of
        converged solves."""
        tiny = torch.finfo(self.values.dtype).tiny
        flow_scale = self.values[:-1].abs().max().clamp_min(tiny)
        return {
            "all_decrease": bool(self.decreasing.all()),
            "decreasing_fraction": float(self.decreasing.float().mean()),
            "min_margin": float(self.margins.min()),
            "min_relative_margin": float(self.relative_margins.min()),
            "min_flow_margin": float(self.flow_margins.min()),
            "min_flow_margin_rel": float(self.flow_margins.min() / flow_scale),
            "mean_step": float(self.step_sizes.mean()),
            "zero_steps": int((self.step_sizes == 0).sum()),
            "final_over_initial": float((self.values[-1] / self.values[0].clamp_min(tiny)).max()),
            "converged_fraction": float(self.converged.float().mean()),
        }


def _as_lyadeq(model) -> LyaDEQ:
    if not isinstance(model, LyaDEQ):
        raise ConfigError(f"expected a LyaDEQ model, got {type(model).__name__} "
                          "(build one with zoo.build('lyadeq', ...))")
    return model


def random_perturbation(z: Tensor, radius: float, *, generator: Optional[torch.Generator] = None,
                        uniform_radius: bool = False) -> Tensor:
    """Per-sample random direction with L2 norm ``radius`` (or uniform in (0, radius])."""
    if not radius > 0:
        raise ConfigError(f"radius must be > 0, got {radius}")
    b = z.shape[0]
    d = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
    d = d / d.reshape(b, -1).norm(dim=1).clamp_min(1e-12).view(b, *([1] * (z.dim() - 1)))
    r = torch.full((b,), float(radius), dtype=z.dtype, device=z.device)
    if uniform_radius:
        r = r * torch.rand(b, generator=generator, dtype=z.dtype, device="cpu").to(z.device).clamp_min(1e-3)
    return d * r.view(b, *([1] * (z.dim() - 1)))


def lyapunov_trace(model: LyaDEQ, x: Tensor, steps: int = 10, *, radius: float = 1.0,
                   delta: Optional[Tensor] = None, h: Optional[float] = None,
                   backtrack: Optional[int] = None, seed: Optional[int] = 0,
                   solver: Union[SolverConfig, dict, None] = None) -> LyapunovTrace:
    """Solve ``z*(x)``, perturb the state to ``z* + delta`` and follow the projected dynamics.

    Args:
        model: a :class:`LyaDEQ`.
        x: inputs (B, *input_shape) in [0, 1].
        steps: number of :meth:`LyaDEQ.stable_step` s.
        radius: L2 norm of the random state perturbation (ignored when ``delta`` is given).
        delta: explicit perturbation (shape of ``z*``).
        h, backtrack: step size and maximum halvings (default: the model's; ``backtrack=0`` checks
            the plain fixed-step Euler map).
        seed: seed of the random direction (``None``: the global RNG).
        solver: solver config for the centre ``z*``. Default: the model's, tightened to
            ``max_iter >= 100`` and relative tolerance ``100 * machine epsilon`` of the dtype: the
            fixed-step map stalls at a distance of the order of the residual of ``z*`` (the centre
            is not exactly the fixed point of ``f``), which shows up as spurious increases of ``V``
            near the end of a trajectory when ``z*`` is solved loosely.

    Returns:
        :class:`LyapunovTrace` (``margins`` (steps, B) are the per-step decreases of ``V``).
    """
    model = _as_lyadeq(model)
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    with torch.no_grad():
        x = model.check_input(x)
        u = model.inject(x)
        if solver is None:
            cfg = model.solver_config
            solver = cfg.replace(max_iter=max(cfg.max_iter, 100), stop_mode="rel",
                                 tol=100 * torch.finfo(u.dtype).eps)
        res = model.solve(u, solver=solver)
        z_star = res.z
        if delta is None:
            delta = random_perturbation(z_star, radius, generator=seeded_generator(seed))
        elif delta.shape != z_star.shape:
            raise InputError(f"delta has shape {tuple(delta.shape)}, expected {tuple(z_star.shape)}")
        b = z_star.shape[0]
        z = z_star + delta.to(z_star.dtype)
        values, flow, hs = [], [], []
        for _ in range(int(steps)):
            v, gv = model.lyapunov_and_grad(z, z_star)
            Fz = model.stable_dynamics(z, u, z_star, create_graph=False).reshape(b, -1)
            values.append(v)
            flow.append(-((gv * Fz).sum(1) + model.alpha * v))
            z, hk = model.stable_step(z, u, z_star, h=h, backtrack=backtrack)
            hs.append(hk)
        values.append(model.lyapunov(z, z_star))
        V = torch.stack(values)
    return LyapunovTrace(values=V, margins=V[:-1] - V[1:], flow_margins=torch.stack(flow),
                         step_sizes=torch.stack(hs), z_star=z_star, residual=res.residual,
                         converged=res.converged, alpha=model.alpha)


# --------------------------------------------------------------------------------- training
class LyapunovStability:
    """Objective ``base(model, x, y) + weight * penalty`` that learns ``V`` and stabilises the DEQ.

    The penalty is evaluated at ``z_0 = z* + delta`` (``z*`` the detached fixed point, ``delta`` a
    random direction with norm uniform in (0, ``radius``]) and at the next ``steps - 1`` plain
    iterates ``z_{k+1} = f(z_k, u)`` (detached samples), on the *unprojected* dynamics:

    * ``condition="flow"`` (default; the continuous-time condition the projection enforces):
      ``mean ReLU((grad V^T fhat + alpha V) / V)`` with ``fhat = f(z, u) - z``;
    * ``condition="map"`` (the discrete solver iteration ``z <- f(z, u)``):
      ``mean ReLU((V(f(z, u) - z*) - (1 - alpha) V(z - z*)) / V(z - z*))``.

    States closer to ``z*`` than ``floor`` times its solver residual ``||f(z*) - z*||`` are left
    out (there the inexact centre, not the dynamics, decides). Both are scale-free in ``V`` and zero exactly where the DEQ's own dynamics already decrease
    ``V`` at rate ``alpha``; they train both the Lyapunov network and the DEQ. For contractive tanh
    cells the flow condition with ``alpha = 0.01`` is often already met (penalty 0) while the map
    condition is not. ``base`` defaults to cross-entropy on ``model(x)``; pass an adversarial
    objective (PGD-AT, TRADES, ...) for LyaDEQ + AT.

    The random perturbations come from a private generator seeded with ``seed`` (or the
    ``generator`` given); ``seed=None`` and no generator: the global RNG, as before.
    """

    name = "lyapunov"

    def __init__(self, base: Optional[Callable] = None, *, weight: float = 1.0, radius: float = 1.0,
                 samples: int = 1, steps: int = 1, condition: str = "flow", floor: float = 10.0,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None):
        if condition not in ("flow", "map"):
            raise ConfigError(f"unknown condition {condition!r}; expected 'flow' or 'map'")
        self.condition = condition
        # a value of the wrong type is a ConfigError too (the recipes pass JSON options through)
        for name, v, positive in (("weight", weight, False), ("radius", radius, True), ("floor", floor, False)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                    or not (v > 0 if positive else v >= 0):
                raise ConfigError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {v!r}")
        for name, v in (("samples", samples), ("steps", steps)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ConfigError(f"seed must be an int or None, got {seed!r}")
        self.steps, self.floor = int(steps), float(floor)
        self.base, self.weight, self.radius, self.samples = base, float(weight), float(radius), int(samples)
        if seed is not None and generator is not None:
            raise ConfigError("pass seed or generator, not both")
        self.seed = None if seed is None else int(seed)
        self._gen = generator if generator is not None else seeded_generator(self.seed)

    def reseed_generator(self, seed: int) -> None:
        """Restart the private generator from ``seed`` (each process of a multi-process run draws
        its own numbers); ``self.seed``, the recorded setting, is kept."""
        self._gen = torch.Generator().manual_seed(int(seed))

    def set_train_step(self, step: int) -> None:
        """Forwarded to the base objective (its schedules, e.g. the radius warm-up)."""
        set_step = getattr(self.base, "set_train_step", None)
        if callable(set_step):
            set_step(step)

    def penalty(self, model: LyaDEQ, x: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        """The Lyapunov penalty of ``model`` (a :class:`LyaDEQ`) on a batch ``x`` (see the class)
        and its scalars: ``(penalty, {"lyap_penalty", "lyap_violating", "lyap_samples"})``, with
        the fraction of sampled states violating the condition and the number of states counted.
        A ``ConfigError`` for another model. The solve and every evaluation of ``f`` use one weight
        (:func:`~robustdeq.deq.model.one_weight`; in train mode one power-iteration step of a
        spectrally normalised cell per penalty, and ``z*`` is the fixed point of the map the
        penalty differentiates)."""
        model = _as_lyadeq(model)
        x = model.check_input(x)
        with one_weight(model, join=True):
            return self._penalty(model, x)

    def _penalty(self, model: LyaDEQ, x: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        u = model.inject(x)
        with torch.no_grad():
            z_star = model.solve(u).z
        b = z_star.shape[0]
        tiny = torch.finfo(z_star.dtype).tiny
        with torch.no_grad():  # states closer to z* than its own residual carry no information
            floor = self.floor * (model.f(z_star, u) - z_star).reshape(b, -1).norm(dim=1)
        total, count, viol = z_star.new_zeros(()), 0, 0
        for _ in range(self.samples):
            z = z_star + random_perturbation(z_star, self.radius, uniform_radius=True, generator=self._gen)
            for _k in range(self.steps):
                fz = model.f(z, u)
                e = z - z_star
                keep = (e.reshape(b, -1).norm(dim=1) > floor).to(z.dtype)
                if self.condition == "flow":
                    v, gv = model.lyapunov_fn.value_and_grad(e, create_graph=True)
                    rate = ((gv * (fz - z).reshape(b, -1)).sum(1) + model.alpha * v) / v.clamp_min(tiny)
                else:
                    v = model.lyapunov_fn(e)
                    v_next = model.lyapunov_fn(fz - z_star)
                    rate = (v_next - (1 - model.alpha) * v) / v.clamp_min(tiny)
                total = total + (F.relu(rate) * keep).sum()
                count += int(keep.sum())
                viol += int(((rate > 0).to(z.dtype) * keep).sum())
                z = fz.detach()  # next sample: the solver's plain iterate
        pen = total / max(count, 1)
        return pen, {"lyap_penalty": float(pen.detach()), "lyap_violating": viol / max(count, 1),
                     "lyap_samples": float(count)}

    def __call__(self, model, x, y):
        if self.base is None:
            from .objectives import CrossEntropy
            base = CrossEntropy()
        else:
            base = self.base
        # the base objective's loss and the penalty use one weight (the cache opens at the base's
        # loss, after its attack: robustdeq.deq.model.shared_weights)
        with shared_weights():
            loss, scalars = base(model, x, y)
            scalars = dict(scalars)
            if self.weight > 0:
                pen, ps = self.penalty(model, x)
                loss = loss + self.weight * pen
                scalars.update(ps)
        return loss, scalars

    def describe(self) -> dict:
        """The objective's settings as a JSON-ready dict, with the base objective's description
        (and the seed when one was given)."""
        d = getattr(self.base, "describe", None)
        base = d() if callable(d) else ({"name": "standard"} if self.base is None else type(self.base).__name__)
        return {"name": self.name, "weight": self.weight, "radius": self.radius,
                "samples": self.samples, "steps": self.steps, "condition": self.condition, "floor": self.floor,
                "base": base, **({"seed": self.seed} if self.seed is not None else {})}


# -------------------------------------------------------------------------------------- zoo
# zoo.build("lyadeq", ...): robustdeq.registry.MODELS names this builder
def lyadeq(in_shape=(1, 8, 8), num_classes=10, hidden=None, backbone="mlp", act=None, norm=None,
           scale=None, init_gain=0.5, channels=None, groups=None, pool=None, mean=0.0, std=1.0,
           icnn_hidden=(64, 64), icnn_act="softplus", alpha=0.01, eps_v=0.01, rehu_d=1.0, step=1.0,
           backtrack=20, armijo=0.5, solver: Optional[dict] = None, grad="ift",
           grad_options: Optional[dict] = None) -> LyaDEQ:
    """LyaDEQ with an MLP (``z = act(W z + U x + b)``, separation on ``z``; ``hidden`` 64, ``act``
    "tanh", ``norm`` "none", ``scale`` 1.0), a convolutional (``channels`` 16, ``groups`` 4,
    ``norm`` "none") or an MDEQ-style multiscale backbone (``channels`` 16 and 32, ``groups`` 4;
    separation on the ``pool x pool`` average-pooled state, ``pool`` 2). An option the chosen
    backbone does not use is a :class:`~robustdeq.errors.ConfigError`."""
    from ..deq.grad import make_estimator
    uses = {"mlp": ("hidden", "act", "norm", "scale"), "conv": ("channels", "groups", "norm", "pool"),
            "mdeq": ("channels", "groups", "pool")}
    given = {"hidden": hidden, "act": act, "norm": norm, "scale": scale, "channels": channels,
             "groups": groups, "pool": pool}
    if backbone in uses:
        idle = [k for k, v in given.items() if v is not None and k not in uses[backbone]]
        if idle:
            raise ConfigError(f"LyaDEQ backbone {backbone!r} does not use {', '.join(idle)} (it uses "
                              f"{', '.join(uses[backbone])})")
    hidden = 64 if hidden is None else hidden
    act = "tanh" if act is None else act
    norm = "none" if norm is None else norm
    scale = 1.0 if scale is None else scale
    channels = 16 if channels is None else channels
    groups = 4 if groups is None else groups
    pool = 2 if pool is None else pool
    in_shape = tuple(int(s) for s in in_shape)
    estimator = make_estimator(grad, **(grad_options or {}))
    common = dict(icnn_hidden=tuple(icnn_hidden), icnn_act=icnn_act, alpha=alpha, eps_v=eps_v,
                  rehu_d=rehu_d, step=step, backtrack=backtrack, armijo=armijo, solver=solver,
                  grad=estimator, input_shape=in_shape)
    if backbone == "mlp":
        n_in = int(math.prod(in_shape))
        return LyaDEQ(MLPInjection(n_in, hidden, mean, std),
                      MLPCell(hidden, act=act, norm=norm, scale=scale, init_gain=init_gain),
                      SeparationHead(nn.Flatten(), hidden, num_classes), state_dim=hidden, **common)
    if backbone == "conv":
        if len(in_shape) != 3:
            raise ConfigError(f"backbone 'conv' needs in_shape (C, H, W), got {in_shape}")
        mean_t = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,)
        std_t = tuple(std) if isinstance(std, (list, tuple)) else (std,)
        dim = channels * pool * pool
        return LyaDEQ(ConvInjection(in_shape[0], channels, mean_t, std_t),
                      ConvCell(channels, groups=groups, norm=norm, init_gain=init_gain),
                      SeparationHead(_PoolFlatten(pool), dim, num_classes),
                      state_dim=channels * in_shape[1] * in_shape[2], **common)
    if backbone == "mdeq":  # the multiscale conv DEQ of deq.multiscale (zoo defaults: 16/32 ch)
        from ..deq.multiscale import MultiscaleCell, MultiscaleInjection, PackedShape, branch_shapes
        if len(in_shape) != 3:
            raise ConfigError(f"backbone 'mdeq' needs in_shape (C, H, W), got {in_shape}")
        mean_t = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,)
        std_t = tuple(std) if isinstance(std, (list, tuple)) else (std,)
        layout = PackedShape(branch_shapes(in_shape[1:], (channels, 2 * channels)))

        class _PackedPool(nn.Module):
            def forward(self, z: Tensor) -> Tensor:
                return torch.cat([F.adaptive_avg_pool2d(p, pool).flatten(1) for p in layout.unpack(z)], 1)
        return LyaDEQ(MultiscaleInjection(in_shape[0], layout, groups, 2, mean_t, std_t),
                      MultiscaleCell(layout, groups=groups, init_gain=init_gain),
                      SeparationHead(_PackedPool(), 3 * channels * pool * pool, num_classes),
                      state_dim=layout.dim, **common)
    raise ConfigError(f"unknown LyaDEQ backbone {backbone!r}; expected 'mlp', 'conv' or 'mdeq'")


__all__ = ["rehu", "ICNN", "LyapunovFunction", "project_dynamics", "SeparationHead", "LyaDEQ",
           "LyapunovTrace", "lyapunov_trace", "random_perturbation", "LyapunovStability", "lyadeq"]

