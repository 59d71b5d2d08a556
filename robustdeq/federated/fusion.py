"""Server-side fusion of client models: update checks, fusion weights, weighted average.

Pure torch/numpy (no Flower): the strategy in :mod:`robustdeq.federated.strategy` calls these
functions, and they can be tested and reused on their own.

Fusion rule
-----------
The global model of round t+1 is ``theta = sum_k w_k theta_k`` over the clients k whose update
passed :func:`check_update`, with ``w_k = n_k q_k / sum_j n_j q_j`` (``sum_k w_k = 1``):

- ``fedavg``: ``q_k = 1`` (McMahan et al. 2017).
- ``quality``: ``q_k = max(q_min, min(1, sqrt(tol_k / r_k)))``, where ``r_k`` is the mean final
  fixed-point residual of client k's model on its own validation samples, solved with its own
  solver budget, and ``tol_k`` the tolerance it aimed at (``r_k = 0`` gives 1). See
  :mod:`robustdeq.federated` for why.
- ``accuracy``: ``q_k = max(q_min, a_k)``, ``a_k`` the client's local validation accuracy.
- any callable ``rule(updates) -> q`` (one non-negative number per update).

The quality factors are divided by their maximum before the product (``q_k / max_j q_j``), which
changes no weight but makes equal qualities give *bit for bit* the FedAvg weights; the weighted
sum is accumulated in float64 in client order and cast back, so one client gives back exactly its
own parameters.
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

__all__ = ["ClientUpdate", "quality_factors", "fusion_weights", "check_update", "fuse"]

STAT_KEYS = ("mean_steps", "converged_fraction", "mean_residual", "val_accuracy")


@dataclass
class ClientUpdate:
    """What a client sent back after local training.

    ``stats`` holds at least ``mean_residual`` (final fixed-point residual on its validation
    samples), ``tol`` (its solver tolerance), ``mean_steps``, ``converged_fraction`` and
    ``val_accuracy``.
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
    raise ConfigError(f"unknown fusion rule {rule!r}; expected 'fedavg', 'quality', 'accuracy' or a callable")


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
