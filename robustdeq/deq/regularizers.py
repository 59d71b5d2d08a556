"""Regularisers of the equilibrium (shared by every training objective)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError


def jacobian_penalty(model: nn.Module, z: Tensor, u: Tensor, probes: int = 1,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Hutchinson estimate of ``mean_b ||J_b||_F^2 / d``, ``J = df/dz`` at ``z`` (detached)
    (Bai et al. 2021: keeps solves short and stable).

    ``E_v ||v^T J||^2 = ||J||_F^2`` for ``v ~ N(0, I)``; differentiable with respect to the
    parameters (and ``u``) when autograd is on.
    """
    if not hasattr(model, "f"):
        raise ConfigError(f"Jacobian regularisation needs a DEQ cell f(z, u); {type(model).__name__} has none")
    if probes < 1:
        raise ConfigError(f"probes must be >= 1, got {probes}")
    z0 = z.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = model.f(z0, u)
        d = fz[0].numel()
        total = fz.new_zeros(fz.shape[0])
        for _ in range(probes):
            if generator is None:
                v = torch.randn_like(fz)
            else:
                v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype).to(fz.device)
            (vj,) = torch.autograd.grad(fz, z0, v, create_graph=torch.is_grad_enabled() and fz.requires_grad,
                                        retain_graph=True)
            total = total + vj.pow(2).flatten(1).sum(dim=1)
    return (total / probes / d).mean()


__all__ = ["jacobian_penalty"]
