"""Interval bound propagation (IBP; Gowal et al. 2018) through the fixed point, for Linf certificates.

Soundness argument (no contraction of the interval map needed): let ``B_0`` be a box known to
contain ``z*(x')`` for **every** ``x'`` in the input box ``X = [x - eps, x + eps] ∩ [0, 1]``, and
``F(B)`` the interval extension of the cell over ``B`` and ``U = inj(X)`` (interval arithmetic:
``W z + u`` on a box is the box with centre ``W mu + u_c`` and radius ``|W| r + r_u``; a monotone
activation maps the end points). Since ``z* = f(z*, u)``, ``z* ∈ B_k`` implies
``z* ∈ f(B_k, U) ⊆ F(B_k)``; by induction every ``B_{k+1} = B_k ∩ F(B_k)`` contains ``z*(x')``
for all ``x' ∈ X``. The iteration is stopped after ``iters`` steps or when the box stops shrinking;
the final box is an enclosure whatever its size (Wei & Kolter, ICLR 2022 iterate the same interval
map; it shrinks to a small box when ``|W|`` is itself contractive, e.g. ``rho(|W|) < 1``).

Starting boxes:
- ``MLPCell`` with tanh: ``[-1, 1]^D`` (the range of tanh);
- ``MLPCell`` with relu, or ``LinearCell``, certified contractive (``Lip_z <= L < 1``):
  ``||z*|| <= sup_{u in U} ||u|| / (1 - L)`` (since ``f(0, 0) = 0``); relu also gives ``z* >= 0``;
- ``MonotoneCell``: ``z*(0) = 0`` and ``||z*(u) - z*(0)|| <= ||u|| / m`` (Pabbaraju et al. 2021), and
  ``z* >= 0``; its forward-backward map ``relu(M z + a u)``, ``M = (1-a) I + a W``, is propagated.

Certified at ``eps`` when the lower bound of every logit difference ``logit_y - logit_j`` over the
final box is ``> 0`` (last-layer elision: ``c^T z`` over a box is bounded by ``c^T mu - |c|^T r``).
All arithmetic is float64; every box is widened outward by a relative 1e-10 (+1e-12) per step to
cover rounding. The enclosure is of the exact equilibrium map; the solver's own error is not in it.
The interval map, the input box and the margins are those of :mod:`.interval` in its rounding mode
(certified training iterates the same map in the model's dtype, differentiably).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ._util import eval_mode, require_deq, require_feedforward
from ..deq.contraction import ContractionCertificate, contraction_certificate


@dataclass
class IBPResult:
    """IBP outcome at one ``eps`` (tensors (B, ...)).``applicable`` False -> see ``reason``."""

    eps: float
    applicable: bool
    reason: str
    certified: Optional[Tensor] = None     # (B,) bool
    lower_margin: Optional[Tensor] = None  # (B,) min_j lower bound of logit_y - logit_j
    z_lo: Optional[Tensor] = None          # (B, D) enclosure of z*(x') for all x' in the ball
    z_hi: Optional[Tensor] = None
    iters: int = 0
    details: dict = field(default_factory=dict)


def _start_box(model: nn.Module, cert: ContractionCertificate, kind: str, act: str):
    """``(start, scale)`` of the a-priori box of ``z*`` (see the module), or a ConfigError with the
    reason IBP does not apply."""
    if kind == "monotone":
        m = cert.monotone_m
        if m is None or not m > 0:
            raise ConfigError("the monotone cell's I - W is not strongly monotone: no a-priori box")
        return "relu", 1.0 / m
    if act == "tanh":
        return "tanh", None
    if not cert.certified:
        raise ConfigError("relu MLP cell without a contraction certificate: no a-priori box for z*"
                          if kind == "mlp" else "linear cell with ||A||_2 >= 1: no a-priori box for z*")
    return ("relu" if act == "relu" else "identity"), 1.0 / (1.0 - cert.lip_z)


def _interval_setup(model: nn.Module, cert: ContractionCertificate):
    """``(interval map, start, scale)`` of ``model`` for :func:`ibp_certify`; a ConfigError with
    the reason IBP does not apply."""
    from .interval import interval_map
    imap = interval_map(model, differentiable=False)
    start, scale = _start_box(model, cert, imap.kind, imap.act)
    return imap, start, scale


def ibp_unavailable(model: nn.Module, contraction: Optional[ContractionCertificate] = None) -> Optional[str]:
    """Why :func:`ibp_certify` would return a result that is not ``applicable`` for ``model``
    (its interval map: the cell, the injection and its normalisation, the read-out; the a-priori
    box), or None when IBP applies. The same test :func:`ibp_certify` makes, so that what a
    report announces as available is what IBP then does."""
    with eval_mode(model), torch.no_grad():
        if hasattr(model, "prepare"):
            model.prepare()
        cert = contraction if contraction is not None else contraction_certificate(model)
        try:
            _interval_setup(model, cert)
        except ConfigError as e:
            return str(e)
    return None


def ibp_certify(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, iters: int = 200,
                tol: float = 1e-9, contraction: Optional[ContractionCertificate] = None,
                lipschitz=None, z: Optional[Tensor] = None, residual: Optional[Tensor] = None) -> IBPResult:
    """Linf certificate at radius ``eps`` by interval bounds of the fixed point (see module).

    Args:
        model: DEQ with an ``MLPInjection`` (Normalize + Linear) or a ``ConvStemInjection``, an
            ``MLPCell``/``MonotoneCell``/``LinearCell`` and a ``LinearHead``.
        x: (B, ...) inputs in [0, 1]; y: (B,) labels (or predictions).
        eps: Linf radius (input units); the box is intersected with [0, 1].
        iters: maximum interval iterations; tol: stop when no bound moves by more than this.
        contraction: the model's :class:`ContractionCertificate` (None: computed here), from
            which the a-priori box of ``z*`` is built.
        lipschitz, z, residual: optionally an available :class:`LipschitzBound`, the solver's
            states ``z`` (B, D) at ``x`` and their residuals ``||f(z) - z||`` (B,): the start box
            is then also intersected with ``z ± (Lip_x(z*) max_{x'} ||x' - x||_2 + e r)``
            (``e`` the a-posteriori error factor), which holds for every ``x'`` in the box.
    """
    require_deq(model, "ibp_certify")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
    if iters < 1:
        raise ConfigError(f"iters must be >= 1, got {iters}")
    from .interval import abs_contraction
    with eval_mode(model), torch.no_grad():
        if hasattr(model, "prepare"):
            model.prepare()
        cert = contraction if contraction is not None else contraction_certificate(model)
        try:
            imap, start, scale = _interval_setup(model, cert)
        except ConfigError as e:
            return IBPResult(float(eps), False, str(e))
        x = model.check_input(x).detach()
        dev = imap.M.device
        x64 = x.to(dev, torch.float64).flatten(1)
        xl, xh = (x64 - eps).clamp(0, 1), (x64 + eps).clamp(0, 1)
        ul, uh = imap.input_box(x64, eps, rounding=True)
        B, D = ul.shape
        # starting box containing z*(x') for all x' in the box
        if start == "tanh":
            lo = torch.full((B, D), -1.0, dtype=torch.float64, device=dev)
            hi = torch.ones_like(lo)
        else:
            umax = torch.maximum(ul.abs(), uh.abs()).norm(dim=1) * (1 + 1e-9)  # sup ||u|| over the box
            R = (umax * scale)[:, None].expand(B, D)
            lo = torch.zeros_like(R) if start == "relu" else -R
            hi = R.clone()
        if lipschitz is not None and z is not None and residual is not None and lipschitz.available:
            dx = torch.maximum(x64 - xl, xh - x64).norm(dim=1)              # max ||x' - x||_2
            e = float(lipschitz.details.get("err_factor", math.inf))
            if math.isfinite(e):
                Rz = (lipschitz.lip_x_z * dx + e * residual.to(dev, torch.float64)) * (1 + 1e-9) + 1e-12
                zc = z.detach().to(dev, torch.float64).flatten(1)
                lo = torch.maximum(lo, zc - Rz[:, None])
                hi = torch.minimum(hi, zc + Rz[:, None])
                start = start + "+lipschitz"
        Mabs = imap.M.abs()
        used = 0
        for k in range(iters):
            nlo, nhi = imap.step(lo, hi, ul, uh, rounding=True, Mabs=Mabs)
            nlo, nhi = torch.maximum(lo, nlo), torch.minimum(hi, nhi)
            moved = float(torch.maximum((nlo - lo).abs().max(), (nhi - hi).abs().max()))
            lo, hi = nlo, nhi
            used = k + 1
            if moved <= tol:
                break
        low = imap.margins(lo, hi, y.to(dev), rounding=True)
        lower_margin = low.min(dim=1).values
        rho_abs = float(torch.linalg.eigvals(Mabs).abs().max())
        return IBPResult(float(eps), True, "interval iteration from an a-priori enclosure of z*",
                         certified=lower_margin > 0, lower_margin=lower_margin, z_lo=lo, z_hi=hi,
                         iters=used, details={"cell": imap.kind, "start_box": start,
                                              "rho_abs_map": rho_abs,
                                              "rho_abs_bound": abs_contraction(imap.M).rate,
                                              "mean_width": float((hi - lo).mean())})


def ibp_certify_feedforward(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> IBPResult:
    """Linf certificate at radius ``eps`` of a feed-forward classifier (a plain ``nn.Sequential``
    of Linear, Conv2d, ReLU, Tanh, Flatten, average pooling ending in Linear, or the zoo's
    ``FeedForward`` around one; see :func:`robustdeq.certify.feedforward.is_feedforward`) by interval
    propagation layer by layer, float64 with outward rounding
    (:func:`robustdeq.certify.interval.sequential_margins`): the explicit-network baseline of IBP
    training. Certified when every lower bound of ``logit_y - logit_j`` is ``> 0``. Any other
    module (one that only has a ``.net``, or overrides ``forward``) is a ConfigError; a layer
    interval bounds cannot follow gives a result that is not ``applicable``."""
    from .interval import sequential_margins
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
    net = require_feedforward(model, "ibp_certify_feedforward")
    with eval_mode(model), torch.no_grad():
        check = getattr(model, "check_input", None)
        if callable(check):
            x = check(x)
        else:
            from ..data import validate_inputs
            x = validate_inputs(x, expected_shape=getattr(model, "input_shape", None))
        try:
            low = sequential_margins(net, x.detach(), y, float(eps), rounding=True)
        except ConfigError as e:
            return IBPResult(float(eps), False, str(e))
        lower_margin = low.min(dim=1).values
    return IBPResult(float(eps), True, "interval propagation through the layers",
                     certified=lower_margin > 0, lower_margin=lower_margin,
                     details={"network": type(net).__name__})


__all__ = ["IBPResult", "ibp_certify", "ibp_unavailable", "ibp_certify_feedforward"]
