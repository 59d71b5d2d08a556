"""Multiscale convolutional DEQ cells in the style of MDEQ (Bai, Koltun, Kolter, "Multiscale
Deep Equilibrium Models", NeurIPS 2020), with a packed state that every solver and gradient estimator
of :mod:`robustdeq.deq` handles unchanged.

The state
---------
MDEQ keeps one feature map per resolution, ``z = (z_1, ..., z_n)``, ``z_i`` of shape
``(C_i, H_i, W_i)`` with ``H_{i+1} = ceil(H_i / 2)``. Here the branches are *packed* into one flat
tensor ``(B, D)``, ``D = sum_i C_i H_i W_i`` (:class:`PackedShape` packs and unpacks), so the
solvers (which work on ``(B, D)`` anyway), Anderson's least squares, the implicit gradient's adjoint
solve, warm starts, recorded trajectories and Jacobian penalties see one ordinary tensor. The
injection returns the packed ``u`` (same layout), the head unpacks ``z``.

The cell (per branch ``i``; every convolution weight-normalised, Salimans & Kingma 2016)::

    h_i  = relu(GN1_i(conv1_i(z_i) + u_i))                  3x3 conv, C_i -> C_i
    b_i  = conv2_i(h_i)                                     3x3 conv, C_i -> C_i
    m_i  = b_i + sum_{j != i} T_{j->i}(b_j)                 cross-resolution fusion
    f_i  = GN2_i(relu(m_i + u_i))

with ``T_{j->i}`` (``j < i``, downsampling) ``i - j`` stride-2 3x3 convolutions (ReLU between them)
and ``T_{j->i}`` (``j > i``, upsampling) a 1x1 convolution followed by nearest-neighbour
upsampling, as in MDEQ's fusion stage. ``n = 1`` is the single-scale variant (no fusion).

Why this arrangement converges (and MDEQ's residual block needs regularisation to)
---------------------------------------------------------------------------------
MDEQ's block normalises ``conv(z)`` alone and adds the identity ``z`` (``GN(relu(z + ...))``):
a GroupNorm of a function of ``z`` alone is invariant to the scale of that function, so no weight
scale makes the map contractive, and the identity path gives the Jacobian eigenvalues near 1; MDEQ
relies on Jacobian regularisation (Bai, Koltun, Kolter 2021) and still often stops at its iteration
budget. Here the injection enters *inside* both normalisations, so the normalising statistics are
dominated by ``u`` (the injection itself ends in a GroupNorm: unit scale) and
``Lip_z(f_i) ~ (gamma2 / sigma2) ||conv2|| (gamma1 / sigma1) ||conv1||`` plus the fusion terms:
the weight-norm magnitude ``g`` of each convolution (initialised at ``init_gain`` times the
default) sets the contraction rate directly, and there is no identity path. This is a design
argument, not a bound (``sigma`` depends on the data and the affine ``gamma`` s are trained);
whether trained models converge is *measured* (tests and benchmarks report the fraction of
samples reaching relative tolerance 1e-3 within 30 iterations, clean and under attack), and
training may add the Jacobian penalty (``jac_reg`` of the training objectives).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from ..errors import ConfigError, InputError
from .cells import Normalize

__all__ = ["PackedShape", "branch_shapes", "MultiscaleInjection", "MultiscaleCell", "MultiscaleHead"]


class PackedShape:
    """The layout of a packed multiscale state: branch ``i`` is ``(C_i, H_i, W_i)``.

    ``pack([z_1, ..., z_n]) -> (B, D)`` and ``unpack((B, D)) -> [z_1, ..., z_n]`` (views, no copy
    on unpack). Any tensor of shape ``(B, D)`` or ``(B, ...)`` with ``D`` features is accepted.
    """

    def __init__(self, shapes: Sequence[Tuple[int, int, int]]):
        if not shapes:
            raise ConfigError("a multiscale state needs at least one branch")
        self.shapes: List[Tuple[int, int, int]] = [tuple(int(v) for v in s) for s in shapes]
        if any(len(s) != 3 or min(s) < 1 for s in self.shapes):
            raise ConfigError(f"branch shapes must be positive (C, H, W) triples, got {shapes}")
        self.sizes = [int(math.prod(s)) for s in self.shapes]
        self.dim = int(sum(self.sizes))

    def unpack(self, z: Tensor) -> List[Tensor]:
        """The branches ``[z_1, ..., z_n]`` (views of shape (B, C_i, H_i, W_i)) of a packed
        state; an ``InputError`` if ``z`` does not have ``dim`` features per sample."""
        b = z.shape[0]
        flat = z.reshape(b, -1)
        if flat.shape[1] != self.dim:
            raise InputError(f"packed multiscale state has {flat.shape[1]} features per sample, "
                             f"expected {self.dim} (branches {self.shapes})")
        return [p.view(b, *s) for p, s in zip(torch.split(flat, self.sizes, dim=1), self.shapes)]

    def pack(self, parts: Sequence[Tensor]) -> Tensor:
        """The packed state (B, D) of the branches ``parts``; an ``InputError`` if their number
        or per-sample shapes do not match the layout."""
        if len(parts) != len(self.shapes):
            raise InputError(f"expected {len(self.shapes)} branches, got {len(parts)}")
        b = parts[0].shape[0]
        for p, s in zip(parts, self.shapes):
            if tuple(p.shape[1:]) != s:
                raise InputError(f"branch of shape {tuple(p.shape[1:])} where {s} was expected")
        return torch.cat([p.reshape(b, -1) for p in parts], dim=1)

    def __repr__(self) -> str:
        return f"PackedShape({self.shapes})"


def branch_shapes(in_hw: Tuple[int, int], channels: Sequence[int], stem_stride: int = 2
                  ) -> List[Tuple[int, int, int]]:
    """Branch ``i`` has ``channels[i]`` channels at the stem resolution halved ``i`` times
    (ceil, as a stride-2 3x3 convolution with padding 1 gives)."""
    if stem_stride not in (1, 2):
        raise ConfigError(f"stem_stride must be 1 or 2, got {stem_stride}")
    h, w = (int(v) for v in in_hw)
    if stem_stride == 2:
        h, w = (h + 1) // 2, (w + 1) // 2
    out = []
    for c in channels:
        out.append((int(c), h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


def _wn_conv(c_in: int, c_out: int, kernel: int, stride: int = 1, gain: float = 1.0,
             bias: bool = False) -> nn.Module:
    """A weight-normalised convolution ``W = g v / ||v||`` (per output channel) whose magnitude
    ``g`` starts at ``gain`` times PyTorch's default initialisation."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)
    conv = parametrizations.weight_norm(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(gain)
    return conv


def _check_groups(channels: Sequence[int], groups: int) -> None:
    for c in channels:
        if c % groups:
            raise ConfigError(f"every branch's channels must be divisible by groups ({groups}); got {list(channels)}")


class MultiscaleInjection(nn.Module):
    """``x -> u`` (packed): ``u_1 = GN(conv_s(normalize(x)))`` with a stride-``stem_stride``
    3x3 stem, ``u_{i+1} = GN(conv_2(relu(u_i)))`` (stride 2) for the lower resolutions."""

    def __init__(self, in_channels: int, layout: PackedShape, groups: int = 4, stem_stride: int = 2,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__()
        chans = [s[0] for s in layout.shapes]
        _check_groups(chans, groups)
        self.layout = layout
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, chans[0], 3, stride=stem_stride, padding=1)
        self.stem_norm = nn.GroupNorm(groups, chans[0])
        self.down = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1)
                                  for i in range(len(chans) - 1))
        self.down_norm = nn.ModuleList(nn.GroupNorm(groups, chans[i + 1]) for i in range(len(chans) - 1))

    def forward(self, x: Tensor) -> Tensor:
        """The packed injection ``u`` (B, D) of an image batch ``x``."""
        u = self.stem_norm(self.stem(self.normalize(x)))
        parts = [u]
        for conv, gn in zip(self.down, self.down_norm):
            u = gn(conv(F.relu(u)))
            parts.append(u)
        return self.layout.pack(parts)


class _Up(nn.Module):
    """1x1 convolution to the target channels, then nearest upsampling to the target size."""

    def __init__(self, c_in: int, c_out: int, size: Tuple[int, int], gain: float):
        super().__init__()
        self.conv = _wn_conv(c_in, c_out, 1, gain=gain)
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(x), size=self.size, mode="nearest")


def _down(c_in: int, c_out: int, hops: int, gain: float) -> nn.Module:
    mods: List[nn.Module] = []
    for k in range(hops):
        last = k == hops - 1
        mods.append(_wn_conv(c_in, c_out if last else c_in, 3, stride=2, gain=gain))
        if not last:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class MultiscaleCell(nn.Module):
    """``f(z, u)`` on packed multiscale states (see the module docstring for the equations).

    Args:
        layout: the branches' shapes (``len(layout.shapes) == 1``: the single-scale variant).
        groups: GroupNorm groups (every branch's channel count must be divisible by it).
        init_gain: initial weight-norm magnitude of every convolution, relative to PyTorch's
            default initialisation (smaller: more contractive at initialisation).
    """

    def __init__(self, layout: PackedShape, groups: int = 4, init_gain: float = 0.5):
        super().__init__()
        chans = [s[0] for s in layout.shapes]
        _check_groups(chans, groups)
        if not init_gain > 0:
            raise ConfigError(f"init_gain must be > 0, got {init_gain}")
        self.layout = layout
        self.n_branches = len(chans)
        self.conv1 = nn.ModuleList(_wn_conv(c, c, 3, gain=init_gain) for c in chans)
        self.conv2 = nn.ModuleList(_wn_conv(c, c, 3, gain=init_gain) for c in chans)
        self.gn1 = nn.ModuleList(nn.GroupNorm(groups, c) for c in chans)
        self.gn2 = nn.ModuleList(nn.GroupNorm(groups, c) for c in chans)
        # fuse[i][j]: branch j -> branch i (identity slot j == i is an empty Sequential, unused)
        self.fuse = nn.ModuleList()
        for i, (ci, hi, wi) in enumerate(layout.shapes):
            row = nn.ModuleList()
            for j, (cj, _, _) in enumerate(layout.shapes):
                if j == i:
                    row.append(nn.Identity())
                elif j < i:
                    row.append(_down(cj, ci, i - j, init_gain))
                else:
                    row.append(_Up(cj, ci, (hi, wi), init_gain))
            self.fuse.append(row)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        """``f(z, u)`` on packed states (see the module); the output has the shape of ``z``."""
        zs, us = self.layout.unpack(z), self.layout.unpack(u)
        bs = [self.conv2[i](F.relu(self.gn1[i](self.conv1[i](zs[i]) + us[i])))
              for i in range(self.n_branches)]
        out = []
        for i in range(self.n_branches):
            m = bs[i]
            for j in range(self.n_branches):
                if j != i:
                    m = m + self.fuse[i][j](bs[j])
            out.append(self.gn2[i](F.relu(m + us[i])))
        return self.layout.pack(out).view(z.shape)

    def init_state(self, u: Tensor) -> Tensor:
        """The zero state, shaped like ``u``."""
        return torch.zeros_like(u)

    def maskable(self) -> List[str]:
        """The names of the cell's convolution weights (4-D parameters); under weight
        normalisation the direction ``v``, not the per-filter magnitude ``g``."""
        from .cells import _weight_norm_magnitudes
        skip = _weight_norm_magnitudes(self)
        return [n for n, p in self.named_parameters() if p.dim() == 4 and n not in skip]


class MultiscaleHead(nn.Module):
    """Average-pool every branch to ``pool x pool``, concatenate, linear."""

    def __init__(self, layout: PackedShape, num_classes: int, pool: int = 2):
        super().__init__()
        self.layout, self.pool = layout, int(pool)
        feats = sum(s[0] for s in layout.shapes) * self.pool * self.pool
        self.linear = nn.Linear(feats, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        """Logits (B, num_classes) of a packed state ``z``."""
        parts = self.layout.unpack(z)
        return self.linear(torch.cat([F.adaptive_avg_pool2d(p, self.pool).flatten(1) for p in parts], dim=1))
