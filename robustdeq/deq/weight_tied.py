"""Weight-tied explicit models with per-depth sparse masks (Song, Majumder, Lin 2023).

``z_{l+1} = f(z_l, u; W ⊙ M_l)``: the same cell applied ``depth`` times explicitly, each depth
``l`` with its own fixed random binary mask ``M_l`` over the shared weights (sparsity = fraction of
zeros, drawn once at construction from ``seed``). Trained by plain backpropagation. It exposes the
``DEQClassifier`` interface: ``forward``, ``run`` (its layer outputs are its trajectory: state
``k`` is ``z_k``, ``z_0`` the initial zeros), ``readout``, ``unroll``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from .grad import FullBackprop, GradientEstimator, NoGrad, make_estimator
from .model import Equilibrium, EquilibriumModel, SolverStats
from .solvers import TrajectoryState


class WeightTied(EquilibriumModel):
    """The cell applied ``depth`` times explicitly, layer ``l`` with its own sparse mask (see module).

    Args:
        injection, cell, head: as :class:`~robustdeq.deq.model.DEQClassifier`; the cell's
            ``maskable()`` parameters are masked.
        depth: number of layers (applications of the cell).
        sparsity: fraction of zeros of each layer's mask, in [0, 1).
        seed: seed of the masks, drawn once here.
        input_shape, validate_inputs: as :class:`~robustdeq.deq.model.DEQClassifier`.
        grad: ``FullBackprop`` (None, the default) or ``NoGrad``; other estimators are a
            ``ConfigError``.
    """

    def __init__(self, injection: nn.Module, cell: nn.Module, head: nn.Module, *, depth: int = 8,
                 sparsity: float = 0.0, seed: int = 0, input_shape: Optional[Tuple[int, ...]] = None,
                 validate_inputs: bool = True, grad: Union[GradientEstimator, str, None] = None):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"WeightTied.depth must be >= 1, got {depth}")
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"WeightTied.sparsity must be in [0, 1), got {sparsity}")
        self.injection, self.cell, self.head = injection, cell, head
        self.depth, self.sparsity = int(depth), float(sparsity)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.validate_inputs = validate_inputs
        self.grad = make_estimator(grad) if grad is not None else FullBackprop()
        self.check_estimator(self.grad)
        self._grad_stack: List[GradientEstimator] = []
        self.masked_names = list(cell.maskable())
        gen = torch.Generator().manual_seed(seed)
        params = dict(cell.named_parameters())
        for l in range(self.depth):
            for name in self.masked_names:
                p = params[name]
                mask = (torch.rand(p.shape, generator=gen) >= self.sparsity).to(p.dtype)
                self.register_buffer(self._buf(l, name), mask)
        self.last_stats: Optional[SolverStats] = None

    @staticmethod
    def _buf(layer: int, name: str) -> str:
        return f"mask_{layer}__" + name.replace(".", "__")

    def mask(self, layer: int, name: str) -> Tensor:
        """The binary mask of layer ``layer`` over the cell parameter ``name``."""
        return getattr(self, self._buf(layer, name))

    def check_estimator(self, est: GradientEstimator) -> None:
        """``ConfigError`` unless ``est`` is ``FullBackprop`` or ``NoGrad``."""
        if not isinstance(est, (FullBackprop, NoGrad)):
            raise ConfigError(
                f"{type(est).__name__} does not apply to an explicit weight-tied model: its gradient "
                "is plain backpropagation (FullBackprop) or none (NoGrad)")

    def f_at(self, layer: int, z: Tensor, u: Tensor) -> Tensor:
        """The cell at depth ``layer`` (its masked weights)."""
        if not self.masked_names or self.sparsity == 0.0:
            return self.cell(z, u)
        params = dict(self.cell.named_parameters())
        masked = {n: params[n] * self.mask(layer, n) for n in self.masked_names}
        return functional_call(self.cell, masked, (z, u))

    def f(self, z: Tensor, u: Tensor) -> Tensor:
        """The unmasked shared cell (for diagnostics)."""
        return self.cell(z, u)

    def unroll(self, u: Tensor, z: Tensor, steps: int, damping: float = 1.0, start: int = 0) -> Tensor:
        """Layers ``start .. start+steps-1`` applied to ``z``."""
        for l in range(start, min(start + steps, self.depth)):
            fz = self.f_at(l, z, u)
            z = fz if damping == 1.0 else (1 - damping) * z + damping * fz
        return z

    def run(self, x: Tensor, *, record=None, z0: Optional[Tensor] = None, grad=None,
            solver=None) -> Equilibrium:
        """The ``depth`` layers from ``z0`` (default ``init_state(u)``) as an :class:`Equilibrium`:
        ``record`` ("none", "all", a layer index or a list of them) picks the layer outputs kept in
        the trajectory; ``stats.residual`` is the last layer's relative change; ``solver`` must be
        None (there is no solver)."""
        if solver is not None:
            raise ConfigError("a weight-tied model has no solver to configure")
        x = self.check_input(x)
        est = make_estimator(grad) if grad is not None else self.estimator
        self.check_estimator(est)
        if isinstance(record, str):
            if record not in ("none", "all"):
                raise ConfigError(f"unknown record spec {record!r}")
            wanted = None if record == "all" else set()
        elif record is None:
            wanted = set()
        else:
            wanted = {record} if isinstance(record, int) else set(record)
            bad = [s for s in wanted if not 0 <= s <= self.depth]
            if bad:
                raise ConfigError(f"record steps {bad} outside 0..{self.depth}")
        u = self.inject(x)
        z = self.init_state(u) if z0 is None else z0
        ctx = torch.no_grad() if isinstance(est, NoGrad) else torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad()
        traj: List[TrajectoryState] = []
        b = x.shape[0]
        nan = torch.full((b,), float("nan"), device=x.device)
        ones = torch.ones(b, dtype=torch.bool, device=x.device)
        prev = z
        with ctx:
            for l in range(self.depth + 1):
                if wanted is None or l in wanted:
                    traj.append(TrajectoryState(l, z, nan, ones))
                if l == self.depth:
                    break
                prev, z = z, self.f_at(l, z, u)
            diff = (z - prev).flatten(1).norm(dim=1) / (z.flatten(1).norm(dim=1) + 1e-9)
        logits = self.readout(z)
        stats = SolverStats(residual=diff.detach(), steps=torch.full((b,), self.depth, device=x.device),
                            converged=ones, diverged=~ones, nfe=self.depth)
        self.last_stats = stats
        return Equilibrium(logits=logits, z=z, z_star=z.detach(), trajectory=traj, stats=stats, u=u)


__all__ = ["WeightTied"]
