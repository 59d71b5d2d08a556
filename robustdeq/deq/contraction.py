"""Global certificates of existence, uniqueness and convergence (a cell's Lipschitz constant in z).

If ``Lip_z(f) <= L < 1`` in the L2 norm (Banach): for every input the fixed point ``z*`` exists
and is unique, fixed-point iteration converges from any start at rate ``L``, and any iterate ``z``
a solver returns satisfies the a-posteriori bound ``||z - z*|| <= ||f(z) - z|| / (1 - L)``.

The certificate lives beside the cells because the backbone itself relies on it (warm starts
are safe on a contractive cell, :mod:`robustdeq.deq.memory`); :mod:`robustdeq.certify` reports it.

Per cell (``robustdeq/deq/cells.py``):

- ``MLPCell`` ``act(W z + u)``, act in {tanh, relu} (1-Lipschitz): ``Lip_z = ||W||_2`` (upper bound
  by SVD, or Gram squaring for large W; see :mod:`.linalg`), ``Lip_u = 1``. As a constant over
  all (z, u) this is exact: at a point where ``W z + u = 0`` (tanh) or ``> 0`` (relu) the
  Jacobian is ``W``.
- ``LinearCell`` ``A z + u``: ``Lip_z = ||A||_2`` exactly; in addition, fixed-point
  iteration converges from any start iff ``rho(A) < 1`` (reported in ``details``).
- ``MonotoneCell``: checks ``I - W >= m I`` through ``lambda_min`` of the symmetric part (a lower
  bound ``m_hat``; monDEQ existence/uniqueness needs ``m_hat > 0``) and certifies the cell's
  forward-backward map ``relu((1-a) z + a (W z + u))`` with the exact rate
  ``||(1-a) I + a W||_2`` (at most the cell's own ``contraction_rate()``), ``Lip_u = a``.
- ``ConvCell``: GroupNorm divides by a data-dependent standard deviation, whose Lipschitz constant
  is unbounded as the variance of a group goes to 0: no global bound; local stability still applies.
- any other cell: certified only if it declares ``lipschitz_z()`` (and optionally
  ``lipschitz_u()``) returning sound upper bounds (its author's responsibility).

A cell is taken as one of the classes above only when it computes that class's map: a subclass
overriding ``forward`` or a method the bound reads (:data:`~robustdeq.deq.cells.CERTIFIED_PARTS`,
e.g. ``MLPCell._pre`` or ``weight_matrix``) is an unknown cell (certified only by a declared
``lipschitz_z()``), and a ``DEQClassifier`` subclass whose ``f`` is not its cell's gets no
certificate: the class's bound would be of another map.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..guard import preserve_model
from . import linalg
from .cells import ConvCell, LinearCell, MLPCell, MonotoneCell, changed_part


@dataclass
class ContractionCertificate:
    """Outcome of :func:`contraction_certificate`.

    ``certified``: the cell is a contraction in z (L2) with rate ``lip_z < 1``, so existence,
    uniqueness and the convergence statements in ``solvers`` hold for every input.
    ``lip_z``/``lip_u``: sound upper bounds on the cell's Lipschitz constants in z and u (None when
    none is known). ``exact``: ``lip_z`` is the exact constant (up to float64 rounding).
    """

    certified: bool
    cell: str
    lip_z: Optional[float]
    lip_u: Optional[float]
    exact: bool
    method: str
    reason: str
    monotone_m: Optional[float] = None
    solvers: Dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def rate(self) -> Optional[float]:
        """The certified contraction rate ``lip_z``, or None when not certified."""
        return self.lip_z if self.certified else None

    def error_factor(self) -> Optional[float]:
        """``c`` with ``||z - z*|| <= c ||f(z) - z||`` for any z (None if not certified)."""
        return 1.0 / (1.0 - self.lip_z) if self.certified else None

    def iterations_for(self, tol: float, initial_residual: float) -> Optional[int]:
        """Fixed-point iterations after which ``||z_k - z*|| <= tol`` is guaranteed, given
        ``||f(z_0) - z_0||`` (``||z_k - z*|| <= L^k r_0 / (1 - L)``)."""
        if not self.certified:
            return None
        if initial_residual <= 0:
            return 0
        L = self.lip_z
        if L == 0:
            return 1
        need = math.log(tol * (1 - L) / initial_residual) / math.log(L)
        return max(0, math.ceil(need))

    def to_dict(self) -> dict:
        """The certificate as a JSON-ready dict (every field)."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ContractionCertificate":
        """The certificate of a dict written by :meth:`to_dict`."""
        return ContractionCertificate(**d)


def solver_guarantees(L: float, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """What a contraction of rate ``L`` guarantees for each solver of ``robustdeq.deq.solvers``."""
    out = {
        "fixed_point": (f"converges from any z0 for every damping tau in (0, 1]: "
                        f"||z_k - z*|| <= (1 - tau (1 - L))^k ||z_0 - z*||, L = {L:.6g}"),
        "anderson": ("no global guarantee (Anderson acceleration of a contraction converges "
                     "locally, Toth & Kelley 2015); whatever it returns obeys "
                     f"||z - z*|| <= ||f(z) - z|| / (1 - L) = {1 / (1 - L):.6g} ||f(z) - z||"),
        "broyden": ("no global guarantee; the a-posteriori bound "
                    f"||z - z*|| <= {1 / (1 - L):.6g} ||f(z) - z|| holds for its output"),
    }
    if extra:
        out.update(extra)
    return out


def _not_certified(cell: nn.Module, reason: str, **kw) -> ContractionCertificate:
    return ContractionCertificate(certified=False, cell=type(cell).__name__,
                                  lip_z=kw.pop("lip_z", None), lip_u=kw.pop("lip_u", None),
                                  exact=kw.pop("exact", False), method=kw.pop("method", "none"),
                                  reason=reason, **kw)


def contraction_certificate(model_or_cell: nn.Module, *, spectral: str = "auto"
                            ) -> ContractionCertificate:
    """Global contraction certificate of a cell (or of ``model.cell``).

    Args:
        model_or_cell: a DEQ model with ``.cell`` or a cell.
        spectral: spectral-norm method of :func:`linalg.spectral_norm_bound`
            (``"auto"``, ``"svd"``, ``"gram"``).
    """
    if spectral not in ("auto", "svd", "gram"):
        raise ConfigError(f"unknown spectral-norm method {spectral!r}; expected 'auto', 'svd' or 'gram'")
    cell = getattr(model_or_cell, "cell", model_or_cell)
    if model_or_cell is not cell:
        from .model import changed_composition
        why = changed_composition(model_or_cell, ("f",))
        if why is not None:
            return _not_certified(cell, f"the model's map is not its cell's: {why}")
    # eval mode: a spectrally normalised weight is then the fixed weight inference uses (in
    # train mode every access runs a power iteration); flags come back as they were
    with preserve_model(cell, "eval", values=False, who="a certificate"), torch.no_grad():
        cert = _certify_cell(cell, spectral)
    cfg = getattr(model_or_cell, "solver_config", None)
    if cfg is not None:
        cert.details["model_solver"] = _model_solver_claim(cert, cfg)
    return cert


def _model_solver_claim(cert: ContractionCertificate, cfg) -> str:
    """What the certificate guarantees for the solver the model is configured with."""
    name = getattr(cfg.name, "value", str(cfg.name))
    if not cert.certified:
        return f"{name}: no guarantee (no contraction certificate)"
    L = cert.lip_z
    if name == "fixed_point":
        q = 1.0 - cfg.damping * (1.0 - L)
        return (f"fixed_point (damping {cfg.damping:g}): guaranteed to converge from any start at rate "
                f"{q:.6g} per iteration; max_iter {cfg.max_iter} shrinks the initial error by {q ** cfg.max_iter:.3g}")
    return (f"{name}: convergence not guaranteed globally; whatever it returns satisfies "
            f"||z - z*|| <= {1.0 / (1.0 - L):.6g} ||f(z) - z|| (switch to fixed_point for a guarantee)")


def _certify_cell(cell: nn.Module, spectral: str) -> ContractionCertificate:
    name = type(cell).__name__
    changed = changed_part(cell)   # a subclass computing another map: not the class's bound
    if changed is None:
        known = _certify_known_cell(cell, name, spectral)
        if known is not None:
            return known
    if callable(getattr(cell, "lipschitz_z", None)):
        L = float(cell.lipschitz_z())
        Lu = float(cell.lipschitz_u()) if callable(getattr(cell, "lipschitz_u", None)) else None
        if L < 1.0:
            return ContractionCertificate(True, name, L, Lu, False, "declared by the cell",
                                          f"{name}.lipschitz_z() = {L:.6g} < 1",
                                          solvers=solver_guarantees(L))
        return _not_certified(cell, f"{name}.lipschitz_z() = {L:.6g} >= 1", lip_z=L, lip_u=Lu,
                              method="declared by the cell")
    if changed is not None:
        return _not_certified(cell, f"{changed} (a cell that declares lipschitz_z() is certified by it)")
    return _not_certified(cell, f"no global Lipschitz bound is known for {name} "
                                "(local stability at z* still applies)")


def _certify_known_cell(cell: nn.Module, name: str, spectral: str) -> Optional[ContractionCertificate]:
    """The certificate of a cell of a known class computing that class's map, or None for
    another cell."""
    if isinstance(cell, LinearCell):
        A = cell.weight_matrix().detach().to(torch.float64)
        nb = linalg.spectral_norm_bound(A, spectral)
        rho = linalg.spectral_radius(A)
        details = {"spectral_norm": nb.to_dict(), "spectral_radius": rho,
                   "well_posed_linear": rho < 1.0,
                   "note": ("linear cell: z* = (I - A)^-1 u is unique and fixed-point iteration "
                            "converges from any start iff rho(A) < 1, even when ||A||_2 >= 1")}
        if nb.upper < 1.0:
            return ContractionCertificate(True, name, nb.upper, 1.0, nb.exact, f"linear ({nb.method})",
                                          f"||A||_2 <= {nb.upper:.6g} < 1", solvers=solver_guarantees(nb.upper),
                                          details=details)
        return _not_certified(cell, f"||A||_2 = {nb.lower:.6g} >= 1: not a contraction in L2"
                              + (f" (but rho(A) = {rho:.6g} < 1: iteration converges)" if rho < 1 else ""),
                              lip_z=nb.upper, lip_u=1.0, exact=nb.exact, method=f"linear ({nb.method})",
                              details=details)
    if isinstance(cell, MonotoneCell):
        W = cell.W().detach().to(torch.float64)
        eye = torch.eye(W.shape[0], dtype=torch.float64, device=W.device)
        m_hat = linalg.min_sym_eig_lower(eye - W)
        a = float(cell.alpha)
        M = (1.0 - a) * eye + a * W
        nb = linalg.spectral_norm_bound(M, spectral)
        op = linalg.spectral_norm_bound(eye - W, spectral)
        details = {"alpha": a, "m_declared": cell.m, "m_hat": m_hat,
                   "operator_norm_I_minus_W": op.to_dict(), "splitting_norm": nb.to_dict(),
                   "cell_contraction_rate": float(cell.contraction_rate())}
        extra = {}
        if m_hat > 0:
            extra["forward_backward"] = (
                f"I - W >= {m_hat:.6g} I: the monDEQ fixed point exists and is unique for every input, "
                f"and forward-backward splitting converges for every step size alpha in "
                f"(0, 2 m / ||I - W||^2) = (0, {2 * m_hat / op.upper ** 2:.6g}) (this cell: {a:.6g})")
        if nb.upper < 1.0:
            return ContractionCertificate(
                True, name, nb.upper, a, nb.exact, f"monotone splitting ({nb.method})",
                f"forward-backward map rate ||(1-a) I + a W||_2 <= {nb.upper:.6g} < 1"
                + (f"; I - W >= {m_hat:.6g} I" if m_hat > 0 else ""),
                monotone_m=m_hat if m_hat > 0 else None,
                solvers=solver_guarantees(nb.upper, extra), details=details)
        return _not_certified(cell, f"splitting map rate {nb.lower:.6g} >= 1"
                              + ("" if m_hat > 0 else f"; I - W is not strongly monotone (m_hat = {m_hat:.3g})"),
                              lip_z=nb.upper, lip_u=a, exact=nb.exact, method="monotone splitting",
                              monotone_m=m_hat if m_hat > 0 else None, details=details)
    if isinstance(cell, MLPCell):
        if cell.act not in ("tanh", "relu"):
            return _not_certified(cell, f"activation {cell.act!r} has no known Lipschitz constant")
        W = cell.weight_matrix().detach().to(torch.float64)
        nb = linalg.spectral_norm_bound(W, spectral)
        details = {"spectral_norm": nb.to_dict(), "activation": cell.act, "activation_lipschitz": 1.0,
                   "norm": getattr(cell.W, "norm", None), "scale": getattr(cell.W, "scale", None)}
        if nb.upper < 1.0:
            return ContractionCertificate(True, name, nb.upper, 1.0, nb.exact, f"spectral norm ({nb.method})",
                                          f"Lip_z <= ||W||_2 <= {nb.upper:.6g} < 1",
                                          solvers=solver_guarantees(nb.upper), details=details)
        return _not_certified(cell, f"||W||_2 = {nb.lower:.6g} >= 1: no contraction certificate "
                              "(the fixed point may be non-unique and iteration may not converge)",
                              lip_z=nb.upper, lip_u=1.0, exact=nb.exact, method=f"spectral norm ({nb.method})",
                              details=details)
    if isinstance(cell, ConvCell):
        return _not_certified(
            cell, "not certifiable globally: GroupNorm divides by a data-dependent standard deviation "
                  "whose Lipschitz constant is unbounded as a group's variance goes to 0 "
                  "(local stability at z* still applies)")
    return None


__all__ = ["ContractionCertificate", "contraction_certificate", "solver_guarantees"]
