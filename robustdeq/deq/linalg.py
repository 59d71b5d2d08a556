"""Sound matrix bounds used by the certificates (all computed in float64).

Power iteration alone gives a *lower* bound on a spectral norm (``||W v|| / ||v|| <= ||W||_2``).
Upper bounds here come from

- ``"svd"``: the exact largest singular value (LAPACK, float64), padded by a relative slack that
  covers the backward error of the SVD (``|s_hat - s| <= p(n) eps ||W||``, ``eps ~ 1.1e-16``);
- ``"gram"``: repeated squaring of the Gram matrix ``G = W^T W``:
  ``sigma_max^(2 * 2^j) = lambda_max(G)^(2^j) <= ||G^(2^j)||_F``, a rigorous bound whose
  over-estimate factor is at most ``rank^(1 / 2^(j+1))`` (1.008 for 64 dims and j = 8); this is the
  "sound correction" of a power method when the matrix is too large for an SVD;
- the elementary bounds ``||W||_F`` and ``sqrt(||W||_1 ||W||_inf)`` (always taken into the minimum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError

#: relative padding of float64 results (covers LAPACK backward error for matrices up to ~1e5 dims)
REL_SLACK = 1e-9
#: matrices with at most this many rows/columns get an exact SVD under ``method="auto"``
SVD_MAX = 4096


@dataclass(frozen=True)
class NormBound:
    """Bounds on ``||W||_2``: ``lower <= ||W||_2 <= upper``; ``exact``: computed by SVD."""

    upper: float
    lower: float
    method: str
    exact: bool

    def to_dict(self) -> dict:
        """The bound as a JSON-ready dict (``upper``, ``lower``, ``method``, ``exact``)."""
        return {"upper": self.upper, "lower": self.lower, "method": self.method, "exact": self.exact}


def _as64(W: Tensor) -> Tensor:
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise ConfigError(f"expected a 2-D weight matrix, got {type(W).__name__} "
                          f"{tuple(W.shape) if isinstance(W, Tensor) else ''}")
    W = W.detach().to(torch.float64)
    if not bool(torch.isfinite(W).all()):
        raise ConfigError("weight matrix has non-finite entries: no bound can be certified")
    return W


def _pad(x: float) -> float:
    return x * (1.0 + REL_SLACK) + 1e-300


def elementary_bound(W: Tensor) -> float:
    """``min(||W||_F, sqrt(||W||_1 ||W||_inf))`` (each an upper bound on ``||W||_2``)."""
    W = _as64(W)
    fro = float(torch.linalg.matrix_norm(W, ord="fro"))
    one = float(W.abs().sum(0).max()) if W.numel() else 0.0
    inf = float(W.abs().sum(1).max()) if W.numel() else 0.0
    return _pad(min(fro, math.sqrt(one * inf)))


def power_lower(W: Tensor, iters: int = 100, seed: int = 0) -> float:
    """Power iteration on ``W^T W``: returns ``||W v|| / ||v||`` (a lower bound on ``||W||_2``)."""
    W = _as64(W)
    if W.numel() == 0:
        return 0.0
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(W.shape[1], generator=g, dtype=torch.float64).to(W.device)
    v = v / v.norm()
    best = 0.0
    for _ in range(iters):
        w = W @ v
        best = max(best, float(w.norm()))
        v = W.t() @ w
        n = v.norm()
        if float(n) == 0.0:
            break
        v = v / n
    return best * (1.0 - REL_SLACK)


def gram_upper(W: Tensor, squarings: int = 8) -> float:
    """Rigorous upper bound on ``||W||_2`` by repeated squaring of the Gram matrix (see module)."""
    W = _as64(W)
    if W.numel() == 0:
        return 0.0
    G = W.t() @ W if W.shape[1] <= W.shape[0] else W @ W.t()
    G = 0.5 * (G + G.t())
    log_c = 0.0  # G^(2^i) = c_i * M_i
    M = G
    for _ in range(squarings):
        s = float(M.abs().max())
        if s == 0.0:
            return 0.0
        M = M / s
        log_c = 2.0 * (log_c + math.log(s))
        M = M @ M
        M = 0.5 * (M + M.t())
    fro = float(torch.linalg.matrix_norm(M, ord="fro"))
    if fro == 0.0:
        return 0.0
    log_lambda = (log_c + math.log(fro)) / (2 ** squarings)
    return _pad(math.exp(0.5 * log_lambda))


def spectral_norm_bound(W: Tensor, method: str = "auto", *, squarings: int = 8,
                        power_iters: int = 100) -> NormBound:
    """Sound bounds ``lower <= ||W||_2 <= upper``.

    Args:
        W: (m, n) matrix (any float dtype; converted to float64).
        method: ``"auto"`` (SVD up to :data:`SVD_MAX` rows/cols, else ``"gram"``), ``"svd"`` or
            ``"gram"`` (power-iteration lower bound + Gram-squaring upper bound).
        squarings: Gram squarings of the ``"gram"`` upper bound (:func:`gram_upper`).
        power_iters: power iterations of the ``"gram"`` lower bound (:func:`power_lower`).
    """
    if method not in ("auto", "svd", "gram"):
        raise ConfigError(f"unknown spectral-norm method {method!r}; expected 'auto', 'svd' or 'gram'")
    W = _as64(W)
    if method == "auto":
        method = "svd" if max(W.shape) <= SVD_MAX else "gram"
    if W.numel() == 0:
        return NormBound(0.0, 0.0, method, True)
    if method == "svd":
        s = float(torch.linalg.matrix_norm(W, ord=2))
        return NormBound(min(_pad(s), elementary_bound(W)), s * (1.0 - REL_SLACK), "svd", True)
    up = min(gram_upper(W, squarings), elementary_bound(W))
    return NormBound(up, min(power_lower(W, power_iters), up), "gram", False)


def min_sym_eig_lower(S: Tensor) -> float:
    """A lower bound on ``lambda_min((S + S^T) / 2)`` (eigvalsh in float64 minus slack)."""
    S = _as64(S)
    H = 0.5 * (S + S.t())
    lam = float(torch.linalg.eigvalsh(H)[0])
    scale = float(torch.linalg.matrix_norm(H, ord="fro"))
    return lam - REL_SLACK * scale - 1e-300


def spectral_radius(A: Tensor) -> float:
    """``max |eig(A)|`` from LAPACK (float64). Eigenvalues of non-normal matrices are sensitive:
    this is an accurate estimate, not a rigorous bound (``rho(A) <= ||A||_2`` is the bound)."""
    A = _as64(A)
    if A.shape[0] != A.shape[1]:
        raise ConfigError(f"spectral radius needs a square matrix, got {tuple(A.shape)}")
    return float(torch.linalg.eigvals(A).abs().max()) if A.numel() else 0.0


__all__ = ["NormBound", "spectral_norm_bound", "gram_upper", "power_lower", "elementary_bound",
           "min_sym_eig_lower", "spectral_radius", "REL_SLACK"]
