"""The interval map of a DEQ (and of a feed-forward network), in two numeric modes.

One implementation serves certification and certified training:

- ``rounding=True`` (certification, :func:`robustdeq.certify.ibp.ibp_certify`): float64, every
  box widened outward by a relative 1e-10 (+1e-12) after each operation, no autograd;
- ``rounding=False`` (training, :mod:`robustdeq.defenses.certified`): the model's dtype, no
  widening, differentiable in the weights.

A DEQ whose cell iterates ``z <- act(M z + a u)`` (``MLPCell``: ``M = W``, ``a = 1``;
``MonotoneCell``: the forward-backward step ``M = (1 - a) I + a W``; ``LinearCell``: ``M = A``)
has the interval map (Gowal et al. 2018, iterated through the fixed point as by Wei & Kolter,
ICLR 2022)::

    F([lo, hi]) = act([c - r, c + r]),  c = M mu + a u_c,  r = |M| rad + a u_r

with ``mu``, ``rad`` the centre and radius of ``[lo, hi]`` and ``[u_c - u_r, u_c + u_r]`` the
injection's image of the input box. In the coordinates (centre, radius) its linear part is
``diag(M, |M|)``; a monotone 1-Lipschitz ``act`` applied to the end points keeps every
contraction bound. Hence **condition**: if the spectral radius ``rho(|M|) < 1`` (``|M|`` the
elementwise absolute value), there is a positive vector ``v`` with ``|M| v <= q v``, ``q < 1``
(Perron-Frobenius; :func:`abs_contraction` finds ``v`` by power iteration and certifies ``q`` by
the Collatz-Wielandt bound ``q = max_i (|M| v)_i / v_i``, a rigorous upper bound on
``rho(|M|)``), the interval map is a contraction with rate ``q`` in the norm
``max_i |.|_i / v_i`` on both end points, so the interval fixed point ``B* = F(B*)`` exists, is
unique and the iteration reaches it from any start; ``|M z| <= |M| |z|`` makes ``M`` a contraction
in the same norm, so ``z*`` is unique too. ``B*`` contains ``z*(x')`` for every ``x'`` in the input
box: from any a-priori box ``C_0`` of the ``z*(x')`` the boxes ``C_k = F^k(C_0)`` all contain them
(``z* = f(z*, u) in F(C_k)``) and converge to ``B*``. A cell violating the condition has no such
guarantee: certified training refuses it (:class:`~robustdeq.errors.ConfigError`); certification
stays sound without it (:mod:`.ibp` intersects with an a-priori box).

Feed-forward networks (``nn.Sequential`` of Linear, Conv2d, ReLU, Tanh, Flatten, average pooling)
propagate the box layer by layer with the same centre/radius rule (:func:`sequential_box`).

The last layer is folded into the margins (``elision``): the lower bound of ``(w_y - w_j)^T z +
b_y - b_j`` over a box is ``(w_y - w_j)^T mu - |w_y - w_j|^T rad + b_y - b_j``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

_PAD_REL, _PAD_ABS = 1e-10, 1e-12


def outward(lo: Tensor, hi: Tensor, rounding: bool = True) -> Tuple[Tensor, Tensor]:
    """Widen ``[lo, hi]`` outward by a relative 1e-10 (+1e-12) to cover float64 rounding
    (identity when ``rounding`` is False)."""
    if not rounding:
        return lo, hi
    return (lo - _PAD_REL * lo.abs() - _PAD_ABS, hi + _PAD_REL * hi.abs() + _PAD_ABS)


def activation(name: str, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
    """A monotone activation on the end points of a box."""
    if name == "tanh":
        return torch.tanh(lo), torch.tanh(hi)
    if name == "relu":
        return F.relu(lo), F.relu(hi)
    return lo, hi


@dataclass
class IntervalMap:
    """The pieces of a DEQ ``x -> u = U n(x) + b -> z* = act(M z* + a u) -> W_o z* + b_o`` as
    tensors (detached float64 for certification, the model's differentiable weights for
    training). ``n`` is the injection's normalisation ``(x - mean) * inv_std`` per feature."""

    kind: str             # "mlp" | "monotone" | "linear"
    M: Tensor             # (D, D) linear part of the iterated map
    a: float              # step on the injection (1 except for the monotone splitting)
    act: str              # "tanh" | "relu" | "identity"
    U: Tensor             # (D, n_in)
    bias: Tensor          # (D,)
    mean: Tensor          # (n_in,) float64
    inv_std: Tensor       # (n_in,) float64
    Wo: Tensor            # (C, D)
    bo: Tensor            # (C,)
    stem: Optional[nn.Module] = None   # layers between the normalisation and U (ConvStemInjection)
    in_shape: Optional[Tuple[int, ...]] = None   # (C, H, W) of the inputs, with a stem

    def input_box(self, x: Tensor, eps: float, rounding: bool) -> Tuple[Tensor, Tensor]:
        """``[u_lo, u_hi]``: the injection's image of ``[x - eps, x + eps] & [0, 1]`` (B, D)
        (through the convolutional ``stem`` first when there is one)."""
        dt = self.U.dtype
        xf = x.flatten(1).to(self.mean.dtype)
        xl, xh = (xf - eps).clamp(0, 1), (xf + eps).clamp(0, 1)
        nl, nh = (xl - self.mean) * self.inv_std, (xh - self.mean) * self.inv_std
        nl, nh = torch.minimum(nl, nh), torch.maximum(nl, nh)
        if self.stem is not None:
            shape = (x.shape[0],) + tuple(self.in_shape)
            nl, nh = outward(nl, nh, rounding)
            nl, nh = propagate_box(list(self.stem.children()), nl.reshape(shape).to(dt),
                                   nh.reshape(shape).to(dt), rounding)
            if nl.dim() != 2:
                raise ConfigError(f"interval bounds through a convolutional stem need it to end in (batch, "
                                  f"features) for the injection's Linear; it ends in {tuple(nl.shape)}")
        c, r = (0.5 * (nl + nh)).to(dt), (0.5 * (nh - nl)).to(dt)
        u_c = c @ self.U.t() + self.bias
        u_r = r @ self.U.abs().t()
        return outward(u_c - u_r, u_c + u_r, rounding)

    def step(self, lo: Tensor, hi: Tensor, ul: Tensor, uh: Tensor, rounding: bool,
             Mabs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """One application of the interval map ``F`` (see the module)."""
        Mabs = self.M.abs() if Mabs is None else Mabs
        mu, rad = 0.5 * (lo + hi), 0.5 * (hi - lo)
        pc = mu @ self.M.t() + self.a * 0.5 * (ul + uh)
        pr = rad @ Mabs.t() + self.a * 0.5 * (uh - ul)
        nlo, nhi = activation(self.act, *outward(pc - pr, pc + pr, rounding))
        return outward(nlo, nhi, rounding)

    def margins(self, lo: Tensor, hi: Tensor, y: Tensor, rounding: bool) -> Tensor:
        """(B, C) lower bounds of ``logit_y - logit_j`` over the box (``+inf`` at ``j = y``)."""
        return elided_margins(self.Wo, self.bo, lo, hi, y, rounding)


def elided_margins(Wo: Tensor, bo: Tensor, lo: Tensor, hi: Tensor, y: Tensor, rounding: bool) -> Tensor:
    """(B, C) lower bounds of ``(w_y - w_j)^T z + b_y - b_j`` for ``z`` in ``[lo, hi]`` (the last
    layer folded in, Gowal et al. 2018), ``+inf`` at ``j = y``."""
    y = y.to(lo.device).long()
    B = lo.shape[0]
    Cmat = Wo[y][:, None, :] - Wo[None, :, :]              # (B, C, D)
    db = bo[y][:, None] - bo[None, :]                      # (B, C)
    mu, rad = 0.5 * (lo + hi), 0.5 * (hi - lo)
    low = (Cmat @ mu[:, :, None]).squeeze(-1) - (Cmat.abs() @ rad[:, :, None]).squeeze(-1) + db
    if rounding:
        low = low - _PAD_REL * low.abs() - _PAD_ABS
    mask = torch.zeros_like(low, dtype=torch.bool)
    mask[torch.arange(B, device=low.device), y] = True
    return low.masked_fill(mask, math.inf)


def interval_map(model: nn.Module, *, differentiable: bool = False) -> IntervalMap:
    """The :class:`IntervalMap` of a DEQ (``MLPInjection`` + ``MLPCell``/``MonotoneCell``/
    ``LinearCell`` + affine read-out), or a ConfigError naming what does not fit.

    ``differentiable=False``: detached float64 (certification); True: the model's own weights
    in its dtype, with autograd (training). The monotone cell's step ``a`` is a number (the
    cell's ``alpha``, as its forward uses it). A part that subclasses its class but overrides
    what the map is built from, or a ``DEQClassifier`` subclass overriding its composition, is a
    ConfigError naming it (:func:`robustdeq.certify._util.changed_deq_part`)."""
    from ..deq.cells import LinearHead, MLPCell, MLPInjection, MonotoneCell
    from ._util import changed_deq_part, input_feature_affine
    from ..deq.cells import LinearCell
    changed = changed_deq_part(model)
    if changed is not None:
        raise ConfigError(f"interval bounds of the parts' classes would not cover this model: {changed}")
    cell = getattr(model, "cell", None)

    def t(w: Tensor) -> Tensor:
        return w if differentiable else w.detach().to(torch.float64)
    if isinstance(cell, MonotoneCell):
        W = t(cell.W())
        a = float(cell.alpha)
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        kind, M, act = "monotone", (1 - a) * eye + a * W, "relu"
    elif isinstance(cell, MLPCell):
        if cell.act not in ("tanh", "relu"):
            raise ConfigError(f"activation {cell.act!r} is not supported by interval bounds")
        kind, M, a, act = "mlp", t(cell.weight_matrix()), 1.0, cell.act
    elif isinstance(cell, LinearCell):
        kind, M, a, act = "linear", t(cell.weight_matrix()), 1.0, "identity"
    else:
        raise ConfigError(f"interval bounds through {type(cell).__name__} are not supported "
                          "(supported: MLPCell, MonotoneCell, LinearCell)")
    from ..deq.cells import ConvStemInjection
    inj = getattr(model, "injection", None)
    stem, in_shape = None, getattr(model, "input_shape", None)
    if isinstance(inj, ConvStemInjection):
        if in_shape is None or len(in_shape) != 3:
            raise ConfigError("interval bounds through a convolutional stem need the model's input_shape (C, H, W)")
        if not (isinstance(inj.stem, nn.Sequential) and type(inj.stem).forward is nn.Sequential.forward):
            raise ConfigError("interval bounds through a convolutional stem need it to be a plain nn.Sequential "
                              f"(its layers in order); the stem is a {type(inj.stem).__name__}")
        for layer in inj.stem:
            _check_rule(layer)
        stem, in_shape = inj.stem, tuple(int(v) for v in in_shape)
        if not differentiable and any(p.dtype != torch.float64 for p in stem.parameters()):
            stem = _cast_layer(stem, torch.float64)
    elif not isinstance(inj, MLPInjection):
        raise ConfigError("interval bounds need an MLPInjection (Normalize + Linear) or a ConvStemInjection, "
                          f"and a linear head; the injection is {type(inj).__name__}")
    lin = inj.linear
    U = t(lin.weight)
    bias = t(lin.bias) if lin.bias is not None else torch.zeros(U.shape[0], dtype=U.dtype, device=U.device)
    n_in = int(math.prod(in_shape)) if stem is not None else U.shape[1]
    aff = input_feature_affine(inj, in_shape, n_in)
    if aff is None:
        raise ConfigError("interval bounds need the injection's Normalize (mean/std) applied per input feature "
                          "in a known way (per-channel statistics need the model's input_shape (C, H, W) "
                          "with as many channels)")
    mean, inv_std = (v.to(U.device) for v in aff)
    head = getattr(model, "head", None)
    if isinstance(head, LinearHead):
        Wo, bo = t(head.linear.weight), head.linear.bias
        bo = t(bo) if bo is not None else torch.zeros(Wo.shape[0], dtype=Wo.dtype, device=Wo.device)
    elif not differentiable:
        from .lipschitz import head_affine
        ab = head_affine(model)
        if ab is None:
            raise ConfigError("interval bounds need an MLPInjection (Normalize + Linear) and a linear head")
        Wo, bo = ab
    else:
        raise ConfigError(f"certified training needs a LinearHead read-out, got {type(head).__name__}")
    return IntervalMap(kind, M, a, act, U, bias, mean, inv_std, Wo.to(M.device), bo.to(M.device), stem, in_shape)


@dataclass(frozen=True)
class AbsContraction:
    """``rho(|M|) <= rate`` certified by a positive vector ``v`` (``|M| v <= rate v``)."""

    rate: float
    v: Tensor

    @property
    def holds(self) -> bool:
        """Whether the certified rate is below 1: the interval map is a contraction."""
        return self.rate < 1.0


def abs_contraction(M: Tensor, iters: int = 200) -> AbsContraction:
    """A rigorous upper bound on the spectral radius of ``|M|`` (float64): power iteration on
    ``|M|`` gives a positive ``v``; the Collatz-Wielandt ratio ``max_i (|M| v)_i / v_i`` bounds
    ``rho(|M|)`` from above for every positive ``v`` (padded by a relative 1e-9 for rounding).
    The interval map (see the module) contracts at that rate in ``max_i |.|_i / v_i``."""
    A = M.detach().to(torch.float64).abs()
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ConfigError(f"expected a square matrix, got {tuple(A.shape)}")
    if not bool(torch.isfinite(A).all()):
        raise ConfigError("the cell's weights are not finite")
    n = A.shape[0]
    v = torch.ones(n, dtype=torch.float64, device=A.device)
    best_rate, best_v = math.inf, v
    floor = 1e-12
    for _ in range(iters):
        w = A @ v + floor * v.max()             # strictly positive
        rate = float((w / v).max())
        if rate < best_rate:
            best_rate, best_v = rate, v
        v = w / w.max()
    Av = A @ best_v
    rate = float((Av / best_v).max()) * (1 + 1e-9)
    return AbsContraction(rate, best_v)


def check_interval_condition(imap: IntervalMap, who: str = "IBP training") -> AbsContraction:
    """The existence/uniqueness condition ``rho(|M|) < 1`` (see the module), or a ConfigError
    naming the cell and the bound."""
    ac = abs_contraction(imap.M)
    if not ac.holds:
        raise ConfigError(
            f"{who}: the {imap.kind} cell's interval map is not a contraction (rho(|M|) <= {ac.rate:.4g} "
            f"is not < 1, M the {'forward-backward step (1 - a) I + a W' if imap.kind == 'monotone' else 'cell weight'}): "
            "its interval fixed point need not exist or be unique. Use a parameterisation that "
            "guarantees it, e.g. mlp_deq with norm='interval' and scale < 1")
    return ac


# ------------------------------------------------------------------------- feed-forward networks
_PASS = (nn.Flatten, nn.Identity, nn.Dropout)


#: the layers with an interval rule (each followed only where its forward is torch's own)
_RULES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Tanh, nn.Flatten, nn.Identity, nn.Dropout, nn.AvgPool2d,
          nn.AdaptiveAvgPool2d)


def _check_rule(layer: nn.Module) -> None:
    """A ConfigError when ``layer`` subclasses a layer with an interval rule but overrides its
    ``forward`` (a convolution also its ``_conv_forward``): the rule reads the weights as torch's
    layer uses them and need not enclose what the subclass computes. (A parametrised layer keeps
    the forward of its class.)"""
    from ..deq.cells import CERTIFIED_PARTS, overridden
    for base in _RULES:
        if isinstance(layer, base):
            bad = overridden(layer, base, CERTIFIED_PARTS.get(base, ("forward",)))
            if bad:
                raise ConfigError(f"interval bounds through {type(layer).__name__}: it subclasses nn.{base.__name__} "
                                  f"but overrides {', '.join(bad)}, so the interval rule of nn.{base.__name__} need "
                                  f"not enclose what it computes; use nn.{base.__name__} itself")
            return


def _affine_box(layer: nn.Module, mu: Tensor, rad: Tensor) -> Tuple[Tensor, Tensor]:
    if isinstance(layer, nn.Linear):
        return F.linear(mu, layer.weight, layer.bias), F.linear(rad, layer.weight.abs())
    if isinstance(layer, nn.Conv2d):
        # the layer's own padding (zeros, or a reflect / replicate / circular copy of the input):
        # every padded entry is 0 or a copy of one input entry, so padding the centre and the
        # (nonnegative) radius the same way encloses the padded input box exactly
        c = layer._conv_forward(mu, layer.weight, layer.bias)
        r = layer._conv_forward(rad, layer.weight.abs(), None)
        return c, r
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return F.adaptive_avg_pool2d(mu, layer.output_size), F.adaptive_avg_pool2d(rad, layer.output_size)
    if isinstance(layer, nn.AvgPool2d):
        return layer(mu), layer(rad)
    raise ConfigError(f"interval bounds through {type(layer).__name__} are not supported "
                      "(supported: Linear, Conv2d, ReLU, Tanh, Flatten, average pooling)")


def _cast_layer(layer: nn.Module, dtype) -> nn.Module:
    if dtype == torch.float64 and any(p.dtype != torch.float64 for p in layer.parameters()):
        import copy
        layer = copy.deepcopy(layer).to(torch.float64)
        for p in layer.parameters():
            p.requires_grad_(False)
    return layer


def propagate_box(layers, lo: Tensor, hi: Tensor, rounding: bool) -> Tuple[Tensor, Tensor]:
    """The box ``[lo, hi]`` through ``layers`` (Linear, Conv2d, ReLU, Tanh, Flatten, average
    pooling) by the centre/radius rule; ``rounding`` as in the module (float64 copies of the
    layers, outward widening after each layer). ``nn.Flatten`` reshapes both end points as it
    reshapes an input (its ``start_dim`` / ``end_dim``); one that would flatten the batch dimension
    is a ConfigError."""
    dt = lo.dtype
    for layer in layers:
        _check_rule(layer)
        if isinstance(layer, nn.Flatten):
            # a reshape: applied to both end points it is exact, whatever start_dim / end_dim
            # flatten, as long as the batch dimension stays apart
            start = layer.start_dim + lo.dim() if layer.start_dim < 0 else layer.start_dim
            if start < 1:
                raise ConfigError(f"interval bounds through nn.Flatten(start_dim={layer.start_dim}, "
                                  f"end_dim={layer.end_dim}) on a {lo.dim()}-D batch: it flattens the batch "
                                  "dimension into the features, so the samples are no longer separate; "
                                  "use start_dim >= 1")
            lo, hi = layer(lo), layer(hi)
            continue
        if isinstance(layer, _PASS):
            continue
        if isinstance(layer, (nn.ReLU, nn.Tanh)):
            lo, hi = activation("relu" if isinstance(layer, nn.ReLU) else "tanh", lo, hi)
            lo, hi = outward(lo, hi, rounding)
            continue
        layer = _cast_layer(layer, dt) if rounding else layer
        c, r = _affine_box(layer, 0.5 * (lo + hi), 0.5 * (hi - lo))
        lo, hi = outward(c - r, c + r, rounding)
    return lo, hi


def sequential_box(net: nn.Module, x: Tensor, eps: float, rounding: bool
                   ) -> Tuple[Tensor, Tensor, nn.Linear]:
    """Interval propagation of ``[x - eps, x + eps] & [0, 1]`` through an ``nn.Sequential`` whose
    last layer is an ``nn.Linear``: returns the box ``(lo, hi)`` at that layer's input
    (flattened) and the layer (for :func:`elided_margins`). ``rounding`` as in the module
    (float64 copies of the layers, outward widening after each layer)."""
    layers = list(net.children()) if isinstance(net, nn.Sequential) else [net]
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ConfigError("interval bounds of a feed-forward network need an nn.Sequential ending in nn.Linear")
    _check_rule(layers[-1])
    dt = torch.float64 if rounding else next(net.parameters()).dtype
    xd = x.to(dt)
    lo, hi = outward(xd - eps, xd + eps, rounding)
    lo, hi = propagate_box(layers[:-1], lo.clamp(0, 1), hi.clamp(0, 1), rounding)
    if lo.dim() != 2:
        raise ConfigError(f"interval bounds of a feed-forward network need its last nn.Linear to map (batch, "
                          f"features) to the logits; its input here has {lo.dim()} dimensions "
                          f"{tuple(lo.shape)} (flatten it first, e.g. nn.Flatten())")
    return lo, hi, layers[-1]


def sequential_margins(net: nn.Module, x: Tensor, y: Tensor, eps: float, rounding: bool) -> Tensor:
    """(B, C) lower bounds of ``logit_y - logit_j`` of a feed-forward ``net`` over the input box."""
    lo, hi, last = sequential_box(net, x, eps, rounding)
    W, b = last.weight, last.bias
    if rounding:
        W = W.detach().to(torch.float64)
        b = b.detach().to(torch.float64) if b is not None else None
    if b is None:
        b = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    return elided_margins(W, b, lo, hi, y, rounding)


__all__ = ["IntervalMap", "interval_map", "elided_margins", "outward", "activation", "AbsContraction",
           "abs_contraction", "check_interval_condition", "propagate_box", "sequential_box", "sequential_margins"]


# ------------------------------------------------------------------- training: the fixed point B*
class _StackedMap:
    """The interval map on the stacked end points ``s = [lo, hi]`` (B, 2D), ``u = [u_lo, u_hi]``,
    with its vector-Jacobian product in closed form (for the implicit backward): with
    ``M = M+ - M-`` and ``|M| = M+ + M-``, ``F(s) = act([M+ lo - M- hi + a u_lo, M+ hi - M- lo +
    a u_hi])``, so ``J^T g = [d_lo M+ - d_hi M-, d_hi M+ - d_lo M-]`` with ``d = act'(pre) * g``."""

    has_vjp = True

    def __init__(self, imap: IntervalMap, D: int):
        self.imap, self.D = imap, D

    def __call__(self, s: Tensor, u: Tensor) -> Tensor:
        D = self.D
        nl, nh = self.imap.step(s[:, :D], s[:, D:], u[:, :D], u[:, D:], rounding=False)
        return torch.cat([nl, nh], dim=1)

    def vjp_at(self, s: Tensor, u: Tensor):
        D, im = self.D, self.imap
        with torch.no_grad():
            M = im.M.detach()
            Mp, Mm = M.clamp_min(0), (-M).clamp_min(0)
            lo, hi, ul, uh = s[:, :D], s[:, D:], u[:, :D].detach(), u[:, D:].detach()
            pre = torch.cat([lo @ Mp.t() - hi @ Mm.t() + im.a * ul, hi @ Mp.t() - lo @ Mm.t() + im.a * uh], dim=1)
            if im.act == "relu":
                dact = (pre > 0).to(pre.dtype)
            elif im.act == "tanh":
                dact = 1 - torch.tanh(pre).square()
            else:
                dact = torch.ones_like(pre)

        def vjp(g: Tensor, c: Optional[Tensor] = None) -> Tensor:
            d = dact * g
            d_lo, d_hi = d[:, :D], d[:, D:]
            out = torch.cat([d_lo @ Mp - d_hi @ Mm, d_hi @ Mp - d_lo @ Mm], dim=1)
            return out if c is None else out + c
        return vjp


def interval_fixed_point(imap: IntervalMap, x: Tensor, eps: float, *, z0: Optional[Tensor] = None,
                         iters: int = 200, tol: float = 1e-5, adjoint_iters: int = 200,
                         adjoint_tol: float = 1e-6, contraction: Optional[AbsContraction] = None
                         ) -> Tuple[Tensor, Tensor, dict]:
    """The interval fixed point ``B* = F(B*)`` over ``[x - eps, x + eps] & [0, 1]``, differentiable
    in the weights of ``imap`` (training mode of the module's interval map: no rounding padding).

    Forward: the iteration ``B_{k+1} = F(B_k)`` without autograd from the point box ``[z0, z0]``
    (``z0`` the clean fixed point, or 0), at most ``iters`` steps, stopped when the largest change
    in the contraction norm ``max_i |.|_i / v_i`` is at most ``tol``; it contracts at rate
    ``q = rho(|M|)`` bound (:func:`abs_contraction`, required ``< 1``). The box returned is widened
    by the a-posteriori bound ``q / (1 - q)`` times the last change (times ``v_i`` per coordinate),
    so that in exact arithmetic it contains ``B*`` and hence ``z*(x')`` for every ``x'`` in the box,
    converged or not.

    Backward: implicit (IFT on the interval map): one differentiable application of ``F`` at the
    fixed point, whose upstream gradient ``g`` is replaced by the solution of the adjoint equation
    ``a = J^T a + g`` (``J`` the Jacobian of ``F`` in the end points), solved by fixed-point
    iteration (at most ``adjoint_iters`` steps, absolute tolerance ``adjoint_tol``), which converges
    since ``J`` contracts at the same rate ``q`` in the dual norm. Memory does not grow with the
    iterations.

    Returns ``(lo, hi, info)`` (B, D) with ``info`` = {"iters", "change", "rate", "pad"}.
    """
    from ..config import SolverConfig
    from ..deq.grad import ImplicitGrad
    ac = contraction if contraction is not None else check_interval_condition(imap)
    q = ac.rate
    if not q < 1:
        raise ConfigError(f"the interval map is not a contraction (rate {q:.4g} >= 1)")
    dt = imap.M.dtype
    ul, uh = imap.input_box(x, eps, rounding=False)
    B, D = ul.shape
    v = ac.v.to(device=ul.device, dtype=dt)
    with torch.no_grad():
        Md = dataclasses.replace(imap, M=imap.M.detach())
        Mabs = Md.M.abs()
        uld, uhd = ul.detach(), uh.detach()
        lo = z0.detach().flatten(1).to(dt).clone() if z0 is not None else torch.zeros(B, D, dtype=dt, device=ul.device)
        hi = lo.clone()
        change, used = math.inf, 0
        for k in range(int(iters)):
            nlo, nhi = Md.step(lo, hi, uld, uhd, rounding=False, Mabs=Mabs)
            change = float(torch.maximum((nlo - lo).abs(), (nhi - hi).abs()).div(v).max())
            lo, hi, used = nlo, nhi, k + 1
            if change <= tol:
                break
        pad = (q / (1.0 - q)) * change * v
    s_star = torch.cat([lo, hi], dim=1)
    u = torch.cat([ul, uh], dim=1)

    est = ImplicitGrad(SolverConfig(name="fixed_point", max_iter=int(adjoint_iters), tol=float(adjoint_tol),
                                    stop_mode="abs"))
    s_out = est.attach(_StackedMap(imap, D), u, s_star)
    lo, hi = s_out[:, :D] - pad, s_out[:, D:] + pad
    return lo, hi, {"iters": used, "change": change, "rate": q, "pad": float(pad.max())}


__all__ += ["interval_fixed_point"]
