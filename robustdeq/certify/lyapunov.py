"""Lyapunov decrease along recorded trajectories.

For a candidate ``V(z, z_ref) -> (B,)`` (``V(z*, z*) = 0``, ``V > 0`` elsewhere), the discrete
decrease condition ``V(z_{k+1}, z*) < V(z_k, z*)`` is checked along trajectories of the model's
dynamics, starting from the model's initial state or from a perturbation of ``z*``:

- ``dynamics="iteration"``: ``z_{k+1} = f(z_k, u)`` (the map whose stability is in question);
- ``dynamics="solver"``: the raw iterates the model's solver records (``record="all"``);
- ``dynamics="stable_map"``: the model's own stabilised map ``z <- stable_map(z, u, z*)`` (LyaDEQ's
  projected Euler step; needs a ``stable_map`` method).

Per sample we report the minimum decrease ``min_k V_k - V_{k+1}`` (the **margin**) and the largest
ratio ``V_{k+1} / V_k`` (empirical decay factor) over the steps where ``V_k`` is above the
numerical floor ``max(v_tol, v_rel * V_0)`` (below it the state sits at ``z*`` within rounding).
A sample is ``stable`` when the margin is > 0 at every such step. This is an empirical check on
the recorded steps, not a proof over the whole state space.

Candidates: the model's own ``lyapunov`` method when it has one (LyaDEQ), else
:func:`quadratic_candidate` (``||z - z_ref||^2``, or ``(z - z_ref)^T P (z - z_ref)``).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..errors import ConfigError
from ._util import require_deq

Candidate = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LyapunovResult:
    """Per-sample results (B,); ``values`` is (K + 1, B): V along the trajectory."""

    margin: Tensor      # min over counted steps of V_k - V_{k+1} (inf if no step counted)
    ratio: Tensor       # max over counted steps of V_{k+1} / V_k
    stable: Tensor      # margin > 0
    values: Tensor
    steps: int
    candidate: str
    dynamics: str
    start: str


def quadratic_candidate(P: Optional[Tensor] = None) -> Candidate:
    """``V(z, z_ref) = ||z - z_ref||^2`` or ``(z - z_ref)^T P (z - z_ref)`` (P (D, D) positive definite)."""
    if P is not None:
        if P.dim() != 2 or P.shape[0] != P.shape[1]:
            raise ConfigError(f"P must be a square matrix, got {tuple(P.shape)}")
        if not float(torch.linalg.eigvalsh(0.5 * (P + P.t()).double())[0]) > 0:
            raise ConfigError("P must be positive definite")

    def V(z: Tensor, z_ref: Tensor) -> Tensor:
        e = (z - z_ref).flatten(1)
        if P is None:
            return (e * e).sum(dim=1)
        return ((e @ P.to(e.dtype)) * e).sum(dim=1)

    V.__name__ = "quadratic" if P is None else "quadratic_P"
    return V


def model_candidate(model) -> Optional[Candidate]:
    """The model's own Lyapunov function as ``V(z, z_ref)``, or None when it has none."""
    fn = getattr(model, "lyapunov", None)
    if not callable(fn):
        return None
    try:
        nparams = len([p for p in inspect.signature(fn).parameters.values()
                       if p.default is inspect._empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        nparams = 2
    if nparams == 1:  # V(e) of the deviation e = z - z_ref
        def V(z: Tensor, z_ref: Tensor) -> Tensor:
            return fn(z - z_ref)
    else:
        def V(z: Tensor, z_ref: Tensor) -> Tensor:
            return fn(z, z_ref)
    V.__name__ = f"{type(model).__name__}.lyapunov"
    return V


def _start_state(model, u: Tensor, z_star: Tensor, perturb, generator) -> "tuple[Tensor, str]":
    if perturb is None:
        return model.init_state(u), "initial state"
    if callable(perturb):
        z0 = perturb(z_star)
        if not isinstance(z0, Tensor) or z0.shape != z_star.shape:
            raise ConfigError("perturb(z_star) must return a tensor of the shape of z_star")
        return z0, "perturb(z*)"
    if isinstance(perturb, Tensor):
        if perturb.shape != z_star.shape:
            raise ConfigError(f"perturb tensor has shape {tuple(perturb.shape)}, z* has {tuple(z_star.shape)}")
        return z_star + perturb.to(z_star), "z* + given perturbation"
    if isinstance(perturb, (int, float)) and not isinstance(perturb, bool) and perturb > 0:
        noise = torch.randn(z_star.shape, generator=generator, dtype=z_star.dtype).to(z_star.device)
        return z_star + float(perturb) * noise, f"z* + {float(perturb):g} N(0, I)"
    raise ConfigError(f"perturb must be None, a positive std, a tensor or a callable, got {perturb!r}")


def lyapunov_decrease(model, x: Tensor, V: Optional[Union[Candidate, str]] = None, *, steps: int = 30,
                      perturb=None, z_ref: Optional[Tensor] = None, dynamics: str = "iteration",
                      solver=None, v_tol: float = 1e-14, v_rel: float = 1e-10, seed: int = 0) -> LyapunovResult:
    """Check ``V(z_{k+1}) < V(z_k)`` along trajectories (see module).

    Args:
        model: a DEQ (``inject``, ``f``, ``solve``, ``init_state``).
        x: (B, ...) inputs in [0, 1].
        V: candidate ``(z, z_ref) -> (B,)``; None: the model's ``lyapunov`` if any, else quadratic;
            ``"quadratic"`` forces the quadratic candidate.
        steps: trajectory length K (iteration dynamics) or the solver's ``max_iter`` cap.
        perturb: None (start at the model's initial state), a std (start at ``z* + std N(0, I)``),
            a tensor added to ``z*``, or a callable ``z* -> z0``.
        z_ref: the equilibrium (default: solved with ``solver``, else the model's solver made
            strict by :func:`tight_solver`).
        dynamics: ``"iteration"``, ``"solver"`` or ``"stable_map"`` (see module).
        solver: solver config of the ``z_ref`` solve (and of ``dynamics="solver"``).
        v_tol, v_rel: the numerical floor ``max(v_tol, v_rel * V_0)`` below which a step is not
            checked (see module).
        seed: seed of the random perturbation (``perturb`` a std).
    """
    require_deq(model, "lyapunov_decrease")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if dynamics not in ("iteration", "solver", "stable_map"):
        raise ConfigError(f"unknown dynamics {dynamics!r}; expected 'iteration', 'solver' or 'stable_map'")
    if dynamics == "stable_map" and not callable(getattr(model, "stable_map", None)):
        raise ConfigError(f"dynamics='stable_map' needs a model with stable_map(z, u, z_ref) "
                          f"(a LyaDEQ); {type(model).__name__} has none")
    if V is None:
        V = model_candidate(model) or quadratic_candidate()
    elif isinstance(V, str):
        if V != "quadratic":
            raise ConfigError(f"unknown Lyapunov candidate {V!r}; pass a callable or 'quadratic'")
        V = quadratic_candidate()
    elif not callable(V):
        raise ConfigError("V must be a callable (z, z_ref) -> (B,)")
    name = getattr(V, "__name__", type(V).__name__)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        u = model.inject(model.check_input(x)).detach()
        if z_ref is None:
            from ._util import tight_solver
            z_ref = model.solve(u, solver=solver if solver is not None else tight_solver(model)).z
        z_ref = z_ref.detach()
        z0, start = _start_state(model, u, z_ref, perturb, gen)
        if dynamics in ("iteration", "stable_map"):
            step = (lambda zz: model.f(zz, u)) if dynamics == "iteration" else \
                (lambda zz: model.stable_map(zz, u, z_ref))
            traj = [z0]
            z = z0
            for _ in range(steps):
                z = step(z).detach()
                traj.append(z)
        else:
            from ..config import SolverConfig, from_dict
            cfg = model.solver_config if solver is None else from_dict(SolverConfig, solver)
            cfg = cfg.replace(max_iter=steps + 1, tol=0.0)
            res = model.solve(u, z0=z0, record="all", solver=cfg)
            traj = [t.z for t in sorted(res.trajectory, key=lambda t: t.step)]
        vals = torch.stack([V(zk, z_ref).reshape(-1).to(torch.float64) for zk in traj])  # (K+1, B)
    if vals.shape[1] != u.shape[0]:
        raise ConfigError(f"V returned {vals.shape[1]} values for a batch of {u.shape[0]}")
    if not bool(torch.isfinite(vals).all()):
        bad = ~torch.isfinite(vals).all(dim=0)
    else:
        bad = torch.zeros(vals.shape[1], dtype=torch.bool, device=vals.device)
    floor = torch.maximum(torch.full_like(vals[0], v_tol), v_rel * vals[0].abs())
    counted = vals[:-1] > floor[None, :]                      # (K, B)
    dec = vals[:-1] - vals[1:]
    inf = torch.full_like(dec, math.inf)
    margin = torch.where(counted, dec, inf).min(dim=0).values
    ratio = torch.where(counted, vals[1:] / vals[:-1].clamp_min(1e-300), torch.full_like(dec, -math.inf)).max(dim=0).values
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))
    margin = torch.where(bad, torch.full_like(margin, -math.inf), margin)
    return LyapunovResult(margin=margin, ratio=ratio, stable=margin > 0, values=vals,
                          steps=len(traj) - 1, candidate=name, dynamics=dynamics, start=start)


__all__ = ["LyapunovResult", "lyapunov_decrease", "quadratic_candidate", "model_candidate"]
