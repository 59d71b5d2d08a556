"""Small helpers shared by the certificate modules."""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..guard import preserve_model


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block and restore each one's own flag after.

    Eval mode matters for certificates: a spectrally normalised weight runs (and stores) a power
    iteration on every access in train mode; in eval mode it is the fixed weight inference uses.
    The flags (and ``requires_grad``) come back through :func:`robustdeq.guard.preserve_model`.
    """
    with preserve_model(module, "eval", values=False, who="a certificate"):
        yield module


def get_cell(model_or_cell: nn.Module) -> nn.Module:
    """The model's ``cell`` attribute, or ``model_or_cell`` itself when it has none (a bare
    cell)."""
    return getattr(model_or_cell, "cell", model_or_cell)


def require_deq(model: nn.Module, what: str = "certify") -> None:
    """Raise a ConfigError unless ``model`` has the DEQClassifier interface certificates need."""
    needed = ("inject", "cell", "readout", "solve", "f")
    missing = [n for n in needed if not hasattr(model, n)]
    if missing:
        raise ConfigError(
            f"{what} needs a DEQ model with {', '.join(needed)} (a DEQClassifier); "
            f"{type(model).__name__} lacks {', '.join(missing)}")


def float64_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float64 deep copy of ``model`` computing the same map as the original.

    Cells that cache a step size computed from their weights (``MonotoneCell.alpha``) keep the
    original's value so the copy iterates exactly the same map.
    """
    if hasattr(model, "prepare"):
        with eval_mode(model), torch.no_grad():
            model.prepare()
    alphas = {}
    for name, m in model.named_modules():
        if hasattr(m, "fixed_alpha") and hasattr(m, "alpha"):
            alphas[name] = float(m.alpha)
    work = copy.deepcopy(model)
    work.eval()
    work.to(torch.float64)
    for name, m in work.named_modules():
        if name in alphas:
            m.fixed_alpha = alphas[name]
            m._alpha = alphas[name]
    for p in work.parameters():
        p.requires_grad_(False)
    if hasattr(work, "warn_nonconvergence"):
        work.warn_nonconvergence = False
    return work


def input_feature_affine(injection: nn.Module, input_shape, n_features: int):
    """``(mean, 1/std)`` per flattened input feature (float64) of an injection's ``Normalize``,
    following ``Normalize.forward`` (per channel for (C, H, W) inputs, else the first entry), or
    None when the injection has no recognised normalisation -- also when its statistics differ
    per channel and ``input_shape`` does not say how ``Normalize.forward`` applies them (no
    ``input_shape``: a 4-D batch is normalised per channel, any other the first entry; the
    channel count not matching the statistics)."""
    norm = getattr(injection, "normalize", None)
    if norm is None or not hasattr(norm, "std") or not hasattr(norm, "mean"):
        return None
    std = norm.std.detach().to(torch.float64).flatten()
    mean = norm.mean.detach().to(torch.float64).flatten()
    if bool((std == 0).any()):
        raise ConfigError("the input normalisation has std = 0: the model is not Lipschitz in x")
    n = int(n_features)
    if input_shape is not None and len(input_shape) == 3 and int(math.prod(input_shape)) == n:
        c = int(input_shape[0])  # 4-D inputs (N, C, H, W) are normalised per channel (broadcast)
        per = n // c
        s_c = std.expand(c) if std.numel() == 1 else std
        m_c = mean.expand(c) if mean.numel() == 1 else mean
        if s_c.numel() == c and m_c.numel() == c:
            return m_c.repeat_interleave(per), (1.0 / s_c).repeat_interleave(per)
        return None  # per-channel statistics that do not match the channels: not recognised
    uniform = bool((std == std[0]).all()) and bool((mean == mean[0]).all())
    if not uniform and (input_shape is None or len(input_shape) == 3):
        # per-channel statistics, but the rank of the inputs (which decides whether
        # Normalize.forward applies them per channel or its first entry everywhere) is not
        # known: no sound per-feature factor
        return None
    return mean[0].expand(n).clone(), (1.0 / std[0]).expand(n).clone()


def input_feature_scale(injection: nn.Module, input_shape, n_features: int) -> Optional[Tensor]:
    """Per-input-feature factor ``1/std`` (flattened order), or None (see :func:`input_feature_affine`)."""
    aff = input_feature_affine(injection, input_shape, n_features)
    return None if aff is None else aff[1]


def to_float(x) -> Optional[float]:
    """``x`` as a float, with None and nan mapped to None and an infinity kept as
    ``float("inf")`` / ``float("-inf")``."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else (float("inf") if v > 0 else float("-inf") if v < 0 else None)





def tight_solver(model: nn.Module, tol: float = 1e-10, max_iter: int = 500):
    """The model's solver made strict: absolute tolerance ``tol``, at least ``max_iter`` steps,
    returning the lowest-residual iterate (certificates measure the residual themselves)."""
    from ..config import SolverConfig
    cfg = getattr(model, "solver_config", None) or SolverConfig()
    return cfg.replace(tol=float(tol), stop_mode="abs", select="best",
                       max_iter=max(int(max_iter), cfg.max_iter))
__all__ = ["eval_mode", "get_cell", "require_deq", "float64_copy", "input_feature_scale", "input_feature_affine", "tight_solver"]
