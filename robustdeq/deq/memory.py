"""A per-sample warm-start memory across an external attack's calls to a DEQ (issue 13).

An attack library such as pyautoattack calls the model many times on the same clean batch: on
subsets of it and at perturbed points of the same samples (APGD's iterates, Square's queries).
:class:`WarmMemory` wraps a DEQ so that each of those calls starts a sample's forward solve from
the latest *converged* fixed point of the same clean sample, instead of the model's initial state.

Keys. :meth:`WarmMemory.begin` is given the clean batch and the threat radius; a query row is the
clean sample ``i`` whose input is nearest to it (Linf), provided it lies within the radius of it
(a perturbed point of that sample); rows that match no clean sample start cold. :meth:`end` (and
every new :meth:`begin`) forgets everything: the memory never outlives the batch it was built for.

The rule of :mod:`robustdeq.deq.warm` holds: only converged solves are recorded, and a
warm-started solve that does not converge is redone from the model's initial state, so every
returned prediction is the model's inference (to the solver's tolerance where the warm-started
solve converged, bit for bit where it did not). Rows whose warm-started logits have a top-2 gap
below ``confirm_margin`` are redone cold as well: a warm and a cold solve differ within the
solver's tolerance, and near a tie that flips predictions (without this, AutoAttack counted
borderline points as broken that the model's cold inference classifies correctly: 4-6 of 128
samples on a small mlp_deq). A row whose input equals the recorded point
exactly also starts cold, so that repeated calls at the same point give identical outputs (as the
model does; pyautoattack's randomised-defense check compares them).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .views import ModelView


class WarmMemory(ModelView):
    """``x -> logits`` of ``model`` (a DEQ with ``run(x, z0=...)`` and ``init_state``), with the
    per-sample warm-start memory described in the module docstring; outside a
    :meth:`begin` / :meth:`end` bracket it is the model itself."""

    def __init__(self, model: nn.Module, confirm_margin: float = 0.1):
        super().__init__()
        self.confirm_margin = float(confirm_margin)
        if not (hasattr(model, "run") and hasattr(model, "init_state") and hasattr(model, "inject")):
            raise ConfigError(f"WarmMemory needs a DEQ (run, inject, init_state); got {type(model).__name__}")
        self.model = model
        self.end()

    # -- the bracket ------------------------------------------------------------------------------
    def begin(self, x_clean: Tensor, radius: float) -> None:
        """Start a memory for the clean batch ``x_clean``: queries within Linf ``radius`` of a
        clean sample are that sample."""
        self.clean = x_clean.detach().reshape(x_clean.shape[0], -1).float()
        self.radius = float(radius) * (1 + 1e-4) + 1e-6
        n = self.clean.shape[0]
        self.z: Optional[Tensor] = None           # (N, ...) latest converged fixed points
        self.ok = torch.zeros(n, dtype=torch.bool, device=x_clean.device)
        self.at: Optional[Tensor] = None          # (N, d) the inputs they were solved at
        self._last_keys: Optional[Tensor] = None
        self.stats: Dict[str, int] = {"calls": 0, "rows": 0, "warm": 0, "redone": 0, "recorded": 0,
                                      "unmatched": 0, "confirmed": 0}

    def end(self) -> None:
        """Forget the memory (the next calls are the model's own, cold)."""
        self.clean = None
        self.z = self.at = self.ok = self._last_keys = None
        self.radius = 0.0
        if not hasattr(self, "stats"):
            self.stats = {}

    @property
    def active(self) -> bool:
        return self.clean is not None

    # -- keys -------------------------------------------------------------------------------------
    def keys(self, x: Tensor) -> Tensor:
        """(B,) long: the clean sample of each row of ``x`` (-1: none within the radius)."""
        q = x.detach().reshape(x.shape[0], -1).float()
        last = self._last_keys
        if last is not None and last.shape[0] == q.shape[0] and bool((last >= 0).all()):
            # the usual case: the same samples as the previous call
            if bool(((q - self.clean[last]).abs().amax(dim=1) <= self.radius).all()):
                return last
        keys = torch.full((q.shape[0],), -1, dtype=torch.long, device=x.device)
        for i in range(0, q.shape[0], 256):
            d = torch.cdist(q[i:i + 256], self.clean, p=float("inf"))
            dmin, arg = d.min(dim=1)
            keys[i:i + 256] = torch.where(dmin <= self.radius, arg, torch.full_like(arg, -1))
        self._last_keys = keys
        return keys

    # -- the model --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.model(x)
        model = self.model
        self.stats["calls"] += 1
        self.stats["rows"] += int(x.shape[0])
        keys = self.keys(x)
        self.stats["unmatched"] += int((keys < 0).sum())
        has = keys >= 0
        kk = keys.clamp(min=0)
        warm = has & self.ok[kk] if self.z is not None else torch.zeros_like(has)
        if bool(warm.any()):
            same = (x.detach().reshape(x.shape[0], -1).float() == self.at[kk]).all(dim=1)
            warm &= ~same
        if not bool(warm.any()):
            eq = model.run(x)
            logits, z_star, conv = eq.logits, eq.z_star, eq.stats.converged
        else:
            self.stats["warm"] += int(warm.sum())
            with torch.no_grad():
                cold = model.init_state(model.inject(model.check_input(x.detach())))
            view = (-1,) + (1,) * (cold.dim() - 1)
            z0 = torch.where(warm.view(view), self.z[kk].to(cold), cold)
            eq = model.run(x, z0=z0)
            logits, z_star, conv = eq.logits, eq.z_star, eq.stats.converged.clone()
            top2 = logits.detach().float().topk(2, dim=1).values if logits.shape[1] > 1 else None
            close = (top2[:, 0] - top2[:, 1] < self.confirm_margin) if top2 is not None else warm
            self.stats["confirmed"] += int((warm & conv & close).sum())
            redo = (warm & (~conv | close)).nonzero()[:, 0]
            if redo.numel():
                # a warm-started solve that did not converge, or whose prediction is within
                # confirm_margin of a tie (a warm and a cold solve differ within the solver's
                # tolerance, which may flip it): the model's own (cold) solve
                self.stats["redone"] += int(redo.numel())
                eq2 = model.run(x[redo])
                logits = logits.clone()
                logits[redo] = eq2.logits
                z_star = z_star.clone()
                z_star[redo] = eq2.z_star
                conv[redo] = eq2.stats.converged
        rec = (has & conv).nonzero()[:, 0]
        if rec.numel():
            if self.z is None:
                self.z = torch.zeros((self.clean.shape[0],) + tuple(z_star.shape[1:]),
                                     dtype=z_star.dtype, device=z_star.device)
                self.at = torch.full_like(self.clean, float("nan"))
            k = keys[rec]
            self.z[k] = z_star[rec].detach()
            self.at[k] = x.detach().reshape(x.shape[0], -1).float()[rec]
            self.ok[k] = True
            self.stats["recorded"] += int(rec.numel())
        return logits


__all__ = ["WarmMemory"]
