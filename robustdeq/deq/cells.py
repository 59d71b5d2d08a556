"""Cells ``f(z, u)``, injections ``x -> u`` and heads ``z -> logits``.

Every cell has ``forward(z, u) -> z_next`` (same shape as ``z``), ``init_state(u) -> z0``
(zeros), and ``maskable()``: the names of its weight tensors that per-depth sparse masks of
weight-tied models may act on. A cell may also have ``bind_input(u) -> (z -> f(z, u))``, a
cheaper map for the evaluations of one solve without autograd (same values as the module call).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from ..errors import ConfigError

_NORMS = ("none", "weight", "spectral", "interval")


def _has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward (pre-)hooks, its own or global ones."""
    from torch.nn.modules import module as _m
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(_m, "_global_forward_hooks", None) or getattr(_m, "_global_forward_pre_hooks", None))


def _affine(z: Tensor, u: Tensor, W: Tensor) -> Tensor:
    """``W z + u`` (one fused operation where ``z`` and ``u`` are matching (B, D) batches)."""
    if z.dim() == 2 and u.shape == z.shape:
        return torch.addmm(u, z, W.t())
    return F.linear(z, W) + u


def cell_map(cell: nn.Module, u: Tensor) -> Callable[[Tensor], Tensor]:
    """``z -> cell(z, u)`` for the evaluations of one solve without autograd: the cell's
    ``bind_input(u)`` where it has one (the same values, cheaper per evaluation), else the
    module call."""
    bind = getattr(cell, "bind_input", None)
    return bind(u) if callable(bind) else (lambda z: cell(z, u))


class IntervalScaling(nn.Module):
    """Weight parameterisation ``W = D^{-1/2} V D^{-1/2}``, ``D = diag(max(r_i, c_i))`` with ``r``,
    ``c`` the row and column sums of ``|V|``: by the Schur test (with the vector ``sqrt(d)``)
    ``|| |W| ||_2 <= sqrt(max_i r_i / d_i * max_j c_j / d_j) <= 1``, so ``scale * W`` has
    ``rho(|W|) <= || |W| ||_2 <= scale``: the interval map of ``act(W z + u)`` is a contraction and
    its interval fixed point exists and is unique (see :mod:`robustdeq.certify.interval`). A
    variant of the diagonal rescaling of IBP-MonDEQ (Wei & Kolter, ICLR 2022), which divides by
    the mean of ``r`` and ``c`` to make ``I - |W|`` strongly monotone; the maximum bounds the
    norm instead, so that plain interval iteration converges."""

    def forward(self, V: Tensor) -> Tensor:
        """The rescaled weight ``D^{-1/2} V D^{-1/2}`` of the raw parameter ``V`` (square)."""
        A = V.abs()
        d = torch.maximum(A.sum(1), A.sum(0)).clamp_min(1e-12)
        s = d.rsqrt()
        return V * s[:, None] * s[None, :]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model (inputs stay in [0, 1]).

    ``mean`` and ``std`` are float64 buffers (cast to the input's dtype in ``forward``), so a model
    converted with ``.double()`` normalises with the exact values it was built with, not with their
    float32 roundings."""

    def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float64).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float64).view(1, -1, 1, 1))

    def _apply(self, fn, recurse=True):
        # keep the statistics in float64 through .float() / .half() (a device move still applies)
        mean, std = self.mean, self.std
        out = super()._apply(fn, recurse)
        if self.mean.dtype != torch.float64:
            self.mean = mean.to(device=self.mean.device)
            self.std = std.to(device=self.std.device)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` per channel for an image batch (B, C, H, W); for inputs of any
        other rank the first channel's ``mean`` and ``std`` are applied to every entry."""
        if x.dim() == 4:
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return (x - self.mean.flatten()[0].to(x.dtype)) / self.std.flatten()[0].to(x.dtype)


def _apply_norm(layer: nn.Module, norm: str, name: str = "weight") -> nn.Module:
    if norm not in _NORMS:
        raise ConfigError(f"unknown weight normalisation {norm!r}; expected one of {', '.join(_NORMS)}")
    if norm == "weight":
        return parametrizations.weight_norm(layer, name=name)
    if norm == "spectral":
        return parametrizations.spectral_norm(layer, name=name)
    if norm == "interval":
        from torch.nn.utils import parametrize
        w = getattr(layer, name)
        if w.dim() != 2 or w.shape[0] != w.shape[1]:
            raise ConfigError("norm='interval' applies to a square fully connected weight (MLPCell), "
                              f"not to a weight of shape {tuple(w.shape)}")
        parametrize.register_parametrization(layer, name, IntervalScaling())
    return layer


def _weight_norm_magnitudes(module: nn.Module) -> set:
    """Names of the magnitude parameters ``g`` of ``module``'s weight-normalised layers
    (``parametrizations.weight.original0``, Salimans & Kingma 2016's ``w = g v / ||v||``)."""
    out = set()
    for name, mod in module.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is not None and "weight" in plist and any(
                type(p).__name__ == "_WeightNorm" for p in plist["weight"]):
            out.add(f"{name}.parametrizations.weight.original0" if name else
                    "parametrizations.weight.original0")
    return out


class ScaledLinear(nn.Module):
    """``y = scale * W x`` with an optional spectral normalisation of W.

    PyTorch's spectral normalisation divides by a power-iteration *estimate* of ``||W||_2`` (a lower
    bound), so ``||scale W||_2`` is only approximately ``scale`` (it converges during training);
    certificates recompute the exact norm and never rely on it."""

    def __init__(self, dim: int, norm: str = "none", scale: float = 1.0, init_gain: float = 0.5):
        super().__init__()
        lin = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():  # start at spectral norm init_gain: a contraction
            lin.weight.mul_(init_gain / torch.linalg.matrix_norm(lin.weight, ord=2))
        self.linear = _apply_norm(lin, norm)
        self.norm = norm
        self.scale = float(scale)

    @property
    def weight(self) -> Tensor:
        """The effective weight ``scale * W`` (after the normalisation, if any)."""
        w = self.linear.weight
        return w if self.scale == 1.0 else self.scale * w

    def forward(self, z: Tensor) -> Tensor:
        """``scale * W z`` for a batch ``z`` (B, dim)."""
        return F.linear(z, self.weight)


class MLPCell(nn.Module):
    """``f(z, u) = act(W z + u)``, act in {tanh, relu}; ``Lip_z(f) <= ||W||_2`` (act is 1-Lipschitz).

    ``norm="spectral"`` with ``scale < 1`` makes the cell a contraction by construction (the
    Lipschitz-constrained model of the certification table). ``norm="interval"`` with
    ``scale < 1`` bounds ``|| |W| ||_2 <= scale`` (:class:`IntervalScaling`): the cell and its
    interval map are contractions (IBP training, :mod:`robustdeq.defenses.certified`).
    """

    def __init__(self, hidden: int, act: str = "tanh", norm: str = "none", scale: float = 1.0,
                 init_gain: float = 0.5):
        super().__init__()
        if act not in ("tanh", "relu"):
            raise ConfigError(f"unknown activation {act!r}; expected 'tanh' or 'relu'")
        self.hidden, self.act = hidden, act
        self.W = ScaledLinear(hidden, norm=norm, scale=scale, init_gain=init_gain)

    def _pre(self, z: Tensor, u: Tensor) -> Tensor:
        return _affine(z, u, self.W.weight)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        """``act(W z + u)`` for a state ``z`` and an injection ``u``, both (B, hidden)."""
        pre = self._pre(z, u)
        return torch.tanh(pre) if self.act == "tanh" else F.relu(pre)

    def bind_input(self, u: Tensor) -> Callable[[Tensor], Tensor]:
        """``z -> f(z, u)`` for one solve (fixed ``u``, fixed weights): the same values as
        ``self(z, u)``, with the weight read once instead of at every evaluation and without the
        module call per evaluation (on small batches that call costs more than the cell's
        arithmetic). A subclass that changes the map, or a cell with forward hooks, gets the
        plain module call."""
        if not self.has_vjp or _has_forward_hooks(self):
            return lambda z: self(z, u)
        W = self.W.weight
        act = torch.tanh if self.act == "tanh" else F.relu
        return lambda z: act(_affine(z, u, W))

    @property
    def has_vjp(self) -> bool:
        """Whether :meth:`vjp_at` is this cell's Jacobian (not a subclass's changed map)."""
        cls = type(self)
        return cls.forward is MLPCell.forward and cls._pre is MLPCell._pre

    def register_vjp_hook(self, hook: Callable[[str], None]):
        """Call ``hook("vjp_at")`` each time :meth:`vjp_at` builds a closed-form VJP (it evaluates
        the pre-activation once) and ``hook("vjp")`` each time one is applied: cost accounting
        (:class:`robustdeq.deq.jiio.CostCounter`). Returns a handle with ``remove()``."""
        import collections
        import torch.utils.hooks as hooks
        if "_vjp_hooks" not in self.__dict__:
            self.__dict__["_vjp_hooks"] = collections.OrderedDict()
        handle = hooks.RemovableHandle(self.__dict__["_vjp_hooks"])
        self.__dict__["_vjp_hooks"][handle.id] = hook
        return handle

    def _notify_vjp(self, kind: str) -> None:
        for hook in list(self.__dict__.get("_vjp_hooks", {}).values()):
            hook(kind)

    def vjp_at(self, z: Tensor, u: Tensor) -> Callable[[Tensor, Optional[Tensor]], Tensor]:
        """``(a, c) -> J^T a + c`` with ``J = df/dz`` at ``(z, u)``, in closed form
        (``J^T a = W^T (act'(W z + u) * a)``) and without autograd: the vector-Jacobian product of
        adjoint solves (implicit gradients). ``c`` may be None."""
        notify = self._notify_vjp if self.__dict__.get("_vjp_hooks") else None
        if notify is not None:
            notify("vjp_at")
        with torch.no_grad():
            W = self.W.weight.detach()
            pre = self._pre(z.detach(), u.detach())
            if self.act == "tanh":
                d = 1 - torch.tanh(pre).square()
            else:
                d = (pre > 0).to(pre.dtype)

        def vjp(a: Tensor, c: Optional[Tensor] = None) -> Tensor:
            if notify is not None:
                notify("vjp")
            if c is None:
                return (a * d) @ W
            return torch.addmm(c, a * d, W)
        return vjp

    def init_state(self, u: Tensor) -> Tensor:
        """The zero state (B, hidden) in the dtype and on the device of ``u``."""
        return torch.zeros(u.shape[0], self.hidden, dtype=u.dtype, device=u.device)

    def maskable(self) -> List[str]:
        """The names of the cell's matrix-shaped parameters (the masks of weight-tied models);
        under weight normalisation the direction ``v``, not the magnitude ``g`` (a mask over
        ``g`` would switch off whole rows of ``W``)."""
        skip = _weight_norm_magnitudes(self)
        return [n for n, p in self.named_parameters() if p.dim() >= 2 and n not in skip]

    def weight_matrix(self) -> Tensor:
        """The effective W (for certificates)."""
        return self.W.weight


class MLPInjection(nn.Module):
    """``u = U normalize(flatten(x)) + b``."""

    def __init__(self, in_features: int, hidden: int, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.normalize = Normalize((mean,), (std,))
        self.linear = nn.Linear(in_features, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """``u`` (B, hidden) of an input batch ``x`` (flattened after normalisation)."""
        return self.linear(self.normalize(x).flatten(1))


class ConvStemInjection(nn.Module):
    """``u = U flatten(pool(stem(normalize(x)))) + b``: a convolutional feature extractor (3x3
    convolutions with ReLU, then average pooling to ``pool x pool``) before the affine map into
    the equilibrium layer, so that a fully connected cell works on convolutional features (as the
    explicit CNN's hidden layer does). Every layer has an interval rule, so IBP propagates the input
    box through the stem (:mod:`robustdeq.certify.interval`); the stem is not affine, so no
    Lipschitz bound of the injection is claimed for it."""

    def __init__(self, in_shape: Sequence[int], hidden: int, channels: int = 16, blocks: int = 1,
                 pool: int = 7, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__()
        if len(in_shape) != 3:
            raise ConfigError(f"a convolutional stem needs in_shape (C, H, W), got {tuple(in_shape)}")
        for k, v in (("channels", channels), ("pool", pool), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k} must be a positive int, got {v!r}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ConfigError(f"blocks must be an int >= 0, got {blocks!r}")
        self.normalize = Normalize(tuple(mean), tuple(std))
        mods: List[nn.Module] = [nn.Conv2d(int(in_shape[0]), channels, 3, padding=1), nn.ReLU()]
        for _ in range(blocks):
            mods += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        mods += [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
        self.stem = nn.Sequential(*mods)
        self.linear = nn.Linear(channels * pool * pool, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """``u`` (B, hidden) of an image batch ``x`` (B, C, H, W)."""
        return self.linear(self.stem(self.normalize(x)))


class LinearHead(nn.Module):
    """Flatten, linear: ``z -> logits``."""

    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(hidden, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        """Logits (B, num_classes) of a state ``z`` (flattened first)."""
        return self.linear(z.flatten(1))


class ConvCell(nn.Module):
    """MDEQ-style residual block with GroupNorm::

        h = relu(GN1(conv1(z)));  h = GN2(conv2(h) + u);  f(z, u) = GN3(relu(z + h))

    ``norm``: optional weight or spectral normalisation of both convolutions.
    """

    def __init__(self, channels: int, groups: int = 4, kernel: int = 3, norm: str = "none",
                 init_gain: float = 0.5):
        super().__init__()
        if channels % groups:
            raise ConfigError(f"channels ({channels}) must be divisible by groups ({groups})")
        pad = kernel // 2
        c1 = nn.Conv2d(channels, channels, kernel, padding=pad, bias=False)
        c2 = nn.Conv2d(channels, channels, kernel, padding=pad, bias=False)
        with torch.no_grad():
            c1.weight.mul_(init_gain)
            c2.weight.mul_(init_gain)
        self.conv1, self.conv2 = _apply_norm(c1, norm), _apply_norm(c2, norm)
        self.gn1 = nn.GroupNorm(groups, channels, affine=True)
        self.gn2 = nn.GroupNorm(groups, channels, affine=True)
        self.gn3 = nn.GroupNorm(groups, channels, affine=True)
        self.channels = channels

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        """The residual block above applied to ``z`` with injection ``u`` (both (B, C, H, W))."""
        h = F.relu(self.gn1(self.conv1(z)))
        h = self.gn2(self.conv2(h) + u)
        return self.gn3(F.relu(z + h))

    def init_state(self, u: Tensor) -> Tensor:
        """The zero state, shaped like ``u``."""
        return torch.zeros_like(u)

    def maskable(self) -> List[str]:
        """The names of the cell's convolution weights (4-D parameters); under weight
        normalisation the direction ``v``, not the per-filter magnitude ``g``."""
        skip = _weight_norm_magnitudes(self)
        return [n for n, p in self.named_parameters() if p.dim() == 4 and n not in skip]


class ConvInjection(nn.Module):
    """Normalise, then one 3x3 convolution to ``channels``: ``x -> u``."""

    def __init__(self, in_channels: int, channels: int, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,)):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``u`` (B, channels, H, W) of an image batch ``x`` (B, in_channels, H, W)."""
        return self.conv(self.normalize(x))


class ConvHead(nn.Module):
    """Average-pool to ``pool x pool``, flatten, linear."""

    def __init__(self, channels: int, num_classes: int, pool: int = 2):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        """Logits (B, num_classes) of a state ``z`` (B, channels, H, W)."""
        return self.linear(F.adaptive_avg_pool2d(z, self.pool).flatten(1))


class MonotoneCell(nn.Module):
    """Monotone operator DEQ cell (Winston & Kolter, NeurIPS 2020), fully connected.

    The equilibrium is ``z = relu(W z + u)`` with ``W = (1 - m) I - A^T A + B - B^T`` so that
    ``I - W >= m I``: the fixed point exists and is unique for every ``u``. The cell's map is the
    forward-backward splitting step (same fixed points)::

        f(z, u) = relu((1 - a) z + a (W z + u)),   a = m / ||I - W||_2^2

    which is a contraction with rate ``sqrt(1 - 2 a m + a^2 ||I - W||^2) < 1``: any solver converges
    from any start. Call :meth:`prepare` after the weights change (``DEQClassifier.run`` does).
    """

    def __init__(self, hidden: int, m: float = 1.0, alpha: Optional[float] = None):
        super().__init__()
        if m <= 0:
            raise ConfigError(f"MonotoneCell.m must be > 0, got {m}")
        self.hidden, self.m = hidden, float(m)
        self.A = nn.Parameter(torch.randn(hidden, hidden) / math.sqrt(hidden) * 0.5)
        self.B = nn.Parameter(torch.randn(hidden, hidden) / math.sqrt(hidden) * 0.5)
        self.fixed_alpha = alpha
        self._alpha: Optional[float] = alpha

    def W(self) -> Tensor:
        """The matrix ``W = (1 - m) I - A^T A + B - B^T`` (``I - W >= m I`` for every ``A``,
        ``B``), with autograd to ``A`` and ``B``."""
        eye = torch.eye(self.hidden, dtype=self.A.dtype, device=self.A.device)
        return (1 - self.m) * eye - self.A.t() @ self.A + self.B - self.B.t()

    def operator_norm(self) -> float:
        """``||I - W||_2`` (exact, by SVD)."""
        with torch.no_grad():
            eye = torch.eye(self.hidden, dtype=self.A.dtype, device=self.A.device)
            return float(torch.linalg.matrix_norm(eye - self.W(), ord=2))

    def prepare(self) -> None:
        """Recompute the splitting step ``alpha = m / ||I - W||_2^2`` from the current weights
        (the fixed ``alpha`` given to the constructor, if any, is kept). Call it after the
        weights change; ``DEQClassifier.solve`` does before every solve."""
        if self.fixed_alpha is None:
            L = self.operator_norm()
            self._alpha = self.m / (L * L)
        else:
            self._alpha = self.fixed_alpha

    @property
    def alpha(self) -> float:
        """The step ``a`` of the splitting map, computed by :meth:`prepare` on first use (it is
        not refreshed automatically when the weights change)."""
        if self._alpha is None:
            self.prepare()
        return self._alpha

    def contraction_rate(self) -> float:
        """Upper bound on ``Lip_z`` of the splitting map (sound: exact norms)."""
        a, L = self.alpha, self.operator_norm()
        return math.sqrt(max(0.0, 1 - 2 * a * self.m + a * a * L * L))

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        """One forward-backward splitting step ``relu((1 - a) z + a (W z + u))``."""
        a = self.alpha
        W = self.W().to(z.dtype)
        return F.relu((1 - a) * z + a * (F.linear(z, W) + u))

    def init_state(self, u: Tensor) -> Tensor:
        """The zero state (B, hidden) in the dtype and on the device of ``u``."""
        return torch.zeros(u.shape[0], self.hidden, dtype=u.dtype, device=u.device)

    def maskable(self) -> List[str]:
        """``["A", "B"]``: the parameters ``W`` is built from."""
        return ["A", "B"]


class LinearCell(nn.Module):
    """``f(z, u) = A z + u`` with a fixed or trainable square matrix ``A`` (D, D): the linear
    cell whose fixed point, Jacobian and Lipschitz constants are known in closed form
    (:func:`robustdeq.certify.oracles.linear_deq`)."""

    act = "identity"

    def __init__(self, A: Tensor, trainable: bool = False):
        super().__init__()
        if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ConfigError(f"LinearCell needs a square matrix A, got {getattr(A, 'shape', A)!r}")
        self.hidden = int(A.shape[0])
        if trainable:
            self.A = nn.Parameter(A.clone())
        else:
            self.register_buffer("A", A.clone())

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        """``A z + u`` (``A`` cast to the dtype of ``z``)."""
        return torch.nn.functional.linear(z, self.A.to(z.dtype)) + u

    def weight_matrix(self) -> Tensor:
        """The matrix ``A`` (for certificates)."""
        return self.A

    def init_state(self, u: Tensor) -> Tensor:
        """The zero state (B, D) in the dtype and on the device of ``u``."""
        return torch.zeros(u.shape[0], self.hidden, dtype=u.dtype, device=u.device)

    def maskable(self) -> List[str]:
        """No maskable parameters (``[]``): ``A`` is fixed or a single matrix."""
        return []


#: The classes certificates recognise a part as (and bound by its weights), each with the methods
#: whose computation such a bound stands for: the map itself, and what the bound reads instead of
#: calling it (``weight_matrix``, ``W``, ``alpha``) or the solves call instead (``bind_input``). A
#: subclass overriding one of them computes another function, which the bound of its base class
#: need not cover. (A parametrised layer, e.g. a spectrally normalised Linear, keeps its class's
#: methods.) The feed-forward interval rules check torch's layers the same way.
CERTIFIED_PARTS = {
    MLPCell: ("forward", "_pre", "bind_input", "weight_matrix"),
    MonotoneCell: ("forward", "bind_input", "W", "alpha"),
    LinearCell: ("forward", "bind_input", "weight_matrix"),
    ConvCell: ("forward", "bind_input"),
    MLPInjection: ("forward",),
    ConvStemInjection: ("forward",),
    LinearHead: ("forward",),
    Normalize: ("forward",),
    nn.Linear: ("forward",),
    nn.Conv1d: ("forward", "_conv_forward"),
    nn.Conv2d: ("forward", "_conv_forward"),
    nn.Conv3d: ("forward", "_conv_forward"),
    nn.Flatten: ("forward",),
    nn.Identity: ("forward",),
}


def overridden(module: nn.Module, base: type, names: Sequence[str]) -> List[str]:
    """The methods (or properties) among ``names`` that ``type(module)`` does not take from
    ``base`` (``MLPCell.has_vjp``'s test of "not a changed map", by name)."""
    cls = type(module)
    return [n for n in names if getattr(cls, n, None) is not getattr(base, n, None)]


def changed_part(module: nn.Module) -> Optional[str]:
    """Why ``module``, an instance of a class of :data:`CERTIFIED_PARTS`, does not compute that
    class's map (a subclass overriding one of its methods there, named), or None when it does
    (or is not such an instance). The certificates recognise a part by this test, not by
    ``isinstance`` alone: a bound of the base class would be a certificate for another function."""
    for base, names in CERTIFIED_PARTS.items():
        if isinstance(module, base):
            bad = overridden(module, base, names)
            if not bad:
                return None
            mod = "nn." if base.__module__.startswith("torch.") else ""
            return (f"{type(module).__name__} subclasses {mod}{base.__name__} but overrides {', '.join(bad)}, "
                    f"so a bound of {mod}{base.__name__} need not hold for what it computes")
    return None


__all__ = ["Normalize", "ScaledLinear", "IntervalScaling", "MLPCell", "MLPInjection", "ConvStemInjection", "LinearHead", "ConvCell",
           "ConvInjection", "ConvHead", "MonotoneCell", "LinearCell", "CERTIFIED_PARTS", "overridden", "changed_part"]
