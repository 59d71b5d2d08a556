"""The JIIO attack (joint-DEQ PGD): the attack's forward fixed point, adjoint and perturbation
solved as ONE augmented fixed point (Gurumurthy et al., NeurIPS 2021; the engine: robustdeq.deq.jiio).

Each iteration costs one evaluation of the cell and one vector-Jacobian product, instead of a
forward solve plus an adjoint solve per PGD step. ``iters`` iterations therefore cost about
``2 * iters`` cell evaluations (plus the final re-solve); compare with PGD-k's
``k * (forward iterations + adjoint iterations)``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .._tensor import random_in_ball
from .base import Attack, check_int, check_number

__all__ = ["JIIO"]


class JIIO(Attack):
    """``JIIO(model, eps=..., norm="Linf"|"L2", iters=80)``: ``attack(x, y) -> x_adv``.

    Args:
        model: a DEQ with ``inject``, ``f``, ``readout``, ``init_state`` and ``solve``
            (``DEQClassifier``); other models are a ``ConfigError``.
        eps, norm: the threat model (``B_eps(x) & [0, 1]``).
        iters: augmented iterations (one f + one VJP each), no early stop.
        alpha: step on the input (default ``eps / 4``).
        alpha_final, switch_at: the step after iteration ``switch_at`` (default
            ``round(5 iters / 8)``); ``alpha_final=None`` (the default): no change of step.
        direction: the input step's direction, "sign" (default for Linf), "normalized" (default
            for L2) or "gradient".
        solver: "fixed_point" (default: plain iteration of the damped augmented map; see
            :mod:`robustdeq.deq.jiio` for the choice) or "anderson" (memory ``m``, the paper's
            choice).
        m: Anderson's memory (``solver="anderson"`` only).
        beta_z, beta_mu: damping of the state and adjoint blocks of the augmented map (defaults
            0.8 and 0.6, JIIO's; :mod:`robustdeq.deq.jiio`).
        select: "best" (lowest augmented residual), "last" iterate, or "next" (the map's output
            at the last iterate: one more input step for free).
        random_start: start from a random point of the ball (seeded) instead of ``x``.
        targeted: ``y`` are target classes (the attack descends their cross-entropy).
        seed: seed of the random start.
    """

    name = "JIIO"

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", iters: int = 80,
                 alpha: Optional[float] = None, alpha_final: Optional[float] = None,
                 switch_at: Optional[int] = None, direction: Optional[str] = None,
                 solver: str = "fixed_point", m: int = 20, select: str = "best",
                 beta_z: float = 0.8, beta_mu: float = 0.6, random_start: bool = False,
                 targeted: bool = False, seed: Optional[int] = None):
        super().__init__(model, eps=eps, norm=norm, targeted=targeted, seed=seed)
        from ..deq.jiio import JIIOConfig, check_jiio_model, default_direction
        check_jiio_model(model)
        self.iters = check_int(iters, "iters", low=1)
        self.alpha = self.eps / 4 if alpha is None else check_number(alpha, "alpha")
        self.alpha_final = check_number(alpha_final, "alpha_final", allow_none=True)
        self.direction = default_direction(self.norm, direction)
        if not isinstance(random_start, bool):
            raise ConfigError(f"random_start must be a bool, got {random_start!r}")
        self.random_start = random_start
        self.config = JIIOConfig(iters=self.iters, alpha=self.alpha, alpha_final=self.alpha_final,
                                 switch_at=switch_at, direction=self.direction, solver=solver, m=m, select=select,
                                 beta_z=beta_z, beta_mu=beta_mu, resolve=True)
        self.name = f"JIIO-{self.iters}" + ("-L2" if self.norm == "L2" else "")
        self.last_result = None

    def params(self) -> Dict[str, Any]:
        """The settings reported by :meth:`describe`: iterations, step sizes (and the switch
        iteration when ``alpha_final`` is set), direction, solver, memory, selection, the
        dampings and the random start."""
        c = self.config
        return {"iters": c.iters, "alpha": c.alpha, "alpha_final": c.alpha_final,
                "switch_at": c.switch if c.alpha_final is not None else None,
                "direction": c.direction, "solver": c.solver, "m": c.m, "select": c.select, "beta_z": c.beta_z,
                "beta_mu": c.beta_mu, "random_start": self.random_start}

    def _perturb(self, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        from ..deq.jiio import optimize_inputs, threat_constraint
        if self.targeted:
            objective = lambda logits, xx: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
        else:
            objective = lambda logits, xx: -F.cross_entropy(logits, y, reduction="none")  # noqa: E731
        constraint = threat_constraint(x, self.eps, self.norm)
        x0 = x
        if self.random_start:
            x0 = constraint.project(x + random_in_ball(x, self.eps, self.norm, gen))
        r = optimize_inputs(self.model, objective, constraint, x0=x0, config=self.config)
        self.last_result = r
        self.last_stats = {"nfe": r.nfe, "vjp": r.nfe, "resolve_nfe": r.resolve_nfe,
                           "augmented_residual_mean": float(r.residual.mean())}
        return r.x
