"""Certified training: objectives whose loss is a certificate's bound, so that the deterministic
certificates of :mod:`robustdeq.certify` hold on many samples of the trained model.

=====================  ==============================================================================
``IBPTraining``        interval bound propagation (Gowal et al. 2018): ``kappa CE(model(x), y) +
(``"ibp"``, Linf)      (1 - kappa) CE(z_hat, y)``, ``z_hat_j = -`` the lower bound of ``logit_y -
                       logit_j`` over ``[x - eps, x + eps] & [0, 1]`` (last layer folded in),
                       through the DEQ's interval fixed point (Wei & Kolter, ICLR 2022) or a
                       feed-forward network's layers
``LipschitzMargin``    Lipschitz-margin training (Tsuzuku, Sato, Sugiyama, NeurIPS 2018): CE on the logits
(``"lipschitz_margin"``, with ``sqrt(2) eps L`` added to every logit but the label's, ``L`` the
L2)                    certified Lipschitz bound of ``x -> logits`` (``pairwise``: ``eps P_yj`` with
                       the per-pair bounds ``certify`` uses)
=====================  ==============================================================================

Schedules (both, as in Gowal et al. 2018): the radius is 0 for the first ``warmup`` training
steps, then grows linearly to ``eps`` over ``ramp`` steps; IBP's ``kappa`` goes from
``kappa_start`` (1) to ``kappa`` (0.5) over the same ramp. The step index is the Trainer's global
step (:meth:`~robustdeq.defenses.objectives.Objective.set_train_step`), so a resumed run
continues the schedule.

**The interval fixed point.** For a DEQ ``z = act(M z + a u)`` the training bound is the fixed
point ``B*`` of the interval map of :mod:`robustdeq.certify.interval` (the same map certification
iterates, there in float64 with outward rounding), computed in the model's dtype and
differentiated implicitly (IFT on the interval map; :func:`~robustdeq.certify.interval.
interval_fixed_point`). It exists and is unique when ``rho(|M|) < 1``; the objective checks this at
every step with a rigorous bound and refuses a model that violates it
(:class:`~robustdeq.errors.ConfigError`). ``mlp_deq`` with ``norm="interval"`` and ``scale < 1``
satisfies it by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..certify._util import has_deq_interface
from ..config import check_radius
from ..errors import ConfigError
from .objectives import Objective, _acc

__all__ = ["IBPTraining", "LipschitzMargin", "worst_case_logits"]


def worst_case_logits(margins: Tensor) -> Tensor:
    """``z_hat`` of Gowal et al. from (B, C) lower bounds of ``logit_y - logit_j`` (``+inf`` at
    the label): ``z_hat_j = -margin_j``, ``z_hat_y = 0``; ``CE(z_hat, y)`` bounds the CE of every
    input in the box from above."""
    return torch.where(torch.isinf(margins), torch.zeros_like(margins), -margins)


def _check_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{name} must be an int >= 0 (training steps), got {v!r}")


def _check_number(name: str, v, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) \
        and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        raise ConfigError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")


@dataclass
class _Scheduled(Objective):
    """Radius schedule shared by the certified objectives (warm-up at 0, then a linear ramp)."""

    eps: float = 0.1
    warmup: int = 0
    ramp: int = 0

    def _check_schedule(self) -> None:
        if self.state is not None:
            raise ConfigError(f"{type(self).__name__} does not support state='random' (the bound is of the fixed point)")
        if self.jac_reg > 0:
            raise ConfigError(f"{type(self).__name__} does not support jac_reg")
        check_radius(self.eps, "eps")
        _check_int("warmup", self.warmup)
        _check_int("ramp", self.ramp)

    @property
    def progress(self) -> float:
        """Fraction of the ramp done at this step (0 during the warm-up, 1 after the ramp)."""
        t = self.train_step
        if t < self.warmup:
            return 0.0
        if self.ramp == 0:
            return 1.0
        return min(1.0, (t - self.warmup + 1) / self.ramp)

    @property
    def current_eps(self) -> float:
        """The radius of this training step: ``eps`` times :attr:`progress`."""
        return float(self.eps) * self.progress

    def _finish(self, scalars: dict) -> dict:
        scalars["eps"] = self.current_eps
        self.train_step += 1
        return scalars


@dataclass
class IBPTraining(_Scheduled):
    """IBP training (Gowal et al. 2018) of a DEQ through its interval fixed point, or of a
    feed-forward network (a plain ``nn.Sequential`` of Linear, Conv2d, ReLU, Tanh, Flatten,
    average pooling, or the zoo's ``FeedForward`` around one, as
    :func:`robustdeq.certify.feedforward.is_feedforward` accepts) layer by layer. Linf radius ``eps`` (inputs in [0, 1]).

    Options: ``eps``; ``warmup``/``ramp`` (training steps; see the module); ``kappa`` (final
    weight of the clean CE, default 0.5) and ``kappa_start`` (1.0); ``iters``/``tol``: the interval
    iteration's budget and stopping change; ``adjoint_iters``/``adjoint_tol``: the implicit
    backward's. The clean term uses the model's own forward and gradient estimator."""

    kappa: float = 0.5
    kappa_start: float = 1.0
    iters: int = 200
    tol: float = 1e-5
    adjoint_iters: int = 200
    adjoint_tol: float = 1e-6

    name = "ibp"

    def __post_init__(self):
        super().__post_init__()
        self._check_schedule()
        _check_number("kappa", self.kappa, 0.0, 1.0)
        _check_number("kappa_start", self.kappa_start, 0.0, 1.0)
        for k in ("iters", "adjoint_iters"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k} must be an int >= 1, got {v!r}")
        _check_number("tol", self.tol, lo_open=True)
        _check_number("adjoint_tol", self.adjoint_tol, lo_open=True)

    @property
    def current_kappa(self) -> float:
        """The weight of the clean cross-entropy at this step: ``kappa_start`` moved linearly to
        ``kappa`` along the radius ramp (:attr:`progress`)."""
        return self.kappa_start + (self.kappa - self.kappa_start) * self.progress

    def margins(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, z0=None) -> Tuple[Tensor, dict]:
        """(B, C) differentiable lower bounds of ``logit_y - logit_j`` over the Linf box."""
        from ..certify.interval import check_interval_condition, interval_fixed_point, interval_map, \
            sequential_margins
        if has_deq_interface(model):
            imap = interval_map(model, differentiable=True)
            ac = check_interval_condition(imap, "IBP training")
            lo, hi, info = interval_fixed_point(imap, x, eps, z0=z0, iters=self.iters, tol=self.tol,
                                                adjoint_iters=self.adjoint_iters,
                                                adjoint_tol=self.adjoint_tol, contraction=ac)
            return imap.margins(lo, hi, y, rounding=False), info
        from ..certify.feedforward import require_feedforward
        net = require_feedforward(model, "IBP training")  # the same networks certify() takes
        return sequential_margins(net, x, y, eps, rounding=False), {}

    def __call__(self, model, x, y):
        self._begin()
        eps, kappa = self.current_eps, self.current_kappa
        if has_deq_interface(model):
            eq = model.run(x)
            logits, z0 = eq.logits, eq.z_star.detach()
        else:
            logits, z0 = model(x), None
        ce = F.cross_entropy(logits, y)
        scalars = {"ce": float(ce.detach()), "acc": _acc(logits, y), "kappa": kappa}
        loss = kappa * ce
        if kappa < 1.0 or eps > 0:
            low, info = self.margins(model, x, y, eps, z0)
            ce_rob = F.cross_entropy(worst_case_logits(low), y)
            loss = loss + (1.0 - kappa) * ce_rob
            scalars.update({"ce_ibp": float(ce_rob.detach()),
                            "ibp_certified": float((low.min(dim=1).values > 0).float().mean())})
            if info:
                scalars.update({"interval_iters": float(info["iters"]), "interval_rate": info["rate"]})
        scalars["loss"] = float(loss.detach())
        return loss, self._finish(scalars)


@dataclass
class LipschitzMargin(_Scheduled):
    """Lipschitz-margin training (Tsuzuku, Sato, Sugiyama 2018) at L2 radius ``eps``:
    ``CE(logits + sqrt(2) eps L (1 - onehot(y)), y)`` with ``L`` the certified Lipschitz bound of
    ``x -> logits`` (:func:`robustdeq.certify.lipschitz.logit_lipschitz`, differentiable in the
    weights). ``pairwise=True`` adds ``eps P_yj`` instead (the per-pair bounds of ``certify``'s
    radius, at most ``sqrt(2) L``). A sample whose shifted logits are still classified correctly
    is certified at ``eps`` (up to the solver-error term ``certify`` subtracts). Options: ``eps``,
    ``warmup``/``ramp`` (see the module), ``pairwise``."""

    eps: float = 1.0
    pairwise: bool = False

    name = "lipschitz_margin"

    def __post_init__(self):
        super().__post_init__()
        self._check_schedule()
        if not isinstance(self.pairwise, bool):
            raise ConfigError(f"pairwise must be a bool, got {self.pairwise!r}")

    def shifted_logits(self, model: nn.Module, logits: Tensor, y: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
        """``(logits + shift, L)``: the margin-shifted logits and the Lipschitz bound."""
        from ..certify.lipschitz import logit_lipschitz
        lip, pair = logit_lipschitz(model)
        if self.pairwise:
            shift = eps * pair.to(logits.dtype)[y]
        else:
            other = 1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
            shift = math.sqrt(2.0) * eps * lip.to(logits.dtype) * other
        return logits + shift, lip

    def __call__(self, model, x, y):
        self._begin()
        eps = self.current_eps
        if not has_deq_interface(model):
            raise ConfigError("Lipschitz-margin training needs a DEQ (its certified Lipschitz bound); "
                              f"{type(model).__name__} is not one")
        logits = model(x)
        shifted, lip = self.shifted_logits(model, logits, y, eps)
        loss = F.cross_entropy(shifted, y)
        scalars = {"loss": float(loss.detach()), "acc": _acc(logits, y), "lipschitz": float(lip.detach()),
                   "margin_certified": _acc(shifted, y)}
        return loss, self._finish(scalars)
