"""Per-sample proofs that a (warm-started, possibly short) solve has the exact equilibrium's class.

If the cell is a contraction in z with rate ``L < 1`` in the L2 norm
(:func:`robustdeq.certify.contraction_certificate`), the fixed point ``z*(x)`` of every input is
unique and any state ``z`` satisfies the a-posteriori bound (Banach)

    ||z - z*|| <= ||f(z, u) - z|| / (1 - L) =: rho,

whatever start and solver produced ``z``; the image ``z' = f(z, u)`` (computed for the residual
anyway) is closer still, ``||z' - z*|| <= L ||z - z*|| <= L ||f(z, u) - z|| / (1 - L) =: rho``.
With an affine read-out ``logits = W z + b`` (flattened state), the logit difference of classes
``c`` and ``j`` moves by at most ``||w_c - w_j|| rho`` between ``z'`` and ``z*``; so if
``c = argmax logits(z')`` and

    logit_c(z') - logit_j(z') > ||w_c - w_j|| rho   for every j != c,

then ``argmax logits(z*) = c``: the class of the exact equilibrium DEQ ``x -> argmax W z*(x) + b``
is proven from ``z`` alone. The residual and the margins are evaluated in float64 on a float64
copy of the model, with a relative slack for rounding; the pair norms carry the slack of
:mod:`robustdeq.certify.lipschitz`, and ``L`` is the certificate's upper bound.

A proven sample therefore *is* a draw of the exact-equilibrium base classifier on that noise, so
counts of proven classes are binomial and Clopper-Pearson or a confidence sequence applies to them
without any correction.

Warm starts (:meth:`EquilibriumClassProof.iterate`) run the fixed-point iteration
``z_{k+1} = f(z_k)`` from the warm start and check the proof after every step: the evaluation that
makes the step gives the residual ``||f(z_k) - z_k||`` and the read-out point ``f(z_k)``, so the
check costs no extra evaluation of the cell, and a row leaves at its first proof (``k``
evaluations). By the contraction ``||z_k - z*|| <= L^k ||z_0 - z*||``, so a row whose equilibrium
class wins by a positive margin is eventually proven; rows not proven within the configured number
of steps iterate on until the contraction has shrunk their error below float64 resolution. One
that still cannot be proven (a near tie at the equilibrium) gets no class (-1), which can only
lower the count of any class: the bounds stay valid (the per-sample rule is a fixed function of
the noise, so the reduced indicators are i.i.d. Bernoulli with a mean at most the true one).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

ROUNDING_SLACK = 1e-10


def proof_support(model: nn.Module) -> Tuple[bool, str]:
    """Whether per-sample proofs are available for ``model``: a DEQ whose cell has a contraction
    certificate and whose read-out is affine. ``(ok, reason)``."""
    from ...deq.contraction import contraction_certificate
    from ..lipschitz import head_affine
    if not all(hasattr(model, a) for a in ("cell", "inject", "head")):
        return False, f"{type(model).__name__} is not a DEQ with a cell, an injection and a head"
    cert = contraction_certificate(model)
    if not cert.certified:
        return False, f"no contraction certificate for the cell ({cert.reason})"
    if head_affine(model) is None:
        return False, f"the read-out {type(model.head).__name__} is not affine in the state"
    return True, f"contraction rate L <= {cert.lip_z:.6g}, affine read-out"


class EquilibriumClassProof:
    """Proves, per sample, that the class read out at a state ``z`` is the exact equilibrium's
    (see the module docstring). Built once per model; the model itself is not modified."""

    def __init__(self, model: nn.Module, *, clip: bool = False):
        from .._util import float64_copy
        from ...deq.contraction import contraction_certificate
        from ..lipschitz import head_affine, pair_norms
        ok, reason = proof_support(model)
        if not ok:
            from ...errors import ConfigError
            raise ConfigError(f"proven warm starts need a certified contractive cell and an affine "
                              f"read-out: {reason}")
        self.rate = float(contraction_certificate(model).lip_z)
        self.model64 = float64_copy(model)
        W, b = head_affine(model)
        self.W, self.b = W, b
        self.pair = pair_norms(W)
        self.clip = clip
        # steps after which the contraction bound L^k has shrunk any start's error by 1e-13
        # (below float64 resolution relative to the state): iterating on cannot prove more
        self.max_steps = int(min(10_000, math.ceil(math.log(1e-13) / math.log(max(self.rate, 1e-3)))))

    def _input(self, xn: Tensor) -> Tensor:
        x64 = xn.detach().to(device=self.W.device, dtype=torch.float64)
        return x64.clamp(0.0, 1.0) if self.clip else x64

    def _f(self, z64: Tensor, u: Tensor) -> Tensor:
        m = self.model64
        return m.f(z64, u) if hasattr(m, "f") else m.cell(z64, u)

    def _decide(self, zf: Tensor, ff: Tensor) -> Tuple[Tensor, Tensor]:
        """``(cls, proven)`` read out at ``ff = f(z)`` (rows flattened), from the residual
        ``||ff - zf||`` and the contraction rate."""
        r = (ff - zf).norm(dim=1)
        r = r * (1 + ROUNDING_SLACK) + ROUNDING_SLACK * (zf.norm(dim=1) + ff.norm(dim=1))
        # read out at f(z), closer to z* by the factor L: ||f(z) - z*|| <= L ||z - z*||
        rho = self.rate * r / (1.0 - self.rate)
        logits = ff @ self.W.T + self.b
        cls = logits.argmax(dim=1)
        gap = logits.gather(1, cls[:, None]) - logits                  # (B, C), 0 at c
        need = self.pair[cls] * rho[:, None]                           # (B, C)
        other = torch.ones_like(gap, dtype=torch.bool)
        other.scatter_(1, cls[:, None], False)
        proven = ((gap > need) | ~other).all(dim=1) & torch.isfinite(r) & torch.isfinite(logits).all(dim=1)
        return cls, proven

    def classes(self, xn: Tensor, z: Tensor) -> Tuple[Tensor, Tensor]:
        """``(cls, proven)`` for noisy inputs ``xn`` (B, ...) and states ``z`` (B, ...): the class
        read out at ``f(z)`` and whether it is proven to be the exact equilibrium's class."""
        m = self.model64
        with torch.no_grad():
            u = m.inject(self._input(xn))
            z64 = z.detach().to(device=self.W.device, dtype=torch.float64).reshape(m.init_state(u).shape)
            b = z64.shape[0]
            cls, proven = self._decide(z64.reshape(b, -1), self._f(z64, u).reshape(b, -1))
        return cls.to(xn.device), proven.to(xn.device)

    def iterate(self, xn: Tensor, z0: Tensor, max_steps: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fixed-point iteration ``z_{k+1} = f(z_k)`` from ``z0`` with the proof checked after
        every step, each row stopping at its first proof. The evaluation that makes the step also
        gives the residual ``||f(z_k) - z_k||``, so checking costs no extra evaluation of the cell,
        and a row proven after ``k`` steps has cost ``k``. By the contraction the iterates converge
        to ``z*`` (``||z_k - z*|| <= L^k ||z_0 - z*||``), so every row whose equilibrium class wins by
        a positive margin is eventually proven.

        Returns ``(cls, proven, steps, z)``: the class read out at the last iterate, whether it is
        proven, the evaluations of the cell per row (at most ``max_steps``), and the last iterate
        (float64, in the model's state shape)."""
        m = self.model64
        with torch.no_grad():
            u = m.inject(self._input(xn))
            shape = m.init_state(u).shape
            z = z0.detach().to(device=self.W.device, dtype=torch.float64).reshape(shape).clone()
            b = shape[0]
            cls = torch.full((b,), -1, dtype=torch.long, device=z.device)
            proven = torch.zeros(b, dtype=torch.bool, device=z.device)
            steps = torch.zeros(b, dtype=torch.long, device=z.device)
            act = torch.arange(b, device=z.device)
            for _ in range(int(max_steps)):
                za = z[act]
                fz = self._f(za, u[act])
                c, ok = self._decide(za.reshape(act.numel(), -1), fz.reshape(act.numel(), -1))
                z[act] = fz
                steps[act] += 1
                cls[act] = c
                proven[act] = ok
                finite = torch.isfinite(fz.reshape(act.numel(), -1)).all(dim=1)
                act = act[~ok & finite]
                if not act.numel():
                    break
        d = xn.device
        return cls.to(d), proven.to(d), steps.to(d), z


def make_proof(model: nn.Module, srs_check: str, clip: bool) -> Optional[EquilibriumClassProof]:
    """The proof for ``srs_check`` ``"proof"`` (required), ``"auto"`` (where available) or
    ``"sample"`` (None)."""
    if srs_check == "sample":
        return None
    if srs_check == "auto" and not proof_support(model)[0]:
        return None
    return EquilibriumClassProof(model, clip=clip)


__all__ = ["EquilibriumClassProof", "proof_support", "make_proof"]
