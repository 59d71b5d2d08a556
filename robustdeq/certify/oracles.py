"""A linear DEQ whose certificates are known in closed form (the oracle of the certify tests).

``f(z, u) = A z + u``: the fixed point is ``z* = (I - A)^{-1} u`` whenever ``I - A`` is
invertible; ``Lip_z(f) = ||A||_2`` exactly; the Jacobian at any point is ``A`` (spectral norm
``||A||_2``, spectral radius ``max |eig(A)|``, which differ for non-normal ``A``); fixed-point
iteration converges from any start iff ``rho(A) < 1``; with an ``MLPInjection`` (``U``, std ``s``)
and a ``LinearHead`` (``W_o``), ``x -> logits`` is affine with Lipschitz constant
``||W_o (I - A)^{-1} U||_2 / s``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..deq.cells import LinearCell


def linear_deq(A: Tensor, *, in_shape=(1, 8, 8), num_classes: int = 10, std: float = 1.0,
               mean: float = 0.0, solver: Optional[dict] = None, seed: int = 0):
    """A ``DEQClassifier`` with an ``MLPInjection``, a :class:`LinearCell` and a ``LinearHead``."""
    import math
    from ..deq.cells import LinearHead, MLPInjection
    from ..deq.model import DEQClassifier
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = DEQClassifier(MLPInjection(int(math.prod(in_shape)), A.shape[0], mean, std),
                              LinearCell(A), LinearHead(A.shape[0], num_classes),
                              solver=solver or {"name": "anderson", "max_iter": 200, "tol": 1e-10,
                                                "stop_mode": "abs"},
                              input_shape=tuple(in_shape))
    finally:
        torch.random.set_rng_state(gen_state)
    return model


__all__ = ["LinearCell", "linear_deq"]
