"""Local stability at the fixed point: spectrum of ``J = df/dz`` at ``z*``, per sample.

- ``rho(J) < 1``: ``z*`` is a locally asymptotically stable fixed point of the iteration
  ``z <- f(z)`` and ``I - J`` is invertible (the implicit-function-theorem gradient is defined).
- ``||J||_2 < 1``: the iteration is locally contractive in L2 around ``z*``.

Two ways to compute them (``method``):

- ``"dense"``: the per-sample Jacobian is built with ``D`` vector-Jacobian products; ``||J||_2`` by
  SVD and ``rho(J)`` by the eigenvalues (exact up to float64 rounding). Used by ``"auto"`` when the
  state has at most ``dense_max`` entries.
- ``"power"``: matrix-free. ``||J||_2`` by power iteration on ``J^T J`` (JVP then VJP), which
  converges to it from below: a **lower bound/estimate**, not an upper bound. ``rho(J)`` by the
  growth rate of ``||J^k v||`` averaged over the last quarter of the iterations (Gelfand's
  formula; also right for complex dominant eigenvalues): an **estimate**, not a bound.

Both are evaluated at the state the solver returned; the residual is reported alongside, and a
sample whose solve did not reach ``tol`` is never called stable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError

Fn = Callable[[Tensor], Tensor]


@dataclass
class LocalStability:
    """Per-sample results (tensors of shape (B,))."""

    sigma: Tensor        # ||J||_2 at z* (exact when ``exact``, else a power-iteration lower estimate)
    rho: Tensor          # spectral radius of J at z* (exact eigenvalues or growth-rate estimate)
    residual: Tensor     # ||f(z) - z||_2 of the state the Jacobian was taken at
    stable: Tensor       # rho < 1 and the solve reached tol
    contractive: Tensor  # sigma < 1 and the solve reached tol
    exact: bool
    method: str
    iters: int

    def describe(self) -> str:
        """One sentence on how ``sigma`` and ``rho`` were computed and whether they are exact
        values or estimates."""
        if self.exact:
            return "dense Jacobian: ||J||_2 by SVD and rho(J) by eigenvalues (float64)"
        return ("power iteration with JVP/VJP: ||J||_2 is an estimate from below (not an upper "
                "bound); rho(J) is a growth-rate estimate (not a bound)")


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def _normalize(v: Tensor) -> Tensor:
    n = _per_sample_norm(v).clamp_min(1e-300)
    return v / n.view(-1, *([1] * (v.dim() - 1)))


class _Linearization:
    """``J v`` and ``J^T w`` of a batched map at ``z`` from one recorded forward pass (reverse mode
    only: ``J^T w`` by a backward pass, ``J v`` by the double-backward trick
    ``J v = d/dw <J^T w, v>``). Faster than forward-mode AD for cells with GroupNorm."""

    def __init__(self, f: Fn, z: Tensor):
        with torch.enable_grad():
            self.z = z.detach().clone().requires_grad_(True)
            self.fz = f(self.z)
            self.w0 = torch.zeros_like(self.fz, requires_grad=True)
            g = torch.autograd.grad(self.fz, self.z, self.w0, create_graph=True, allow_unused=True)[0]
            self.g = g if g is not None else torch.zeros_like(self.z)

    def vjp(self, w: Tensor) -> Tensor:
        out = torch.autograd.grad(self.fz, self.z, w, retain_graph=True, allow_unused=True)[0]
        return out if out is not None else torch.zeros_like(self.z)

    def jvp(self, v: Tensor) -> Tensor:
        if not self.g.requires_grad:  # J^T w does not depend on w: J = 0
            return torch.zeros_like(self.fz)
        out = torch.autograd.grad(self.g, self.w0, v, retain_graph=True, allow_unused=True)[0]
        return out if out is not None else torch.zeros_like(self.fz)


def dense_jacobian(f: Fn, z: Tensor) -> Tensor:
    """Per-sample Jacobians (B, D, D) of a batched map whose samples do not interact (one
    vector-Jacobian product per state dimension: row k of every J_b at once)."""
    B = z.shape[0]
    D = z[0].numel()
    lin = _Linearization(f, z)
    rows = []
    for k in range(D):
        e = torch.zeros(B, D, dtype=lin.fz.dtype, device=z.device)
        e[:, k] = 1
        rows.append(lin.vjp(e.view_as(lin.fz)).reshape(B, D))
    return torch.stack(rows, dim=1)  # (B, D_out, D_in)


def jacobian_spectrum(f: Fn, z: Tensor, *, method: str = "auto", iters: int = 100, tol: float = 1e-7,
                      dense_max: int = 256, seed: int = 0) -> Tuple[Tensor, Tensor, bool, int]:
    """``(sigma, rho, exact, iters_used)`` of ``J = df/dz`` at ``z`` for each sample.

    Args:
        f: batched map ``(B, ...) -> (B, ...)`` (samples independent, as every cell here).
        z: (B, ...) the point (a fixed point).
        method: ``"auto"``, ``"dense"`` or ``"power"`` (see module).
        iters: power iterations (each of the two estimates; ``"power"`` only).
        tol: relative change of the ``||J||_2`` estimate below which its power iteration stops
            (after at least 7 iterations).
        dense_max: ``"auto"`` takes ``"dense"`` when a sample's state has at most this many entries.
        seed: seed of the power iteration's random start vector.
    """
    if method not in ("auto", "dense", "power"):
        raise ConfigError(f"unknown local-stability method {method!r}; expected 'auto', 'dense' or 'power'")
    if iters < 1:
        raise ConfigError(f"iters must be >= 1, got {iters}")
    z = z.detach()
    D = z[0].numel()
    if method == "auto":
        method = "dense" if D <= dense_max else "power"
    if method == "dense":
        J = dense_jacobian(f, z).detach()
        sigma = torch.linalg.matrix_norm(J, ord=2)
        rho = torch.linalg.eigvals(J).abs().amax(dim=-1)
        return sigma, rho, True, 0
    lin = _Linearization(f, z)
    g = torch.Generator(device="cpu").manual_seed(seed)
    v0 = torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)
    # ||J||_2: power iteration on J^T J
    v = _normalize(v0)
    sigma = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    used = 0
    for k in range(iters):
        w = lin.jvp(v).detach()
        s = _per_sample_norm(w)
        done = (s - sigma).abs() <= tol * s.clamp_min(1e-300)
        sigma = torch.maximum(sigma, s)
        used = k + 1
        if k > 5 and bool(done.all()):
            break
        v = _normalize(lin.vjp(w).detach())
    # rho(J): average growth of ||J^k v|| over the last quarter of the iterations
    v = _normalize(v0)
    logs = []
    for _ in range(iters):
        w = lin.jvp(v).detach()
        s = _per_sample_norm(w)
        logs.append(torch.log(s.clamp_min(1e-300)))
        v = _normalize(w)
    window = torch.stack(logs[-max(1, iters // 4):])
    rho = torch.exp(window.mean(dim=0))
    return sigma.detach(), rho.detach(), False, max(used, iters)


def local_stability(model, x: Tensor = None, *, u: Optional[Tensor] = None, z: Optional[Tensor] = None,
                    solver=None, tol: float = 1e-6, method: str = "auto", iters: int = 100,
                    dense_max: int = 256, seed: int = 0) -> LocalStability:
    """Local stability of each sample's fixed point.

    Args:
        model: a DEQ (``inject``, ``f``, ``solve``). Give ``x`` (inputs in [0, 1]), or ``u`` (the
            injection) and optionally ``z`` (a fixed point; solved when omitted).
        solver: solver config of the solve (default: the model's).
        tol: absolute residual ``||f(z) - z||`` below which the state counts as a fixed point.
        method, iters, dense_max, seed: as :func:`jacobian_spectrum`.
    """
    from ._util import require_deq
    require_deq(model, "local_stability")
    if u is None:
        if x is None:
            raise ConfigError("local_stability needs x or u")
        u = model.inject(model.check_input(x))
    u = u.detach()
    with torch.no_grad():
        if z is None:
            z = model.solve(u, solver=solver).z
        z = z.detach()
        fz = model.f(z, u)
        residual = _per_sample_norm(fz - z)

    def f(zz: Tensor) -> Tensor:
        return model.f(zz, u)

    sigma, rho, exact, used = jacobian_spectrum(f, z, method=method, iters=iters,
                                                dense_max=dense_max, seed=seed)
    ok = residual <= tol
    return LocalStability(sigma=sigma.detach(), rho=rho.detach(), residual=residual,
                          stable=(rho < 1) & ok, contractive=(sigma < 1) & ok, exact=exact,
                          method="dense" if exact else "power", iters=used)


__all__ = ["LocalStability", "jacobian_spectrum", "dense_jacobian", "local_stability"]
