"""Sound Lipschitz bounds of ``x -> z* -> logits`` and certified L2 radii.

Input units are the model's inputs (images in [0, 1], before the model's own normalisation).

Bounds on ``Lip_x(z*)`` (L2):

- contraction (rate ``L < 1``, see :mod:`.contraction`):
  ``Lip_x(z*) <= Lip_u(f) Lip_x(inj) / (1 - L)`` (from ``||dz|| <= L ||dz|| + Lip_u ||du||``);
- monotone cell (Pabbaraju, Winston & Kolter, ICLR 2021): ``Lip_u(z*) <= 1 / m`` with ``I - W >= m I``;
  the smaller of that and the splitting-map bound ``a / (1 - L)`` is used;
- linear cell ``A z + u``: exact, ``z* = (I - A)^{-1} u``.

``Lip_x(inj)`` of an ``MLPInjection`` ``U normalize(x) + b`` is ``||U diag(1/std)||_2``; of any
affine injection made of Linear / Conv / Flatten layers it is the spectral norm of its exact matrix
(built column by column from the input basis, for inputs of up to 4096 features).

Certified radius (per sample, label ``y``, read-out ``logits = W_o z + b_o``): the logit difference
``g_j(x) = (w_y - w_j)^T z*(x) + (b_y - b_j)`` is Lipschitz with constant at most
``P_yj = ||w_y - w_j||_2 Lip_x(z*)`` (exact linear: ``||(w_y - w_j)^T (I - A)^{-1} U'||_2``), so the
prediction cannot change within ``radius = min_j g_j(x) / P_yj`` (**per-pair bound**, the one
reported). It is never smaller than the global-constant radius ``M / (sqrt(2) L_logits)`` with
``L_logits = ||W_o||_2 Lip_x(z*)`` (reported as ``radius_global``), since
``||w_y - w_j|| <= sqrt(2) ||W_o||_2``.

Each part is bounded as its class only where it computes that class's map: a subclass overriding
``forward`` (or a method the bound reads), or a ``DEQClassifier`` subclass overriding its
composition, gets no bound (:func:`robustdeq.certify._util.changed_deq_part`; the cell through
the contraction certificate).

Solver error: the radius is certified for the exact equilibrium map. The margin is measured at the
solver's ``z``, not at ``z*``; with residual ``r = ||f(z) - z||`` the certificate subtracts
``|(w_y - w_j)^T (z - z*)| <= ||w_y - w_j|| r / (1 - L)`` (linear: ``||(w_y-w_j)^T (I-A)^{-1}|| r``)
from each margin before dividing.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..deq import linalg
from ._util import changed_deq_part, eval_mode, input_feature_scale, require_deq
from ..deq.contraction import ContractionCertificate, contraction_certificate
from ..deq.cells import LinearCell


@dataclass
class LipschitzBound:
    """Sound bounds on the Lipschitz constants of ``x -> z*`` and ``x -> logits`` (L2).

    ``pair``: (C, C) bounds on the Lipschitz constant of ``logit_i - logit_j`` (diagonal 0);
    ``pair_err``: (C, C) factors ``e_ij`` with ``|(logit_i - logit_j)(z) - (...)(z*)| <= e_ij ||f(z) - z||``.
    ``available`` False (with ``reason``) when no sound bound is known for this model.
    """

    available: bool
    method: str
    reason: str
    lip_x_z: Optional[float] = None
    lip_logits: Optional[float] = None
    exact: bool = False
    pair: Optional[Tensor] = None
    pair_err: Optional[Tensor] = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The bound as a JSON-ready dict (the per-pair tensors ``pair`` and ``pair_err`` are
        left out)."""
        return {"available": self.available, "method": self.method, "reason": self.reason,
                "lip_x_z": self.lip_x_z, "lip_logits": self.lip_logits, "exact": self.exact,
                "details": self.details}


#: modules an injection may be composed of to be bounded as an affine map (its matrix built exactly)
AFFINE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Flatten, nn.Identity)
#: the largest input dimension for which an affine injection's matrix is built
AFFINE_MAX_INPUTS = 4096


def is_affine_injection(inj: Optional[nn.Module]) -> bool:
    """``inj`` is one of :data:`AFFINE_MODULES` or an ``nn.Sequential`` of them (an affine map),
    each computing its class's map (no subclass overriding ``forward``:
    :func:`robustdeq.deq.cells.changed_part`)."""
    from ..deq.cells import changed_part
    from ._util import _plain_sequential
    if isinstance(inj, nn.Sequential):
        return _plain_sequential(inj) and len(inj) > 0 and all(is_affine_injection(m) for m in inj)
    return isinstance(inj, AFFINE_MODULES) and changed_part(inj) is None


def _affine_matrix(inj: nn.Module, input_shape) -> Optional[Tensor]:
    """The exact matrix (out, n_in) of an affine injection (see :func:`is_affine_injection`):
    column ``i`` is ``inj(e_i) - inj(0)``, in float64; None when the input shape is unknown or
    larger than :data:`AFFINE_MAX_INPUTS`."""
    if input_shape is None or not is_affine_injection(inj):
        return None
    n = math.prod(input_shape)
    if n > AFFINE_MAX_INPUTS:
        return None
    p = next(inj.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    basis = torch.eye(n, dtype=torch.float64, device=dev).view(n, *input_shape)
    zero = torch.zeros(1, *input_shape, dtype=torch.float64, device=dev)
    inj64 = copy.deepcopy(inj).to(torch.float64)
    return (inj64(basis).reshape(n, -1) - inj64(zero).reshape(1, -1)).T.contiguous()


def _injection_matrix(model: nn.Module) -> Optional[Tensor]:
    """``U' = U diag(1/std)`` (hidden, n_in) in float64 when the injection is ``Normalize`` +
    ``Linear`` (``MLPInjection``); the exact matrix of an affine injection (Linear / Conv /
    Flatten layers, :func:`is_affine_injection`) for inputs of at most
    :data:`AFFINE_MAX_INPUTS` features; else None."""
    from ..deq.cells import MLPInjection
    inj = getattr(model, "injection", None)
    if not isinstance(inj, MLPInjection):
        return _affine_matrix(inj, getattr(model, "input_shape", None))
    U = inj.linear.weight.detach().to(torch.float64)
    scale = input_feature_scale(inj, getattr(model, "input_shape", None), U.shape[1])
    if scale is None:
        return None
    return U * scale.to(U.device)[None, :]


def _per_channel_unknown(model: nn.Module) -> bool:
    """An ``MLPInjection`` whose normalisation :func:`input_feature_scale` does not recognise
    (per-channel statistics without a matching (C, H, W) ``input_shape``)."""
    from ..deq.cells import MLPInjection
    inj = getattr(model, "injection", None)
    return isinstance(inj, MLPInjection) and hasattr(getattr(inj, "normalize", None), "std")


#: the forward of LyaDEQ's separation head, ``classifier(separation(features(z)))``, by module and
#: qualified name (certify does not import the defenses)
_SEPARATION_FORWARD = ("robustdeq.defenses.lyapunov", "SeparationHead.forward")


def _separation_forward(head: nn.Module) -> bool:
    """``head``'s forward is ``SeparationHead.forward`` itself (no subclass's override)."""
    fwd = getattr(type(head), "forward", None)
    return (getattr(fwd, "__module__", None), getattr(fwd, "__qualname__", None)) == _SEPARATION_FORWARD


def head_affine(model: nn.Module):
    """``(W_o (C, D), b_o (C,))`` in float64 when the read-out is affine in the flattened state:
    ``LinearHead``, ``nn.Linear``, or LyaDEQ's separation head ``classifier(Q flatten(z))``
    (``SeparationHead`` with ``features`` a Flatten/Identity, ``separation`` a bias-free Linear,
    ``classifier`` a Linear). Each of them must compute its class's map (no subclass overriding
    ``forward``: :func:`robustdeq.deq.cells.changed_part`). None otherwise."""
    from ..deq.cells import LinearHead, changed_part
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and any(changed_part(m) is not None for m in head.modules()):
        return None
    lin = None
    if isinstance(head, LinearHead):
        lin = head.linear
    elif isinstance(head, nn.Linear):
        lin = head
    if lin is not None:
        W = lin.weight.detach().to(torch.float64)
        b = lin.bias.detach().to(torch.float64) if lin.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
        return W, b
    feats, sep, cls = (getattr(head, k, None) for k in ("features", "separation", "classifier"))
    if _separation_forward(head) and isinstance(feats, (nn.Flatten, nn.Identity)) and isinstance(sep, nn.Linear) \
            and sep.bias is None and isinstance(cls, nn.Linear):
        W = cls.weight.detach().to(torch.float64) @ sep.weight.detach().to(torch.float64)
        b = cls.bias.detach().to(torch.float64) if cls.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
        return W, b
    return None


def _head_matrix(model: nn.Module) -> Optional[Tensor]:
    """``W_o`` (C, D) of an affine read-out (see :func:`head_affine`), else None."""
    ab = head_affine(model)
    return None if ab is None else ab[0]


def pair_norms(Wo: Tensor) -> Tensor:
    """(C, C) ``||w_i - w_j||_2`` for rows of ``Wo``."""
    return torch.cdist(Wo, Wo) * (1.0 + linalg.REL_SLACK)


def lipschitz_bound(model: nn.Module, contraction: Optional[ContractionCertificate] = None, *,
                    spectral: str = "auto") -> LipschitzBound:
    """Sound Lipschitz bounds of ``x -> z*`` and ``x -> logits`` of a DEQ (see module)."""
    require_deq(model, "lipschitz_bound")
    from ..deq.cells import changed_part
    # the cell is judged by the contraction certificate (a changed cell may declare lipschitz_z())
    changed = changed_deq_part(model, cell=False)
    if changed is not None:
        return LipschitzBound(False, "none", f"no Lipschitz bound: the bounds of the parts' classes would "
                              f"not cover this model: {changed}")
    with eval_mode(model), torch.no_grad():
        if hasattr(model, "prepare"):
            model.prepare()
        cert = contraction if contraction is not None else contraction_certificate(model, spectral=spectral)
        Up = _injection_matrix(model)
        Wo = _head_matrix(model)
        if Up is None and _per_channel_unknown(model):
            return LipschitzBound(False, "none", "no Lipschitz bound for the injection: its Normalize has "
                                  "per-channel statistics and the model's input_shape (C, H, W) does not "
                                  "say how they apply to the inputs")
        if Up is None:
            return LipschitzBound(False, "none", f"no Lipschitz bound for the injection "
                                  f"{type(getattr(model, 'injection', None)).__name__} (needs an MLPInjection, or Linear / Conv / Flatten layers with a "
                                  f"known input_shape of at most {AFFINE_MAX_INPUTS} features)")
        if Wo is None:
            return LipschitzBound(False, "none", f"no Lipschitz bound for the head "
                                  f"{type(getattr(model, 'head', None)).__name__} (needs a linear read-out)")
        cell = model.cell
        lip_inj = linalg.spectral_norm_bound(Up, spectral)
        head_norm = linalg.spectral_norm_bound(Wo, spectral)
        details = {"lip_injection": lip_inj.to_dict(), "head_norm": head_norm.to_dict(),
                   "contraction": {"certified": cert.certified, "lip_z": cert.lip_z, "reason": cert.reason}}
        if isinstance(cell, LinearCell) and changed_part(cell) is None:
            A = cell.weight_matrix().detach().to(torch.float64)
            eye = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
            rho = linalg.spectral_radius(A)
            if not rho < 1.0:
                return LipschitzBound(False, "linear (exact)", f"rho(A) = {rho:.6g} >= 1: fixed-point "
                                      "iteration does not converge; no certificate", details=details)
            K = torch.linalg.inv(eye - A)            # z* = K u
            KU = K @ Up                              # x -> z* (linear part)
            diff = Wo[:, None, :] - Wo[None, :, :]   # (C, C, D): w_i - w_j
            pair = (diff @ KU).norm(dim=-1) * (1.0 + linalg.REL_SLACK)
            pair_err = (diff @ K).norm(dim=-1) * (1.0 + linalg.REL_SLACK)
            lip_z = float(torch.linalg.matrix_norm(KU, ord=2))
            lip_y = float(torch.linalg.matrix_norm(Wo @ KU, ord=2))
            details["spectral_radius"] = rho
            details["err_factor"] = float(torch.linalg.matrix_norm(K, ord=2)) * (1 + linalg.REL_SLACK)
            return LipschitzBound(True, "linear (exact)", "x -> logits is affine: exact constants",
                                  lip_x_z=lip_z * (1 + linalg.REL_SLACK), lip_logits=lip_y * (1 + linalg.REL_SLACK),
                                  exact=True, pair=pair, pair_err=pair_err, details=details)
        if not cert.certified:
            return LipschitzBound(False, "none", f"no global certificate for the cell: {cert.reason}",
                                  details=details)
        L = float(cert.lip_z)
        if cert.lip_u is None:
            return LipschitzBound(False, "none", "the cell declares no Lipschitz constant in u",
                                  details=details)
        lip_u_z = float(cert.lip_u) / (1.0 - L)
        method = "contraction"
        if cert.monotone_m is not None and cert.monotone_m > 0:
            pab = 1.0 / cert.monotone_m
            details["monotone"] = {"pabbaraju": pab, "splitting": lip_u_z}
            if pab < lip_u_z:
                lip_u_z, method = pab, "monotone (Pabbaraju et al. 2021: ||U|| / m)"
            else:
                method = "monotone (splitting contraction)"
        lip_z = lip_u_z * lip_inj.upper * (1.0 + linalg.REL_SLACK)
        pn = pair_norms(Wo)
        err = 1.0 / (1.0 - L)
        details["err_factor"] = err
        return LipschitzBound(True, method, f"Lip_x(z*) <= {lip_z:.6g}", lip_x_z=lip_z,
                              lip_logits=head_norm.upper * lip_z * (1.0 + linalg.REL_SLACK),
                              exact=False, pair=pn * lip_z, pair_err=pn * err, details=details)


def logit_lipschitz(model: nn.Module):
    """The bounds of :func:`lipschitz_bound` as differentiable tensors of the model's weights (in
    their dtype): ``(lip_logits, pair)``, ``lip_logits`` (scalar) bounding the L2 Lipschitz
    constant of ``x -> logits`` and ``pair`` (C, C) that of each ``logit_i - logit_j`` (diagonal
    0), for Lipschitz-margin training (Tsuzuku, Sato, Sugiyama 2018). Same formulas as
    :func:`lipschitz_bound` (exact norms by SVD / eigenvalues, no rounding slack): linear cell
    ``W_o (I - A)^{-1} U'`` exactly; ``MLPCell`` ``||W_o|| ||U'|| / (1 - ||W||_2)``; monotone cell
    ``||W_o|| ||U'|| min(1/m, a / (1 - ||(1-a) I + a W||_2))`` with ``m = lambda_min`` of the
    symmetric part of ``I - W``. A cell with no such bound (``||W||_2 >= 1``, ``m <= 0``) is a
    ConfigError naming it."""
    from ..deq.cells import LinearHead, MLPCell, MLPInjection, MonotoneCell
    require_deq(model, "Lipschitz-margin training")
    changed = changed_deq_part(model)
    if changed is not None:
        raise ConfigError(f"Lipschitz-margin training: the bounds of the parts' classes would not cover "
                          f"this model: {changed}")
    inj, head, cell = getattr(model, "injection", None), getattr(model, "head", None), model.cell
    if not isinstance(inj, MLPInjection) or not isinstance(head, LinearHead):
        raise ConfigError("Lipschitz-margin training needs an MLPInjection (Normalize + Linear) and a "
                          f"LinearHead, got {type(inj).__name__} and {type(head).__name__}")
    U = inj.linear.weight
    scale = input_feature_scale(inj, getattr(model, "input_shape", None), U.shape[1])
    if scale is None:
        raise ConfigError("Lipschitz-margin training needs the injection's Normalize applied per input "
                          "feature in a known way: per-channel statistics need the model's input_shape (C, H, W)")
    Up = U * scale.to(device=U.device, dtype=U.dtype)[None, :]
    Wo = head.linear.weight
    C = Wo.shape[0]
    diff = Wo[:, None, :] - Wo[None, :, :]
    off = ~torch.eye(C, dtype=torch.bool, device=Wo.device)

    def norm2(t: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(t, ord=2)

    def pair_norms(rows: Tensor) -> Tensor:   # (C, C, k) -> (C, C) norms, 0 on the diagonal
        sq = rows.pow(2).sum(-1)
        return torch.where(off, sq.clamp_min(1e-30).sqrt(), torch.zeros_like(sq))
    if isinstance(cell, LinearCell):
        A = cell.weight_matrix()
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        KU = torch.linalg.solve(eye - A, Up)
        return norm2(Wo @ KU), pair_norms(diff @ KU)
    if isinstance(cell, MLPCell):
        L = norm2(cell.weight_matrix())
        if not float(L.detach()) < 1:
            raise ConfigError(f"Lipschitz-margin training: the MLP cell has ||W||_2 = {float(L.detach()):.4g} >= 1, "
                              "so it has no certified Lipschitz bound; use norm='spectral' with scale < 1")
        lip_u_z = 1.0 / (1.0 - L)
    elif isinstance(cell, MonotoneCell):
        W = cell.W()
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        S = eye - W
        m = torch.linalg.eigvalsh(0.5 * (S + S.t()))[0]
        if not float(m.detach()) > 0:
            raise ConfigError(f"Lipschitz-margin training: the monotone cell's I - W is not strongly "
                              f"monotone (m = {float(m):.4g})")
        a = float(cell.alpha)
        lip_u_z = 1.0 / m
        Ls = norm2((1 - a) * eye + a * W)
        if float(Ls.detach()) < 1:
            lip_u_z = torch.minimum(lip_u_z, a / (1.0 - Ls))
    else:
        raise ConfigError(f"Lipschitz-margin training through {type(cell).__name__} is not supported "
                          "(supported: MLPCell, MonotoneCell, LinearCell)")
    lip_z = lip_u_z * norm2(Up)
    return norm2(Wo) * lip_z, pair_norms(diff) * lip_z


@dataclass
class RadiusResult:
    """Per-sample certified L2 radii (B,) and their ingredients."""

    radius: Tensor          # per-pair certified radius (0 when not certified)
    radius_global: Tensor   # M_lower / (sqrt(2) L_logits)
    margin: Tensor          # logit margin at the solver's z (label - best other)
    margin_lower: Tensor    # margin lower bound at the exact z* (after the solver-error correction)
    runner_up: Tensor       # class j attaining the minimum radius


def certified_radius(bound: LipschitzBound, logits: Tensor, y: Tensor, residual: Tensor) -> RadiusResult:
    """Certified L2 radii from logits at the solver's state, labels and absolute residuals.

    Args:
        bound: an available :class:`LipschitzBound`.
        logits: (B, C) logits ``readout(z)``; y: (B,) labels (use predictions when unknown);
        residual: (B,) ``||f(z) - z||_2`` of the state the logits were read from.
    """
    if not bound.available:
        raise ConfigError(f"no Lipschitz bound available: {bound.reason}")
    lg = logits.detach().to(torch.float64)
    B, C = lg.shape
    dev = lg.device
    pair = bound.pair.to(dev)
    pair_err = bound.pair_err.to(dev)
    y = y.to(dev).long()
    r = residual.detach().to(torch.float64).to(dev)
    g = lg.gather(1, y[:, None]) - lg                       # (B, C): logit_y - logit_j
    gl = g - pair_err[y] * r[:, None]                        # lower bound at the exact z*
    P = pair[y]                                              # (B, C)
    others = torch.ones(B, C, dtype=torch.bool, device=dev)
    others[torch.arange(B, device=dev), y] = False
    with torch.no_grad():
        rad = torch.where(P > 0, gl.clamp_min(0) / P.clamp_min(1e-300), torch.where(gl > 0, torch.full_like(gl, math.inf), torch.zeros_like(gl)))
        rad = torch.where(others, rad, torch.full_like(rad, math.inf))
        radius, j = rad.min(dim=1)
        big = torch.full_like(g, math.inf)
        margin = torch.where(others, g, big).min(dim=1).values
        margin_lower = torch.where(others, gl, big).min(dim=1).values
        Lg = bound.lip_logits
        radius_global = (margin_lower.clamp_min(0) / (math.sqrt(2.0) * Lg)) if Lg and Lg > 0 else \
            torch.where(margin_lower > 0, torch.full_like(margin_lower, math.inf), torch.zeros_like(margin_lower))
        radius = torch.where(margin_lower > 0, radius, torch.zeros_like(radius))
    return RadiusResult(radius=radius, radius_global=radius_global, margin=margin,
                        margin_lower=margin_lower, runner_up=j)


__all__ = ["LipschitzBound", "lipschitz_bound", "logit_lipschitz", "RadiusResult", "certified_radius",
           "head_affine", "pair_norms"]
