"""Ready architectures: ``build(name, **options) -> nn.Module``.

The names live in :data:`robustdeq.registry.MODELS` (the built-ins below, LyaDEQ's builder in
``robustdeq.defenses.lyapunov``, and whatever :func:`register` adds). Every model built here
carries ``model.robustdeq_config = {"name": ..., "options": ...}`` (JSON friendly) so that a
checkpoint can rebuild it. Unknown names and options are ``ConfigError``s.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence

from torch import nn

from ..errors import ConfigError, reject_unknown
from ..registry import MODELS
from .cells import (ConvCell, ConvHead, ConvInjection, ConvStemInjection, LinearHead, MLPCell,
                    MLPInjection, MonotoneCell)
from .model import DEQClassifier
from .weight_tied import WeightTied


def register(name: str, *, replace: bool = False):
    """Decorator: add a builder ``fn(**options) -> nn.Module`` to :data:`robustdeq.registry.MODELS`
    under ``name`` (``build(name)``, the command line's ``--model``). An existing name is a
    ConfigError unless ``replace=True``."""
    def deco(fn):
        if not callable(fn):
            raise ConfigError(f"the builder of model {name!r} must be callable, got {type(fn).__name__}")
        MODELS.register(name, fn, replace=replace)
        return fn
    return deco


def build(name: str, **options) -> nn.Module:
    """The model ``name`` of :data:`robustdeq.registry.MODELS` built with ``options`` (an option
    the builder does not take is a ConfigError)."""
    fn = MODELS.get(name)
    sig = inspect.signature(fn)
    reject_unknown(options, sig.parameters, f"model {name!r}")
    _check_sizes(name, options)
    model = fn(**options)
    model.robustdeq_config = {"name": name, "options": _jsonable(options)}
    return model


def _positive_ints(value) -> bool:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)


def _check_sizes(name: str, options: dict) -> None:
    """ConfigError for a size option of the zoo's meaning that is not one (``in_shape``: positive
    ints; ``num_classes``: an int >= 2; ``hidden``, ``channels``: positive ints; ``std``:
    positive numbers; ``groups``, ``pool``, ``stem_stride``, ``depth``, ``backtrack``: positive
    ints; ``layers``, ``blocks``, ``seed``: ints >= 0), instead of a torch error from a layer or a
    model with empty layers."""
    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"model {name!r}: {key} must be {want}, got {options[key]!r}")
    if "in_shape" in options and not (isinstance(options["in_shape"], (list, tuple))
                                      and _positive_ints(options["in_shape"])):
        raise bad("in_shape", "a list of positive ints (one sample's shape, e.g. [1, 8, 8])")
    nc = options.get("num_classes", 2)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 2:
        raise bad("num_classes", "an int >= 2")
    for key in ("hidden", "channels"):
        if key in options and not _positive_ints(options[key]):
            raise bad(key, "a positive int" + (" (or a list of them)" if key == "channels" else ""))
    for key, low in (("groups", 1), ("pool", 1), ("stem_stride", 1), ("depth", 1), ("backtrack", 1),
                     ("layers", 0), ("blocks", 0), ("seed", 0)):  # 0 layers / blocks: none of them
        v = options.get(key)
        if key in options and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise bad(key, "a positive int" if low else "an int >= 0")
    if "std" in options:
        stds = options["std"] if isinstance(options["std"], (list, tuple)) else [options["std"]]
        if not stds or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               and v > 0 for v in stds):
            raise bad("std", "a finite number > 0 (or a list of them, one per channel)")


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (int, float, str, bool)) or o is None:
        return o
    raise ConfigError(f"model option value {o!r} is not JSON-serialisable; pass plain values")


def _n_in(in_shape: Sequence[int]) -> int:
    return int(math.prod(in_shape))


def _grad(grad, grad_options):
    from .grad import make_estimator
    return make_estimator(grad, **(grad_options or {}))


# built-in: robustdeq.registry.MODELS["mlp_deq"]
def mlp_deq(in_shape=(1, 8, 8), num_classes=10, hidden=64, act="tanh", norm="none", scale=1.0,
            init_gain=0.5, mean=0.0, std=1.0, solver: Optional[dict] = None, grad="ift",
            grad_options: Optional[dict] = None) -> DEQClassifier:
    """Fully connected DEQ: ``z = act(W z + U x + b)``; ``norm="spectral", scale<1`` gives a
    Lipschitz-constrained (contractive) cell; ``norm="interval", scale<1`` bounds ``|| |W| ||_2``
    (a contractive cell whose interval fixed point is unique: IBP training)."""
    return DEQClassifier(MLPInjection(_n_in(in_shape), hidden, mean, std),
                         MLPCell(hidden, act=act, norm=norm, scale=scale, init_gain=init_gain),
                         LinearHead(hidden, num_classes), solver=solver, grad=_grad(grad, grad_options),
                         input_shape=tuple(in_shape))


# built-in: robustdeq.registry.MODELS["stem_deq"]
def stem_deq(in_shape=(1, 8, 8), num_classes=10, hidden=64, channels=16, blocks=1, pool=2, act="relu",
             norm="interval", scale=0.5, init_gain=0.5, mean=(0.0,), std=(1.0,),
             solver: Optional[dict] = None, grad="ift", grad_options: Optional[dict] = None) -> DEQClassifier:
    """A convolutional stem (``ff_cnn``'s layers without GroupNorm: 3x3 convolutions with ReLU,
    average pooling to ``pool x pool``) feeding a fully connected equilibrium layer
    ``z = act(W z + U s(x) + b)`` (``MLPCell``; ``norm``/``scale`` as in ``mlp_deq``), read out
    linearly: the explicit CNN with its hidden layer made implicit. With ``norm="interval"`` and
    ``scale < 1`` the interval fixed point is unique and IBP covers the whole model (certified
    training)."""
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,)
    std = tuple(std) if isinstance(std, (list, tuple)) else (std,)
    return DEQClassifier(ConvStemInjection(tuple(in_shape), hidden, channels, blocks, pool, mean, std),
                         MLPCell(hidden, act=act, norm=norm, scale=scale, init_gain=init_gain),
                         LinearHead(hidden, num_classes), solver=solver, grad=_grad(grad, grad_options),
                         input_shape=tuple(in_shape))


def conv_deq(in_shape=(1, 8, 8), num_classes=10, channels=16, groups=4, norm="none", init_gain=0.5,
             mean=(0.0,), std=(1.0,), pool=2, solver: Optional[dict] = None, grad="ift",
             grad_options: Optional[dict] = None) -> DEQClassifier:
    """MDEQ-style single-resolution convolutional DEQ with GroupNorm."""
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,)
    std = tuple(std) if isinstance(std, (list, tuple)) else (std,)
    return DEQClassifier(ConvInjection(in_shape[0], channels, mean, std),
                         ConvCell(channels, groups=groups, norm=norm, init_gain=init_gain),
                         ConvHead(channels, num_classes, pool), solver=solver,
                         grad=_grad(grad, grad_options), input_shape=tuple(in_shape))


def _multiscale(in_shape, num_classes, channels, groups, stem_stride, init_gain, mean, std, pool,
                solver, grad, grad_options) -> DEQClassifier:
    from .multiscale import (MultiscaleCell, MultiscaleHead, MultiscaleInjection, PackedShape,
                             branch_shapes)
    if len(in_shape) != 3:
        raise ConfigError(f"multiscale DEQs need in_shape (C, H, W), got {tuple(in_shape)}")
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,)
    std = tuple(std) if isinstance(std, (list, tuple)) else (std,)
    layout = PackedShape(branch_shapes(in_shape[1:], channels, stem_stride))
    return DEQClassifier(MultiscaleInjection(in_shape[0], layout, groups, stem_stride, mean, std),
                         MultiscaleCell(layout, groups=groups, init_gain=init_gain),
                         MultiscaleHead(layout, num_classes, pool), solver=solver,
                         grad=_grad(grad, grad_options), input_shape=tuple(in_shape))


def mdeq(in_shape=(1, 28, 28), num_classes=10, channels=(16, 32), groups=4, stem_stride=2,
         init_gain=0.5, mean=(0.1307,), std=(0.3081,), pool=4, solver: Optional[dict] = None,
         grad="ift", grad_options: Optional[dict] = None) -> DEQClassifier:
    """Multiscale convolutional DEQ in the MDEQ style (Bai, Koltun, Kolter, NeurIPS 2020): one branch per
    entry of ``channels`` (each at half the previous resolution), cross-resolution fusion,
    GroupNorm, weight-normalised convolutions; the state is packed (see ``deq.multiscale``)."""
    if not isinstance(channels, (list, tuple)) or len(channels) < 2:
        raise ConfigError(f"mdeq needs two or more branches (channels=[c1, c2, ...]), got {channels!r}; "
                          "use 'mdeq_single' for one resolution")
    return _multiscale(in_shape, num_classes, channels, groups, stem_stride, init_gain, mean, std,
                       pool, solver, grad, grad_options)


def mdeq_single(in_shape=(1, 28, 28), num_classes=10, channels=16, groups=4, stem_stride=2,
                init_gain=0.5, mean=(0.1307,), std=(0.3081,), pool=4, solver: Optional[dict] = None,
                grad="ift", grad_options: Optional[dict] = None) -> DEQClassifier:
    """The single-resolution variant of ``mdeq`` (same cell with one branch, no fusion)."""
    return _multiscale(in_shape, num_classes, [int(channels)], groups, stem_stride, init_gain, mean,
                       std, pool, solver, grad, grad_options)


def mon_deq(in_shape=(1, 8, 8), num_classes=10, hidden=64, m=1.0, alpha: Optional[float] = None,
            mean=0.0, std=1.0, solver: Optional[dict] = None, grad="ift",
            grad_options: Optional[dict] = None) -> DEQClassifier:
    """Fully connected monotone operator DEQ (Winston & Kolter, NeurIPS 2020; unique fixed point for
    every input)."""
    return DEQClassifier(MLPInjection(_n_in(in_shape), hidden, mean, std),
                         MonotoneCell(hidden, m=m, alpha=alpha), LinearHead(hidden, num_classes),
                         solver=solver or {"max_iter": 50}, grad=_grad(grad, grad_options),
                         input_shape=tuple(in_shape))


def weight_tied_mlp(in_shape=(1, 8, 8), num_classes=10, hidden=64, depth=8, sparsity=0.5, seed=0,
                    act="tanh", init_gain=0.5, mean=0.0, std=1.0) -> WeightTied:
    """Weight-tied MLP with a distinct random sparse mask per depth (Song et al. 2023)."""
    return WeightTied(MLPInjection(_n_in(in_shape), hidden, mean, std),
                      MLPCell(hidden, act=act, init_gain=init_gain), LinearHead(hidden, num_classes),
                      depth=depth, sparsity=sparsity, seed=seed, input_shape=tuple(in_shape))


def weight_tied_conv(in_shape=(1, 8, 8), num_classes=10, channels=16, groups=4, depth=6,
                     sparsity=0.5, seed=0, init_gain=0.5, pool=2) -> WeightTied:
    """Weight-tied convolutional model (the ``ConvCell`` of ``conv_deq``) with a distinct random
    sparse mask per depth (Song et al. 2023)."""
    return WeightTied(ConvInjection(in_shape[0], channels), ConvCell(channels, groups, init_gain=init_gain),
                      ConvHead(channels, num_classes, pool), depth=depth, sparsity=sparsity, seed=seed,
                      input_shape=tuple(in_shape))


class FeedForward(nn.Module):
    """A plain feed-forward classifier (baseline); checks its inputs like the DEQs do."""

    def __init__(self, net: nn.Module, input_shape):
        super().__init__()
        self.net = net
        self.input_shape = tuple(input_shape)

    def forward(self, x):
        """Logits of a batch ``x`` (shape, dtype, finiteness and [0, 1] checked first)."""
        from ..data import validate_inputs
        return self.net(validate_inputs(x, expected_shape=self.input_shape))


def ff_mlp(in_shape=(1, 8, 8), num_classes=10, hidden=64, layers=2) -> FeedForward:
    """A feed-forward ReLU MLP with ``layers`` hidden layers of width ``hidden`` (baseline)."""
    mods = [nn.Flatten()]
    d = _n_in(in_shape)
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    mods.append(nn.Linear(d, num_classes))
    return FeedForward(nn.Sequential(*mods), in_shape)


def ff_cnn(in_shape=(1, 8, 8), num_classes=10, channels=16, blocks=2, groups=4, pool=2, norm="group",
           hidden: Optional[int] = None) -> FeedForward:
    """A small CNN of a size similar to ``conv_deq`` (deep-network baseline). ``norm="none"``
    drops the GroupNorm layers (interval bounds propagate through the rest: IBP training);
    ``hidden``: a fully connected ReLU layer of that width before the classifier."""
    if norm not in ("group", "none"):
        raise ConfigError(f"ff_cnn norm must be 'group' or 'none', got {norm!r}")
    if norm == "group" and channels % groups:
        raise ConfigError(f"channels ({channels}) must be divisible by groups ({groups})")
    mods = [nn.Conv2d(in_shape[0], channels, 3, padding=1), nn.ReLU()]
    for _ in range(blocks):
        mods += [nn.Conv2d(channels, channels, 3, padding=1)]
        mods += [nn.GroupNorm(groups, channels)] if norm == "group" else []
        mods += [nn.ReLU()]
    mods += [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
    feats = channels * pool * pool
    if hidden is not None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"ff_cnn hidden must be a positive int or None, got {hidden!r}")
        mods += [nn.Linear(feats, hidden), nn.ReLU()]
        feats = hidden
    mods.append(nn.Linear(feats, num_classes))
    return FeedForward(nn.Sequential(*mods), in_shape)


__all__ = ["build", "register", "FeedForward", "mlp_deq", "stem_deq", "conv_deq", "mdeq", "mdeq_single", "mon_deq",
           "weight_tied_mlp", "weight_tied_conv", "ff_mlp", "ff_cnn"]
