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


#: the DEQClassifier interface the certificates of a fixed point need
DEQ_INTERFACE = ("inject", "cell", "readout", "solve", "f")


def has_deq_interface(model: nn.Module) -> bool:
    """Whether ``model`` has every attribute of :data:`DEQ_INTERFACE`."""
    return all(hasattr(model, n) for n in DEQ_INTERFACE)


def require_deq(model: nn.Module, what: str = "certify") -> None:
    """Raise a ConfigError unless ``model`` has the DEQClassifier interface certificates need."""
    needed = DEQ_INTERFACE
    missing = [n for n in needed if not hasattr(model, n)]
    if missing:
        raise ConfigError(
            f"{what} needs a DEQ model with {', '.join(needed)} (a DEQClassifier); "
            f"{type(model).__name__} lacks {', '.join(missing)}")


def changed_deq_part(model: nn.Module, *, cell: bool = True) -> Optional[str]:
    """Why the certificates of a DEQ, which recognise its parts by class and bound them by their
    weights, would certify another function than ``model`` computes, or None.

    The shared test of the interval map, the Lipschitz bounds and (through
    :func:`robustdeq.deq.cells.changed_part`) the contraction certificate: ``model`` a
    ``DEQClassifier`` subclass overriding ``forward``, ``run``, ``inject``, ``f``, ``readout`` or
    ``solve`` (:func:`robustdeq.deq.model.changed_composition`); or one of its parts -- the cell
    (unless ``cell`` is False), the injection or the head, or a module inside those two (its
    ``Normalize``, its ``Linear`` layers, a stem's layers) -- an instance of a class the bounds
    recognise (:data:`robustdeq.deq.cells.CERTIFIED_PARTS`) whose subclass overrides the
    class's ``forward`` or a method the bound reads (``MLPCell._pre``, ``weight_matrix``, ...).
    The reason names the part, its class and the overridden methods."""
    from ..deq.cells import changed_part
    from ..deq.model import changed_composition
    why = changed_composition(model)
    if why is not None:
        return why
    parts = []
    if cell:
        parts.append(("cell", getattr(model, "cell", None)))
    for attr in ("injection", "head"):
        part = getattr(model, attr, None)
        if isinstance(part, nn.Module):
            parts += [(f"{attr}.{name}" if name else attr, m) for name, m in part.named_modules()]
    for where, m in parts:
        why = changed_part(m) if isinstance(m, nn.Module) else None
        if why is not None:
            return f"model.{where}: {why}"
    return None


def forward_hooks(model: nn.Module) -> dict:
    """The forward hooks and forward pre-hooks that calling ``model`` runs: ``{"modules":
    {name: [kinds]}, "global": [kinds]}`` (``name`` "" for ``model`` itself; the global ones
    are torch's ``register_module_forward_hook`` / ``register_module_forward_pre_hook``). Empty
    lists when there are none."""
    from torch.nn.modules import module as _m
    mods = {}
    for name, m in model.named_modules():
        kinds = [k for k, d in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks)) if d]
        if kinds:
            mods[name] = kinds
    glob = [k for k, d in (("global forward pre-hook", getattr(_m, "_global_forward_pre_hooks", None)),
                           ("global forward hook", getattr(_m, "_global_forward_hooks", None))) if d]
    return {"modules": mods, "global": glob}


#: what the certificates say of forward hooks (the report's entry and the warning)
HOOKS_NOTE = ("the certificates (IBP, the Lipschitz bounds, the contraction certificate) read the "
              "weights and cover the model's computation without its forward hooks; a hook that changes "
              "an output is not covered")


def check_forward_hooks(model: nn.Module, who: str = "certify") -> Optional[dict]:
    """None when calling ``model`` runs no forward (pre-)hook; else the report's entry (the
    hooks of :func:`forward_hooks` and :data:`HOOKS_NOTE`) after a
    :class:`~robustdeq.errors.CertificationWarning` naming the modules that carry them. Hooks
    are not refused (an observing hook changes nothing), only said."""
    import warnings
    from .._support import user_stacklevel
    from ..errors import CertificationWarning
    hooks = forward_hooks(model)
    if not hooks["modules"] and not hooks["global"]:
        return None
    where = [f"{name or type(model).__name__ + ' itself'} ({', '.join(k)})" for name, k in hooks["modules"].items()]
    where += [f"every module ({k})" for k in hooks["global"]]
    warnings.warn(f"{who}: {type(model).__name__} runs forward hooks: {'; '.join(where)}; {HOOKS_NOTE}",
                  CertificationWarning, stacklevel=user_stacklevel())
    return {"modules": {k: list(v) for k, v in hooks["modules"].items()}, "global": list(hooks["global"]),
            "note": HOOKS_NOTE}


def _plain_sequential(net) -> bool:
    """``net`` is an ``nn.Sequential`` whose forward is ``nn.Sequential``'s own (its layers in
    order, nothing else)."""
    return isinstance(net, nn.Sequential) and type(net).forward is nn.Sequential.forward


def feedforward_net(model: nn.Module) -> Optional[nn.Sequential]:
    """The ``nn.Sequential`` whose layers interval propagation follows for the feed-forward
    classifier ``model``, or None when ``model`` is not one whose output is exactly that
    Sequential's.

    Accepted: a plain ``nn.Sequential`` (itself), or robustdeq's
    :class:`~robustdeq.deq.zoo.FeedForward` (what the zoo's ``ff_mlp`` / ``ff_cnn`` build; its
    forward checks the inputs and returns ``self.net(x)``) with a plain ``nn.Sequential`` as
    ``net``, also a subclass that keeps ``FeedForward.forward``. Anything else -- a module that
    merely has a ``.net``, a ``Sequential`` or ``FeedForward`` subclass overriding ``forward``, a
    model with the DEQ interface -- is None: its forward may do more than the layers (normalise,
    rescale), which interval bounds of the layers alone would not cover."""
    if has_deq_interface(model):
        return None
    if _plain_sequential(model):
        return model
    from ..deq.zoo import FeedForward
    if isinstance(model, FeedForward) and type(model).forward is FeedForward.forward \
            and _plain_sequential(getattr(model, "net", None)):
        return model.net
    return None


def is_feedforward(model: nn.Module) -> bool:
    """``model`` is a feed-forward classifier whose layers interval propagation can follow
    (:func:`feedforward_net` finds its ``nn.Sequential``)."""
    return feedforward_net(model) is not None


def meant_as_feedforward(model: nn.Module) -> bool:
    """``model`` is not a DEQ but looks like a feed-forward network (an ``nn.Sequential``, a
    ``FeedForward``, or a module with a ``Sequential`` ``.net``), accepted or not by
    :func:`feedforward_net`: a refusal should then say what to pass instead."""
    from ..deq.zoo import FeedForward
    return not has_deq_interface(model) and (
        isinstance(model, (nn.Sequential, FeedForward)) or isinstance(getattr(model, "net", None), nn.Sequential))


#: what a feed-forward network passed to the certificates must be (the refusals say it)
FEEDFORWARD_KINDS = ("a plain nn.Sequential, or robustdeq.deq.zoo.FeedForward(net, input_shape) around one "
                     "(what the zoo's ff_mlp / ff_cnn build)")


def require_feedforward(model: nn.Module, what: str) -> nn.Sequential:
    """The ``nn.Sequential`` of :func:`feedforward_net`, or a ConfigError saying what to pass."""
    net = feedforward_net(model)
    if net is not None:
        return net
    from ..deq.zoo import FeedForward
    name = type(model).__name__
    if isinstance(model, nn.Sequential):
        why = (f"{name} overrides nn.Sequential.forward, so interval bounds of its layers would not cover "
               "what it computes")
    elif isinstance(model, FeedForward) and type(model).forward is FeedForward.forward:
        why = (f"the .net of {name} is a {type(model.net).__name__}, not a plain nn.Sequential (one whose "
               "forward is nn.Sequential's)")
    elif hasattr(model, "net"):
        why = (f"{name}'s forward is not that of nn.Sequential or FeedForward, so interval bounds of its "
               ".net's layers would not cover what it computes (e.g. a normalisation before them)")
    else:
        why = f"got {name}"
    raise ConfigError(f"{what} needs a feed-forward network: {FEEDFORWARD_KINDS}; {why}. Pass the "
                      "nn.Sequential itself, or FeedForward(net, input_shape), with whatever the model "
                      "computes besides as layers of net")


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
__all__ = ["eval_mode", "get_cell", "require_deq", "has_deq_interface", "DEQ_INTERFACE", "feedforward_net",
           "is_feedforward", "meant_as_feedforward", "require_feedforward", "FEEDFORWARD_KINDS", "float64_copy",
           "input_feature_scale", "input_feature_affine", "tight_solver", "changed_deq_part", "forward_hooks",
           "check_forward_hooks", "HOOKS_NOTE"]
