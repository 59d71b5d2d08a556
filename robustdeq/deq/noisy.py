"""A model's logits on noisy inputs (outside [0, 1] allowed): the base classifier of randomized
smoothing (Cohen, Rosenfeld, Kolter 2019) and of Gaussian-noise training.

:func:`base_logits` runs the same computation as ``model(x)`` without the input-range check; for a
DEQ that is its solver, then its gradient estimator's read-out (:meth:`DEQClassifier.run` with
``in_range=False``), for an unrolled weight-tied model its ``depth`` steps from the initial state.
"""
from __future__ import annotations

import warnings

from torch import Tensor, nn

from ..errors import ConfigError, InputError, NonConvergenceWarning
from .protocols import SolverModel


def _is_unrolled(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("unroll", "inject", "readout", "init_state", "depth"))


def to_model_dtype(model: nn.Module, x: Tensor) -> Tensor:
    """Floating-point inputs in the dtype of the model's parameters (as the models' input check does)."""
    p = next(model.parameters(), None)
    if p is not None and p.is_floating_point() and x.is_floating_point() and p.dtype != x.dtype:
        return x.to(p.dtype)
    return x


def run_noisy(model: nn.Module, x: Tensor, **options):
    """``model.run`` on noisy inputs (outside [0, 1] allowed); its per-call non-convergence
    warning is left out (callers count solver work themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        return model.run(x, in_range=False, **options)


def base_logits(model: nn.Module, x: Tensor, *, clip: bool = False) -> Tensor:
    """The model's logits on (possibly out-of-[0, 1]) inputs ``x``: the same computation as
    ``model(x)`` (for a DEQ: its solver, then its gradient estimator's read-out, with autograd as
    enabled) without the input-range check, and without touching the model's state. ``clip``:
    clamp ``x`` to [0, 1] first. Other modules are called as they are."""
    if clip:
        x = x.clamp(0.0, 1.0)
    x = to_model_dtype(model, x)
    if isinstance(model, SolverModel):
        return run_noisy(model, x).logits
    if _is_unrolled(model):
        u = model.inject(x)
        return model.readout(model.unroll(u, model.init_state(u), int(model.depth)))
    try:
        return model(x)
    except InputError as e:
        raise ConfigError(f"{type(model).__name__} rejects the noisy inputs ({e}); smooth "
                          "f(clip(x + noise, 0, 1)) instead with clip=True") from None


__all__ = ["base_logits", "run_noisy", "to_model_dtype"]
