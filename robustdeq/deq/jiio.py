"""Joint inference and input optimisation (JIIO; Gurumurthy, Bai, Manchester, Kolter, NeurIPS 2021): the
engine shared by the JIIO attack (:mod:`robustdeq.attacks.jiio`) and JIIO adversarial training
(``robustdeq.defenses.objectives.JIIOAT``).

Problem. Optimise an input ``x`` (an image, a perturbed image, a latent code) through a DEQ::

    min_{x in C}  l(h(z*), x)     s.t.  z* = f(z*, inj(x))                                 (P)

with ``h`` the read-out and ``l`` a per-sample objective (``l = -CE`` for an attack, a masked MSE
for an inverse problem). The naive method alternates, for every step on ``x``, a forward solve and
an adjoint solve. JIIO instead solves one augmented fixed point over ``v = (z, mu, x)``.

KKT conditions. With the Lagrangian ``L(z, x, mu) = l(h(z), x) + mu^T (f(z, x) - z)``, a KKT point
of (P) (``C`` convex, indicator ``i_C``) satisfies::

    (primal)  z  = f(z, x)
    (adjoint) mu = grad_z l(h(z), x) + J_z^T mu           i.e. (I - J_z)^T mu = grad_z l
    (input)   0 in grad_x l + J_x^T mu + N_C(x)           i.e. x = Proj_C(x - alpha * g_x)

where ``J_z = df/dz``, ``J_x = df/dx`` (through the injection) and ``g_x = grad_x l + J_x^T mu``.
By the implicit function theorem ``mu`` is then exactly the IFT adjoint of ``l`` at ``z*`` and
``g_x = d l(h(z*(x)), x) / dx`` is the exact total input gradient, so the input condition is the
projected-gradient stationarity of (P): ``x = Proj_C(x - alpha g_x)`` for any ``alpha > 0`` (for a
box ``C``: ``g_x,i >= 0`` where ``x_i`` sits at its lower bound, ``<= 0`` at its upper bound and
``= 0`` in the interior).

The augmented map (one evaluation of ``f`` and ONE vector-Jacobian product per iteration: a
single ``autograd.grad`` call with cotangents ``[1, mu]`` on ``[l, f(z, x)]`` gives both
``grad_z l + J_z^T mu`` and ``g_x``)::

    mu+ = mu + beta_mu (grad_z l(h(z), x) + J_z^T mu - mu)                      beta_mu = 0.6
    z+  = z  + beta_z  (f(z, x) - z)                                            beta_z  = 0.8
    x+  = Proj_C(x - alpha * d(g_x)),  d = sign (Linf attacks), g/||g||_2 (paper, L2), or g

Its fixed points are the KKT points above when ``d`` is the plain gradient, and the sign /
normalised variants have the same fixed points on the boundary of ``C`` (the sign map is
discontinuous: interior coordinates with a non-zero gradient never settle, as in PGD). The map is
solved with the backbone's solver on the stacked, flattened vector, ``iters`` iterations with no
early stop (``tol=0``): Anderson (memory 20, the paper's choice, and the default of
:func:`optimize_inputs`) or plain fixed-point iteration of the damped map (the default of the
attack and of JIIO-AT: with sign or normalised input steps Anderson's extrapolation can make the
attack weaker, benchmarks/bench_jiio.py compares them, while on smooth problems it converges
fast). ``x`` is projected at the start of every evaluation so Anderson's affine extrapolations
never leave ``C``. The plain iteration runs on the three blocks directly (no packing into one vector, the bounds of
box-like constraints computed once, no per-iteration synchronisation): the same iterates,
selection and per-sample stopping as the generic fixed-point solver on the stacked vector, with
fewer tensor operations per iteration (which dominate on small models).
After the solve ``z*`` is re-solved at the returned ``x`` with the model's own solver
(warm-started from the joint ``z``): the prediction is only as good as that re-solve.

Cost: one iteration = one cell evaluation + one VJP (see :class:`CostCounter`), so K iterations
cost about 2K cell evaluations, against k x (forward solve + adjoint solve) for PGD-k.

For attacks ``x`` is parametrised as ``x_clean + delta`` with ``delta_0 = 0``: this module works on
``x`` directly, with the constraint ``LinfBall(x_clean, eps) & Box(0, 1)``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._tensor import ball_factor, bshape, per_sample_norm
from ..config import Norm, SolverConfig, check_radius, coerce_enum
from ..errors import ConfigError, InputError
from ..guard import preserve_model
from .protocols import FixedPointModel
from .solvers import get_solver

logger = logging.getLogger(__name__)

# (out, x) -> per-sample objective (B,) to minimise; ``out`` is readout(z) (or z, readout=False)
InputObjective = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "Constraint", "Unconstrained", "Box", "LinfBall", "L2Ball", "Mask", "Intersection",
    "JIIOConfig", "InputOptResult", "optimize_inputs", "jiio_attack", "kkt_residuals",
    "CostCounter", "cross_entropy_objective", "threat_constraint", "DIRECTIONS", "check_jiio_model",
]


# ============================================================================== constraints
class Constraint:
    """A convex set ``C`` with a projection ``project(x) -> x`` (batched, shape-preserving).

    Box-like sets (boxes, Linf balls, masks) also expose ``bounds(x) -> (lo, hi)``; an
    :class:`Intersection` of box-like sets is then projected exactly by one clamp.
    """

    def project(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        """The projection of ``x`` onto ``C`` (batched, same shape as ``x``)."""
        raise NotImplementedError

    def bounds(self, x: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """Per-coordinate ``(lo, hi)`` for box-like sets, ``None`` otherwise."""
        return None

    def contains(self, x: Tensor, tol: float = 1e-6) -> Tensor:
        """Per-sample bool (B,): ``x`` is in ``C`` up to ``tol`` (distance to its projection)."""
        d = (x - self.project(x)).flatten(1).abs().amax(dim=1) if x.numel() else x.new_zeros(x.shape[0])
        return d <= tol

    def __and__(self, other: "Constraint") -> "Intersection":
        return Intersection(self, other)

    def describe(self) -> dict:
        """The constraint's type and settings as a JSON-ready dict."""
        return {"type": type(self).__name__}


class Unconstrained(Constraint):
    """``C = R^d``."""

    def project(self, x):
        """``x`` unchanged."""
        return x

    def bounds(self, x):
        """``(-inf, +inf)`` everywhere."""
        inf = torch.full_like(x, float("inf"))
        return -inf, inf


class Box(Constraint):
    """``lo <= x <= hi`` coordinatewise (scalars or tensors broadcastable to ``x``)."""

    def __init__(self, lo: Union[float, Tensor] = 0.0, hi: Union[float, Tensor] = 1.0):
        if not isinstance(lo, Tensor) and not isinstance(hi, Tensor) and not lo <= hi:
            raise ConfigError(f"Box needs lo <= hi, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def bounds(self, x):
        """``(lo, hi)`` broadcast to the shape of ``x`` (in its dtype and on its device)."""
        lo = self.lo if isinstance(self.lo, Tensor) else torch.full_like(x, float(self.lo))
        hi = self.hi if isinstance(self.hi, Tensor) else torch.full_like(x, float(self.hi))
        return lo.to(x).expand_as(x), hi.to(x).expand_as(x)

    def project(self, x):
        """``x`` clamped to ``[lo, hi]`` coordinatewise."""
        lo, hi = self.bounds(x)
        return torch.maximum(torch.minimum(x, hi), lo)

    def describe(self):
        """``{"type": "Box", "lo", "hi"}`` (a tensor bound is reported as ``"tensor"``)."""
        f = lambda v: float(v) if not isinstance(v, Tensor) else "tensor"  # noqa: E731
        return {"type": "Box", "lo": f(self.lo), "hi": f(self.hi)}


class LinfBall(Constraint):
    """``||x - center||_inf <= eps`` per sample."""

    def __init__(self, center: Tensor, eps: float):
        self.center, self.eps = center.detach(), check_radius(eps, "LinfBall.eps")

    def bounds(self, x):
        """``(center - eps, center + eps)``."""
        c = self.center.to(x)
        return c - self.eps, c + self.eps

    def project(self, x):
        """``x`` clamped to within ``eps`` of ``center`` coordinatewise."""
        c = self.center.to(x)
        return c + (x - c).clamp(-self.eps, self.eps)

    def describe(self):
        """``{"type": "LinfBall", "eps"}``."""
        return {"type": "LinfBall", "eps": self.eps}


class L2Ball(Constraint):
    """``||x - center||_2 <= eps`` per sample (norm over all non-batch dimensions)."""

    def __init__(self, center: Tensor, eps: float):
        self.center, self.eps = center.detach(), check_radius(eps, "L2Ball.eps")

    def project(self, x):
        """``x`` radially scaled towards ``center`` where it lies outside the ball (per sample),
        else unchanged."""
        c = self.center.to(x)
        d = x - c
        return c + d * ball_factor(per_sample_norm(d), self.eps).view(bshape(d))

    def describe(self):
        """``{"type": "L2Ball", "eps"}``."""
        return {"type": "L2Ball", "eps": self.eps}


class Mask(Constraint):
    """Known coordinates are fixed: ``x = values`` where ``mask`` is true, free elsewhere
    (inpainting with the observed pixels kept)."""

    def __init__(self, mask: Tensor, values: Tensor):
        if mask.shape != values.shape:
            raise ConfigError(f"Mask: mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
        self.mask, self.values = mask.bool(), values.detach()

    def bounds(self, x):
        """``values`` as both bounds where ``mask`` is true, ``(-inf, +inf)`` elsewhere."""
        v = self.values.to(x)
        inf = torch.full_like(x, float("inf"))
        return torch.where(self.mask, v, -inf), torch.where(self.mask, v, inf)

    def project(self, x):
        """``x`` with the known coordinates set to ``values``."""
        return torch.where(self.mask, self.values.to(x), x)

    def describe(self):
        """``{"type": "Mask", "known_fraction"}``: the fraction of fixed coordinates."""
        return {"type": "Mask", "known_fraction": float(self.mask.float().mean())}


class Intersection(Constraint):
    """Intersection of constraints. Exact when every member is box-like (one clamp to the
    intersected bounds, which must be non-empty); otherwise the members are projected in order,
    the box-like ones last (for an L2 ball centred inside a box this returns a point of both sets,
    not necessarily the Euclidean projection onto the intersection)."""

    def __init__(self, *members: Constraint):
        flat: List[Constraint] = []
        for m in members:
            if not isinstance(m, Constraint):
                raise ConfigError(f"not a Constraint: {m!r}")
            flat.extend(m.members if isinstance(m, Intersection) else [m])
        if not flat:
            raise ConfigError("Intersection of no constraints")
        self.members = flat

    def bounds(self, x):
        """The intersected bounds (the largest ``lo`` and smallest ``hi`` over the members) when
        every member is box-like, else None."""
        bs = [m.bounds(x) for m in self.members]
        if any(b is None for b in bs):
            return None
        lo = torch.stack([b[0] for b in bs]).amax(dim=0)
        hi = torch.stack([b[1] for b in bs]).amin(dim=0)
        return lo, hi

    def project(self, x):
        """One clamp to the intersected bounds when every member is box-like (an ``InputError``
        if they are empty somewhere), else the members' projections in turn (see the class)."""
        b = self.bounds(x)
        if b is not None:
            lo, hi = b
            if bool((lo > hi + 1e-12).any()):
                raise InputError("empty intersection of constraints (lower bound above upper bound)")
            return torch.maximum(torch.minimum(x, hi), lo)
        nonbox = [m for m in self.members if m.bounds(x) is None]
        box = [m for m in self.members if m.bounds(x) is not None]
        for m in nonbox + box:
            x = m.project(x)
        return x

    def describe(self):
        """``{"type": "Intersection", "members": [...]}`` with each member's description."""
        return {"type": "Intersection", "members": [m.describe() for m in self.members]}


def threat_constraint(x: Tensor, eps: float, norm: Union[str, Norm] = "Linf") -> Constraint:
    """``B_eps(x) & [0, 1]`` for the threat model ``norm`` ("Linf" or "L2")."""
    norm = coerce_enum(Norm, norm, "norm")
    ball = LinfBall(x, eps) if norm == Norm.LINF else L2Ball(x, eps)
    return Intersection(ball, Box(0.0, 1.0))


def cross_entropy_objective(y: Tensor) -> InputObjective:
    """``l = -CE(logits, y)`` per sample: minimising it maximises the cross-entropy (attack)."""
    def objective(logits: Tensor, x: Tensor) -> Tensor:
        return -F.cross_entropy(logits, y, reduction="none")
    return objective


# ============================================================================== config
#: directions of the input step (``JIIOConfig.direction``)
DIRECTIONS = ("sign", "normalized", "gradient")
_STEPS = DIRECTIONS


@dataclass(frozen=True)
class JIIOConfig:
    """Settings of the augmented solve (defaults: the configs of the authors' JIIO-DEQ code, Gurumurthy et al. 2021, Sec. 3-4).

    ``alpha`` is the step on ``x``; after iteration ``switch_at`` (default ``round(5 iters / 8)``,
    i.e. 50 for the paper's 80) it becomes ``alpha_final`` (default: ``alpha``; the solver memory
    is reset at the switch because the map changed). ``direction``: "sign" (Linf), "normalized"
    (per-sample ``g / ||g||_2``, the paper's choice) or "gradient" (plain; the only choice whose
    fixed points are exactly the KKT points in the interior of C). ``solver``: "anderson" (memory
    ``m``, regularisation ``lam``) or "fixed_point" (plain iteration of the augmented map).
    ``select``: which iterate the solve returns ("best": lowest residual of the augmented map;
    "last": the last evaluated iterate; "next": the solver's next iterate after the last
    evaluation, i.e. the map's output there for the plain iteration, so that K evaluations make K
    input steps: the same state "last" returns after K + 1 evaluations, one evaluation cheaper;
    its ``residual`` is the last evaluated iterate's). ``resolve``: re-solve z* at the returned x
    with the model's solver. ``readout``: the objective receives ``readout(z)`` (True) or ``z``.
    ``weights``: scales of the (z, mu, x) blocks in the stacked vector (only Anderson's
    least-squares weighting depends on them).
    """

    iters: int = 80
    alpha: float = 0.1
    alpha_final: Optional[float] = None
    switch_at: Optional[int] = None
    direction: str = "normalized"
    solver: str = "anderson"
    m: int = 20
    lam: float = 1e-4
    beta_z: float = 0.8
    beta_mu: float = 0.6
    select: str = "best"
    resolve: bool = True
    readout: bool = True
    weights: Tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ConfigError(f"JIIOConfig.iters must be an int >= 1, got {self.iters!r}")
        if not self.alpha >= 0:
            raise ConfigError(f"JIIOConfig.alpha must be >= 0, got {self.alpha}")
        if self.alpha_final is not None and not self.alpha_final >= 0:
            raise ConfigError(f"JIIOConfig.alpha_final must be >= 0, got {self.alpha_final}")
        if self.switch_at is not None and self.switch_at < 0:
            raise ConfigError(f"JIIOConfig.switch_at must be >= 0, got {self.switch_at}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"unknown JIIO step direction {self.direction!r}; expected one of "
                              f"{', '.join(DIRECTIONS)}")
        if self.solver not in ("anderson", "fixed_point"):
            raise ConfigError(f"unknown JIIO solver {self.solver!r}; expected 'anderson' or 'fixed_point'")
        if self.select not in ("best", "last", "next"):
            raise ConfigError(f"unknown JIIOConfig.select {self.select!r}; expected 'best', 'last' or 'next'")
        if self.m < 1:
            raise ConfigError(f"JIIOConfig.m must be >= 1, got {self.m}")
        if len(self.weights) != 3 or not all(w > 0 for w in self.weights):
            raise ConfigError(f"JIIOConfig.weights must be three positive numbers, got {self.weights!r}")
        for name in ("beta_z", "beta_mu"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"JIIOConfig.{name} must be in (0, 1], got {v}")

    @property
    def switch(self) -> int:
        """The iteration after which the input step becomes ``alpha_final``."""
        return self.switch_at if self.switch_at is not None else int(round(5 * self.iters / 8))

    def solver_config(self) -> SolverConfig:
        """The :class:`~robustdeq.config.SolverConfig` of the augmented solve: ``iters``
        iterations with no early stop (``tol=0``), ``m`` and ``lam`` for Anderson, relative
        residuals."""
        return SolverConfig(name=self.solver, max_iter=self.iters, tol=0.0, m=self.m, lam=self.lam,
                            select="best" if self.select == "best" else "last", stop_mode="rel")


def default_direction(norm, direction: Optional[str] = None) -> str:
    """The input-step direction of the JIIO attacks: ``direction``, else "sign" for Linf and
    "normalized" for L2 (the attack and JIIO-AT; :func:`optimize_inputs` defaults to "gradient"
    and a bare :class:`JIIOConfig` to the paper's "normalized")."""
    if direction is not None:
        return direction
    return "sign" if coerce_enum(Norm, norm, "norm") == Norm.LINF else "normalized"


@dataclass
class InputOptResult:
    """Outcome of :func:`optimize_inputs`.

    ``x`` (B, *x_shape) the optimised input (in C); ``z`` (B, *z_shape) the fixed point re-solved
    at ``x`` (the joint iterate when ``resolve=False``); ``z_joint``/``mu`` the augmented solve's
    state and adjoint; ``objective`` (B,) the objective at (re-solved z, x); ``history`` per
    iteration: ``residual`` (mean relative residual of the augmented map) and ``objective`` (mean
    objective at the evaluated iterate); ``nfe`` evaluations of ``f`` in the joint solve (each
    with one VJP) and ``resolve_nfe`` in the re-solve.
    """

    x: Tensor
    z: Tensor
    mu: Tensor
    z_joint: Tensor
    objective: Tensor
    residual: Tensor
    history: dict = field(default_factory=dict)
    nfe: int = 0
    resolve_nfe: int = 0
    logits: Optional[Tensor] = None


# ============================================================================== helpers
def check_jiio_model(model: nn.Module) -> None:
    """Raise a ``ConfigError`` naming the missing members unless ``model`` is a fixed-point model
    (:class:`~robustdeq.deq.protocols.FixedPointModel`: ``inject``, ``run``, ``f``, ``readout``,
    ``init_state``, ``solve``)."""
    if not isinstance(model, FixedPointModel):
        missing = [a for a in ("inject", "f", "readout", "init_state", "solve") if not hasattr(model, a)]
        raise ConfigError(
            f"JIIO needs a DEQ with a fixed point and a solver (inject, f, readout, init_state, solve); "
            f"{type(model).__name__} lacks {', '.join(missing) or 'run'}")


def _frozen_params(model: nn.Module):
    """Parameters temporarily stop requiring gradients (inner problems only need x and z); every
    flag restored on exit (:func:`robustdeq.guard.preserve_model`)."""
    import contextlib

    @contextlib.contextmanager
    def frozen():
        with preserve_model(model, "keep", values=False, who="JIIO"):
            for p in model.parameters():
                p.requires_grad_(False)
            yield
    return frozen()


def _direction(g: Tensor, direction: str) -> Tensor:
    if direction == "sign":
        return g.sign()
    if direction == "normalized":
        n = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
        return g / (n + 1e-12)
    return g


#: the built-in sets whose bounds depend on x's shape only, not on its values
_BOX_LIKE = (Box, LinfBall, Mask, Unconstrained)


def _projector(constraint: Constraint, like: Tensor) -> Callable[[Tensor], Tensor]:
    """The projection onto ``constraint`` for inputs shaped like ``like``, with the bounds of the
    built-in box-like sets (:class:`Box`, and :class:`Intersection` of :class:`Box`,
    :class:`LinfBall`, :class:`Mask`, :class:`Unconstrained`) computed once: the same clamp as
    their ``project``, without rebuilding the bounds at every evaluation. Other sets (and
    user-defined subclasses) are projected by their own ``project``."""
    t = type(constraint)
    if t is Unconstrained:
        return lambda x: x
    if t is Box or (t is Intersection and all(type(m) in _BOX_LIKE for m in constraint.members)):
        lo, hi = constraint.bounds(like)
        if t is Intersection and bool((lo > hi + 1e-12).any()):
            raise InputError("empty intersection of constraints (lower bound above upper bound)")
        lo, hi = lo.contiguous(), hi.contiguous()
        if bool((lo <= hi).all()):  # then clamp (max with lo first) is the same as min with hi first
            return lambda x: torch.clamp(x, lo, hi)
        return lambda x: torch.maximum(torch.minimum(x, hi), lo)
    return constraint.project


class _Augmented:
    """The augmented map ``(z, mu, x) -> (z+, mu+, x+)``; :meth:`__call__` is the same map on the
    flattened stacked vector ``v = [wz z; wm mu; wx x]`` of shape (B, D) (for the solvers)."""

    def __init__(self, model, objective, constraint, x_shape, z_shape, cfg: JIIOConfig,
                 like: Optional[Tensor] = None):
        self.model, self.objective, self.constraint, self.cfg = model, objective, constraint, cfg
        self.x_shape, self.z_shape = tuple(x_shape), tuple(z_shape)
        self.dz = math.prod(z_shape[1:])
        self.dx = math.prod(x_shape[1:])
        self.alpha = cfg.alpha
        self.project = constraint.project if like is None else _projector(constraint, like)
        self._objective: List[Tensor] = []   # mean objective per evaluation (tensors: no sync)

    @property
    def history_obj(self) -> List[float]:
        """Mean objective at each evaluated iterate."""
        return torch.stack(self._objective).tolist() if self._objective else []

    def pack(self, z, mu, x):
        b = z.shape[0]
        wz, wm, wx = self.cfg.weights
        return torch.cat([wz * z.reshape(b, -1), wm * mu.reshape(b, -1), wx * x.reshape(b, -1)], dim=1)

    def unpack(self, v):
        dz, dx = self.dz, self.dx
        wz, wm, wx = self.cfg.weights
        z = v[:, :dz].reshape(self.z_shape) / wz
        mu = v[:, dz:2 * dz].reshape(self.z_shape) / wm
        x = v[:, 2 * dz:2 * dz + dx].reshape(self.x_shape) / wx
        return z, mu, x

    def grads(self, z, mu, x):
        """One f evaluation and one VJP: ``(f(z, x), l, grad_z l + J_z^T mu, grad_x l + J_x^T mu)``."""
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            xr = x.detach().requires_grad_(True)
            u = self.model.inject(xr)
            fz = self.model.f(zr, u)
            out = self.model.readout(zr) if self.cfg.readout else zr
            l = self.objective(out, xr)
            if l.shape != (z.shape[0],):
                raise ConfigError(f"the objective must return one value per sample, shape "
                                  f"({z.shape[0]},), got {tuple(l.shape)}")
            gz, gx = torch.autograd.grad([l.sum(), fz], [zr, xr], [None, mu.detach()], allow_unused=True)
        gz = torch.zeros_like(z) if gz is None else gz
        gx = torch.zeros_like(x) if gx is None else gx
        return fz.detach(), l.detach(), gz, gx

    def map(self, z: Tensor, mu: Tensor, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One evaluation of the augmented map (``x`` projected first)."""
        x = self.project(x)
        fz, l, gz, gx = self.grads(z, mu, x)
        self._objective.append(l.mean())
        cfg = self.cfg
        mu_n = mu + cfg.beta_mu * (gz - mu)
        z_n = z + cfg.beta_z * (fz - z)
        x_n = self.project(torch.add(x, _direction(gx, cfg.direction), alpha=-self.alpha))  # x - alpha d
        return z_n, mu_n, x_n

    def __call__(self, v: Tensor) -> Tensor:
        return self.pack(*self.map(*self.unpack(v)))

    def residual(self, v: Tuple[Tensor, Tensor, Tensor], gv: Tuple[Tensor, Tensor, Tensor],
                 eps: float) -> Tensor:
        """Per-sample relative residual ``||G(v) - v|| / (||G(v)|| + eps)`` of the stacked,
        weighted vector (the solvers' "rel" residual), from the blocks."""
        b = v[0].shape[0]
        w = self.cfg.weights
        if w == (1.0, 1.0, 1.0):
            d = torch.cat([(ga - a).reshape(b, -1) for a, ga in zip(v, gv)], dim=1)
            n = torch.cat([ga.reshape(b, -1) for ga in gv], dim=1)
        else:
            d = torch.cat([wi * (ga - a).reshape(b, -1) for wi, a, ga in zip(w, v, gv)], dim=1)
            n = torch.cat([wi * ga.reshape(b, -1) for wi, ga in zip(w, gv)], dim=1)
        return torch.linalg.vector_norm(d, dim=1).div_(torch.linalg.vector_norm(n, dim=1).add_(eps))


def _plain_iteration(aug: _Augmented, z: Tensor, mu: Tensor, x: Tensor, cfg: JIIOConfig,
                     progress: bool = False):
    """``cfg.iters`` plain iterations of the augmented map on the blocks ``(z, mu, x)``: the same
    iterates, selection and per-sample stopping as the generic fixed-point solver on the stacked
    vector (:class:`~robustdeq.deq.solvers.FixedPointIteration`, ``tol=0``, "rel" residual; a
    sample stops when its residual is exactly 0 or grows above ``divergence_factor`` times its
    first one, and keeps its last iterate), without packing the blocks into one vector or
    synchronising per iteration. Returns ``((z, mu, x) selected, residual (B,), residual history
    [(B,)], nfe)``."""
    scfg = cfg.solver_config()
    eps, factor, best_mode = scfg.eps, scfg.divergence_factor, cfg.select == "best"
    v = (z, mu, x)
    b = z.shape[0]
    inf = torch.full((b,), float("inf"), dtype=x.dtype, device=x.device)
    best, best_res = v, inf
    stopped = torch.zeros(b, dtype=torch.bool, device=x.device)
    thresh = None
    history: List[Tensor] = []
    last = last_res = None
    it = range(cfg.iters)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="JIIO")

    def pick(mask, a, c):  # per sample: a where mask else c, for the three blocks
        return tuple(torch.where(mask.view(-1, *([1] * (ai.dim() - 1))), ai, ci) for ai, ci in zip(a, c))

    any_stopped = False
    for k in it:
        if k == cfg.switch and cfg.alpha_final is not None and cfg.alpha_final != aug.alpha:
            aug.alpha = cfg.alpha_final          # the map changed: restart the bookkeeping
            best, best_res, thresh = v, inf, None
            stopped, any_stopped = torch.zeros_like(stopped), False
        gv = aug.map(*v)
        res = aug.residual(v, gv, eps)
        if thresh is None:
            thresh = factor * (torch.where(torch.isfinite(res), res, torch.ones_like(res)) + eps)
        go = (res > 0) & (res <= thresh)  # False where a sample stops: zero, diverged or non-finite residual
        common = bool(go.all())
        if not common:
            res = torch.where(torch.isfinite(res), res, inf)
        if best_mode:
            improved = res < best_res
            if any_stopped:
                improved &= ~stopped
            if bool(improved.all()):
                best, best_res = v, res
            else:
                best = pick(improved, v, best)
                best_res = torch.where(improved, res, best_res)
        last, last_res = v, res
        history.append(res)
        if common and not any_stopped:
            v = gv
        else:
            stopped = stopped | ~go
            any_stopped = True
            v = pick(stopped, v, gv)
    if best_mode:
        has = torch.isfinite(best_res)
        sel, res = pick(has, best, last), torch.where(has, best_res, last_res)
    elif cfg.select == "next":  # the map's output (stopped samples: their last iterate)
        sel, res = v, last_res
    else:
        sel, res = last, last_res
    return sel, res, history, cfg.iters


# ============================================================================== the solve
def optimize_inputs(model: nn.Module, objective: InputObjective, constraint: Optional[Constraint] = None,
                    *, x0: Optional[Tensor] = None, iters: Optional[int] = None,
                    step_size: Optional[float] = None, direction: Optional[str] = None,
                    solver: Optional[str] = None, config: Optional[JIIOConfig] = None,
                    z0: Optional[Tensor] = None, progress: bool = False,
                    **options) -> InputOptResult:
    """Solve ``min_{x in C} objective(h(z*(x)), x)`` by the JIIO augmented fixed point.

    Args:
        model: a DEQ exposing ``inject``, ``f``, ``readout``, ``init_state``, ``solve``
            (e.g. :class:`~robustdeq.deq.model.DEQClassifier`). Its parameters are not trained.
        objective: ``(out, x) -> (B,)`` per-sample value to minimise; ``out = readout(z)``
            (or ``z`` itself with ``readout=False``).
        constraint: a :class:`Constraint` (``None``: unconstrained).
        x0: (B, *x_shape) starting input; default: the constraint's ``center`` or ``values``.
        iters: augmented iterations K, no early stop (default 80). step_size: the step ``alpha``
            on x (default 0.1). direction: "gradient" (default here: the KKT fixed points),
            "normalized" or "sign". solver: "anderson" (default) or "fixed_point". config: a full
            :class:`JIIOConfig` (then iters/step_size/... must not be given). Further keyword
            options go to
            :class:`JIIOConfig` (``m``, ``beta_z``, ``alpha_final``, ``resolve``, ...).
        z0: initial state of the joint solve (default ``model.init_state``; the adjoint starts at 0).
        progress: tqdm progress bar over the iterations.

    Returns:
        :class:`InputOptResult` with the projected ``x``, the re-solved fixed point ``z``, the
        adjoint ``mu`` and per-iteration history.
    """
    check_jiio_model(model)
    if config is not None:
        if options or any(v is not None for v in (iters, step_size, direction, solver)):
            raise ConfigError("pass either config=JIIOConfig(...) or individual options, not both")
        if not isinstance(config, JIIOConfig):
            raise ConfigError(f"config must be a JIIOConfig, got {type(config).__name__}")
        cfg = config
    else:
        try:
            cfg = JIIOConfig(iters=80 if iters is None else iters,
                             alpha=0.1 if step_size is None else float(step_size),
                             direction=direction or "gradient", solver=solver or "anderson", **options)
        except TypeError as e:
            raise ConfigError(f"bad option for optimize_inputs: {e}") from None
    constraint = constraint if constraint is not None else Unconstrained()
    if not isinstance(constraint, Constraint):
        raise ConfigError(f"constraint must be a robustdeq.deq.jiio.Constraint, got {type(constraint).__name__}")
    if x0 is None:
        x0 = _default_start(constraint)
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise InputError("x0 must be a floating-point tensor")
    if not bool(torch.isfinite(x0).all()):
        raise InputError("x0 has non-finite values")
    x0 = constraint.project(x0.detach())
    return _solve(model, objective, constraint, x0, cfg, z0=z0, progress=progress)


def _default_start(constraint: Constraint) -> Tensor:
    members = constraint.members if isinstance(constraint, Intersection) else [constraint]
    for m in members:
        if isinstance(m, (LinfBall, L2Ball)):
            return m.center
        if isinstance(m, Mask):
            return m.values
    raise ConfigError("x0 is required when the constraint has no center (LinfBall/L2Ball/Mask)")


def _solve(model, objective, constraint, x0, cfg: JIIOConfig, z0=None, progress=False) -> InputOptResult:
    if hasattr(model, "prepare"):
        model.prepare()
    with torch.no_grad():
        u0 = model.inject(x0)
        zinit = model.init_state(u0) if z0 is None else z0.detach()
    aug = _Augmented(model, objective, constraint, x0.shape, zinit.shape, cfg, like=x0)
    with _frozen_params(model), torch.no_grad():
        if cfg.solver == "fixed_point":
            (z_j, mu, x), residual, res_hist, nfe = _plain_iteration(
                aug, zinit, torch.zeros_like(zinit), x0, cfg, progress)
        else:
            slv = get_solver(cfg.solver_config())
            it = range(cfg.iters)
            if progress:
                from tqdm.auto import tqdm
                it = tqdm(it, desc="JIIO")
            state = slv.init(aug, aug.pack(zinit, torch.zeros_like(zinit), x0))
            for k in it:
                if k == cfg.switch and cfg.alpha_final is not None and cfg.alpha_final != aug.alpha:
                    aug.alpha = cfg.alpha_final
                    state = slv.reset(state)
                state = slv.step(aug, state)
            res = slv.finalize(state)
            z_j, mu, x = aug.unpack(state.z.view(res.z.shape) if cfg.select == "next" else res.z)
            residual, res_hist, nfe = res.residual, state.residual_history, res.nfe
        x = aug.project(x)
        hist = {"residual": torch.stack([r.mean() for r in res_hist]).tolist() if res_hist else [],
                "objective": aug.history_obj}
        resolve_nfe = 0
        if cfg.resolve:
            u = model.inject(x)
            r2 = model.solve(u, z0=z_j)
            z = r2.z
            resolve_nfe = r2.nfe
        else:
            z = z_j
        out = model.readout(z)
        final_obj = objective(out if cfg.readout else z, x)
        logits = out if cfg.readout else None
    return InputOptResult(x=x.detach(), z=z.detach(), mu=mu.detach(), z_joint=z_j.detach(),
                          objective=final_obj.detach(), residual=residual, history=hist,
                          nfe=nfe, resolve_nfe=resolve_nfe,
                          logits=None if logits is None else logits.detach())


def jiio_attack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: Union[str, Norm] = "Linf",
                iters: int = 80, alpha: Optional[float] = None, alpha_final: Optional[float] = None,
                direction: Optional[str] = None, solver: str = "fixed_point", m: int = 20,
                select: str = "best", resolve: bool = True, **options) -> InputOptResult:
    """The JIIO attack: ``max_{x' in B_eps(x) & [0,1]} CE(h(z*(x')), y)`` as one augmented solve.

    ``alpha`` (the step size) defaults to ``eps / 4``; ``direction`` to "sign" for Linf and
    "normalized" for L2.
    ``solver`` defaults to "fixed_point" (plain iteration of the damped augmented map): Anderson
    on the stacked vector can make the attack weaker with sign or normalised steps (its affine
    extrapolation fights the projected, discontinuous input step; benchmarks/bench_jiio.py
    compares them), while it does accelerate smooth problems (``direction="gradient"``).
    Returns the :class:`InputOptResult` (``x`` is the adversarial input, ``mu`` the adjoint of
    ``-CE``).
    """
    norm = coerce_enum(Norm, norm, "norm")
    eps = check_radius(eps, "eps")
    direction = default_direction(norm, direction)
    alpha = eps / 4 if alpha is None else alpha
    cfg = JIIOConfig(iters=iters, alpha=alpha, alpha_final=alpha_final, direction=direction, solver=solver, m=m,
                     select=select, resolve=resolve, **options)
    return optimize_inputs(model, cross_entropy_objective(y), threat_constraint(x, eps, norm),
                           x0=x.detach(), config=cfg)


# ============================================================================== diagnostics
def kkt_residuals(model: nn.Module, objective: InputObjective, constraint: Optional[Constraint],
                  x: Tensor, z: Tensor, mu: Tensor, *, alpha: float = 1.0, readout: bool = True) -> dict:
    """Per-sample residuals (B,) of the three KKT conditions at ``(z, mu, x)``.

    ``primal`` = ||f(z, x) - z|| / ||f(z, x)||, ``adjoint`` = ||grad_z l + J_z^T mu - mu|| / ||mu||,
    ``input`` = ||x - Proj_C(x - alpha g_x)|| / alpha (projected-gradient norm).
    """
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    constraint = constraint if constraint is not None else Unconstrained()
    cfg = JIIOConfig(iters=1, readout=readout, direction="gradient")
    aug = _Augmented(model, objective, constraint, x.shape, z.shape, cfg)
    with _frozen_params(model):
        fz, _, gz, gx = aug.grads(z, mu, x)
    pn = lambda t: t.flatten(1).norm(dim=1)  # noqa: E731
    return {
        "primal": pn(fz - z) / (pn(fz) + 1e-12),
        "adjoint": pn(gz - mu) / (pn(mu) + 1e-12),
        "input": pn(x - constraint.project(x - alpha * gx)) / alpha,
        "grad_x": gx.detach(),
    }


class CostCounter:
    """Counts evaluations of a DEQ's cell: forward calls and backward passes (VJPs) through them.

    ``with CostCounter(model) as c: ...`` then ``c.forward``, ``c.backward``, ``c.total``. A VJP is
    counted each time a gradient flows into a cell output (repeated ``autograd.grad`` calls on a
    retained graph count each time) and each time a closed-form VJP of the cell (``vjp_at``) is
    applied (the cell's explicit counting hook ``register_vjp_hook``), so the implicit
    backward's adjoint iterations are included.
    """

    def __init__(self, model: nn.Module):
        cell = getattr(model, "cell", None)
        if cell is None:
            raise ConfigError(f"{type(model).__name__} has no .cell to count")
        self.cell = cell
        self.forward = 0
        self.backward = 0
        self._handle = None
        self._vjp_handle = None

    @property
    def total(self) -> int:
        """``forward + backward``: cell evaluations and VJPs counted so far."""
        return self.forward + self.backward

    def _hook(self, module, inputs, output):
        self.forward += 1
        if isinstance(output, Tensor) and output.requires_grad:
            def count(grad):
                self.backward += 1
                return grad
            output.register_hook(count)

    def _vjp_hook(self, kind: str) -> None:
        if kind == "vjp_at":
            self.forward += 1  # building a closed-form VJP evaluates the cell's pre-activation once
        else:
            self.backward += 1

    def __enter__(self):
        self._handle = self.cell.register_forward_hook(self._hook)
        register = getattr(self.cell, "register_vjp_hook", None)  # cells with a closed-form VJP
        self._vjp_handle = register(self._vjp_hook) if callable(register) else None
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        if self._vjp_handle is not None:
            self._vjp_handle.remove()
        return False
