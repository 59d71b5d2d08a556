"""Server-side fusion of client models: update checks, fusion weights, weighted average.

Pure torch/numpy (no Flower): the strategy in :mod:`robustdeq.federated.strategy` calls these
functions, and they can be tested and reused on their own.

Fusion rule
-----------
The global model of round t+1 is ``theta = sum_k w_k theta_k`` over the clients k whose update
passed :func:`check_update`, with ``w_k = n_k q_k / sum_j n_j q_j`` (``sum_k w_k = 1``):

- ``fedavg``: ``q_k = 1`` (McMahan et al. 2017).
- ``quality``: ``q_k = max(q_min, 1 - e_k)``, where ``e_k`` (the client's ``state_error``,
  :func:`robustdeq.federated.local.state_error`) estimates how far, relative to the state, the
  client's solver output stays from the equilibrium beyond its tolerance ``tol_k``:
  ``e_k = mean_i max(0, r_i - tol_k) / (1 - rho_i)`` over its validation samples, ``r_i`` the
  final relative residual with the client's own budget and ``rho_i`` the solver's observed rate
  of convergence on that sample. A client without ``state_error`` in its statistics gets
  ``e_k = max(0, r_k - tol_k) / (1 - rho_k)`` from ``mean_residual``, ``tol`` and
  ``contraction`` (``rho_k = 0`` when missing). See :mod:`robustdeq.federated` for why.
- ``tolerance``: ``q_k = max(q_min, min(1, sqrt(tol_k / r_k)))`` (``r_k`` = ``mean_residual``,
  ``r_k = 0`` gives 1): the first quality rule of this package, kept for comparison; it measures
  the residual against the tolerance the user picked, not against the state, and weighs the
  truncated clients far down.
- ``accuracy``: ``q_k = max(q_min, a_k)``, ``a_k`` the client's local validation accuracy.
- any callable ``rule(updates) -> q`` (one non-negative number per update).

The quality factors are divided by their maximum before the product (``q_k / max_j q_j``), which
changes no weight but makes equal qualities give *bit for bit* the FedAvg weights; the weighted
sum is accumulated in float64 in client order and cast back, so one client gives back exactly its
own parameters.

Spectral normalisation after fusion
-----------------------------------
A weight under PyTorch's spectral normalisation is ``W = W_orig / (u^T W_orig v)``, where the
buffers ``u``, ``v`` are the state of a power iteration (one step per training forward pass). The
average of the clients' ``u`` (or ``v``) vectors is *not* the singular vector of the averaged
``W_orig``: it is shorter (the clients' vectors point in different directions when the leading
singular values are close), so ``u^T W_orig v`` underestimates ``||W_orig||_2`` and the fused DEQ
layer is no longer the contraction it was built to be (under label skew the effective
``||W||_2`` can grow far above the scale, and the global model's solver then stops far above its
tolerance).
:func:`refresh_spectral_norms` therefore recomputes ``u``, ``v`` exactly (the leading singular
pair of the fused ``W_orig``, signs aligned with the averaged vectors) after every fusion; the
parameters themselves are not changed, and the fused layer again has ``||W||_2 = scale``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["ClientUpdate", "quality_factors", "fusion_weights", "check_update", "fuse",
           "refresh_spectral_norms"]

STAT_KEYS = ("mean_steps", "converged_fraction", "mean_residual", "val_accuracy", "state_error",
             "contraction")


@dataclass
class ClientUpdate:
    """What a client sent back after local training.

    ``stats`` holds at least ``mean_residual`` (final fixed-point residual on its validation
    samples), ``tol`` (its solver tolerance), ``state_error`` and ``contraction`` (its estimated
    distance from the equilibrium and its solver's rate of convergence), ``mean_steps``,
    ``converged_fraction`` and ``val_accuracy``.
    """

    client: int
    num_examples: int
    state: Dict[str, Tensor]
    stats: Dict[str, float] = field(default_factory=dict)
    node_id: Optional[int] = None


Rule = Union[str, Callable[[Sequence[ClientUpdate]], Sequence[float]]]


def quality_factors(updates: Sequence[ClientUpdate], rule: Rule = "fedavg", *,
                    floor: float = 0.05) -> np.ndarray:
    """The quality factor ``q_k`` of every update under ``rule`` (before normalisation)."""
    if callable(rule):
        q = np.asarray(rule(updates), dtype=np.float64).reshape(-1)
        if q.shape[0] != len(updates) or not np.all(np.isfinite(q)) or np.any(q < 0):
            raise ConfigError(f"custom fusion rule must return {len(updates)} finite numbers >= 0, got {q}")
        return q
    if rule == "fedavg":
        return np.ones(len(updates), dtype=np.float64)
    if rule == "quality":
        out = []
        for u in updates:
            if "state_error" in u.stats:
                e = float(u.stats["state_error"])
            else:
                r, tol = float(u.stats.get("mean_residual", 0.0)), float(u.stats.get("tol", 0.0))
                rho = min(max(float(u.stats.get("contraction", 0.0)), 0.0), 0.99)
                e = max(0.0, r - tol) / (1.0 - rho)
            out.append(max(floor, min(1.0, 1.0 - e)) if math.isfinite(e) else floor)
        return np.asarray(out, dtype=np.float64)
    if rule == "tolerance":
        out = []
        for u in updates:
            r, tol = float(u.stats.get("mean_residual", 0.0)), float(u.stats.get("tol", 0.0))
            if r <= 0 or r <= tol:
                q = 1.0
            elif tol <= 0:
                q = floor
            else:
                q = math.sqrt(tol / r)
            out.append(max(floor, min(1.0, q)))
        return np.asarray(out, dtype=np.float64)
    if rule == "accuracy":
        return np.asarray([max(floor, min(1.0, float(u.stats.get("val_accuracy", 0.0))))
                           for u in updates], dtype=np.float64)
    raise ConfigError(f"unknown fusion rule {rule!r}; expected 'fedavg', 'quality', 'tolerance', "
                      "'accuracy' or a callable")


def fusion_weights(updates: Sequence[ClientUpdate], rule: Rule = "fedavg", *,
                   floor: float = 0.05) -> np.ndarray:
    """Normalised fusion weights ``w_k = n_k q_k / sum_j n_j q_j`` (float64, summing to 1)."""
    if not updates:
        raise ConfigError("no client update to weigh")
    n = np.asarray([float(u.num_examples) for u in updates], dtype=np.float64)
    if np.any(n <= 0):
        raise ConfigError(f"every update needs num_examples > 0, got {n.tolist()}")
    q = quality_factors(updates, rule, floor=floor)
    if q.max() <= 0:
        raise ConfigError("every quality factor is 0: nothing to fuse")
    q = q / q.max()
    raw = n * q
    return raw / raw.sum()


def check_update(update: ClientUpdate, reference: Mapping[str, Tensor]) -> Optional[str]:
    """Why ``update`` must not be fused (``None`` when it is acceptable).

    Rejected: a non-positive or non-integer sample count, missing or unexpected tensors, a
    shape or dtype different from the global model's, NaN/inf values, non-finite statistics.
    """
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        return f"num_examples must be a positive integer, got {n!r}"
    keys, ref_keys = set(update.state), set(reference)
    if keys != ref_keys:
        missing, extra = sorted(ref_keys - keys), sorted(keys - ref_keys)
        return f"tensor names differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})"
    for k, ref in reference.items():
        v = update.state[k]
        if not isinstance(v, Tensor):
            return f"{k!r} is a {type(v).__name__}, not a tensor"
        if tuple(v.shape) != tuple(ref.shape):
            return f"{k!r} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}"
        if v.dtype != ref.dtype:
            return f"{k!r} has dtype {v.dtype}, expected {ref.dtype}"
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            return f"{k!r} holds {bad} non-finite value(s) (NaN/inf)"
    for k in STAT_KEYS:
        if k in update.stats and not math.isfinite(float(update.stats[k])):
            return f"statistic {k!r} is not finite ({update.stats[k]!r})"
    return None


def fuse(updates: Sequence[ClientUpdate], weights: Sequence[float],
         reference: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``sum_k w_k theta_k`` for every floating-point tensor (float64 accumulation, in the order
    given); other tensors (integer buffers) are taken from the update of largest weight."""
    w = np.asarray(weights, dtype=np.float64)
    if len(updates) == 0 or w.shape[0] != len(updates):
        raise ConfigError(f"need one weight per update ({len(updates)} updates, {w.shape[0]} weights)")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1.0) > 1e-9:
        raise ConfigError(f"fusion weights must be >= 0 and sum to 1, got {w.tolist()}")
    top = int(np.argmax(w))
    out: Dict[str, Tensor] = {}
    for k, ref in reference.items():
        if not ref.is_floating_point():
            out[k] = updates[top].state[k].clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for wk, u in zip(w.tolist(), updates):
            acc.add_(u.state[k].to(torch.float64), alpha=wk)
        out[k] = acc.to(ref.dtype)
    return out


def summarize_weights(updates: Sequence[ClientUpdate], weights: Sequence[float],
                      quality: Sequence[float]) -> List[Dict[str, Any]]:
    """Per-client rows (client, n_k, q_k, w_k and its statistics) for reports."""
    rows = []
    for u, w, q in zip(updates, weights, quality):
        row = {"client": u.client, "num_examples": int(u.num_examples), "quality": float(q),
               "weight": float(w)}
        row.update({k: float(v) for k, v in u.stats.items()})
        rows.append(row)
    return rows


def refresh_spectral_norms(module: torch.nn.Module) -> int:
    """Set the power-iteration buffers ``u``, ``v`` of every spectral normalisation in
    ``module`` (``torch.nn.utils.parametrizations.spectral_norm``) to the leading singular pair
    of its current weight, so that the normalised weight has spectral norm exactly 1 again
    (see the module docstring: a linear average of ``u``, ``v`` does not do that).

    The parameters are not touched; signs follow the current ``u``, ``v``, so a model whose
    buffers already converged keeps them (to rounding). Returns the number of weights refreshed.
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _SpectralNorm

    count = 0
    for mod in module.modules():
        if not parametrize.is_parametrized(mod):
            continue
        for name, plist in mod.parametrizations.items():
            for p in plist:
                if not isinstance(p, _SpectralNorm) or not hasattr(p, "_u"):
                    continue
                with torch.no_grad():
                    mat = p._reshape_weight_to_matrix(plist.original).to(torch.float64)
                    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
                    u, v = U[:, 0], Vh[0]
                    # the singular pair is defined up to a joint sign: keep the one closest to
                    # the current (averaged) vectors, so that nothing flips from round to round
                    if float(u @ p._u.to(torch.float64)) + float(v @ p._v.to(torch.float64)) < 0:
                        u, v = -u, -v
                    p._u.copy_(u.to(p._u.dtype))
                    p._v.copy_(v.to(p._v.dtype))
                count += 1
                logger.debug("refreshed the spectral norm of %s.%s (sigma %.4g)",
                             type(mod).__name__, name, float(S[0]))
    return count
