"""A shrinking-batch driver of robustdeq's steppable solvers (warm-started attack solves).

``Solver.solve`` iterates the whole batch until its slowest sample stops, evaluating ``f`` on
samples that converged long ago. :func:`solve_shrinking` drives the same solver through its
``init``/``step`` protocol and, whenever at most ``min_fraction`` of the samples in the state are
still active, writes the stopped samples' results out and slices the solver state down to the
active ones with ``Solver.select`` (every per-sample tensor, the quasi-Newton memory included); ``f`` is rebuilt
for the remaining samples by ``make_f(index)``. The per-sample results are those of
``Solver.solve`` (same iterates, flags, residuals and ``select`` rule): a sample's iteration never
depends on other samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..config import Select

MakeF = Callable[[Optional[Tensor]], Callable[[Tensor], Tensor]]


@dataclass
class ShrinkResult:
    """What :func:`solve_shrinking` returns: per-sample results as ``Solver.solve`` gives them,
    with the cost (``nfe`` batch evaluations, ``work`` sample evaluations)."""

    z: Tensor            # (B, ...) returned iterate (shape of z0)
    residual: Tensor     # (B,)
    converged: Tensor    # (B,) bool
    diverged: Tensor     # (B,) bool
    steps: Tensor        # (B,) evaluations per sample
    nfe: int             # solver iterations (batch evaluations of f, of shrinking size)
    work: int            # sum over iterations of the number of samples evaluated


def solve_shrinking(solver, make_f: MakeF, z0: Tensor, *, min_fraction: float = 0.25,
                    min_batch: int = 8) -> ShrinkResult:
    """Solve ``z = f(z)`` for a batch with ``solver``, shrinking the batch as samples stop.

    ``make_f(None)`` is ``f`` on the whole batch, ``make_f(idx)`` on the samples ``idx`` (a long
    tensor of indices into the batch). Batches smaller than ``min_batch`` are not shrunk (little
    to gain, and it keeps the batch size clear of the solver's own memory sizes).
    """
    cfg = solver.config
    b = z0.shape[0]
    dev = z0.device
    flat = z0.reshape(b, -1)
    out_z = torch.empty_like(flat)
    out_res = torch.empty(b, dtype=flat.dtype, device=dev)
    out_conv = torch.zeros(b, dtype=torch.bool, device=dev)
    out_div = torch.zeros(b, dtype=torch.bool, device=dev)
    out_steps = torch.zeros(b, dtype=torch.long, device=dev)
    idx = torch.arange(b, device=dev)
    f = make_f(None)
    state = solver.init(f, z0)
    nfe = work = 0
    shrink = b >= min_batch

    def store(st, rows: Tensor, where: Tensor) -> None:
        if cfg.select == Select.BEST:
            has_best = torch.isfinite(st.best_res[rows])
            z = torch.where(has_best[:, None], st.best_z[rows], st.last_z[rows])
            res = torch.where(has_best, st.best_res[rows], st.last_res[rows])
        else:
            z, res = st.last_z[rows], st.last_res[rows]
        out_z[where] = z
        out_res[where] = res
        out_conv[where] = st.converged[rows]
        out_div[where] = st.diverged[rows]
        out_steps[where] = st.steps[rows]

    for _ in range(cfg.max_iter):
        work += int(idx.numel())
        state = solver.step(f, state)
        nfe += 1
        n_act = state.n_active
        if n_act == 0:
            break
        n = int(idx.numel())
        if shrink and n_act <= min_fraction * n:
            active = state.active
            done = (~active).nonzero()[:, 0]
            store(state, done, idx[done])
            keep = active.nonzero()[:, 0]
            state = solver.select(state, keep)
            idx = idx[keep]
            f = make_f(idx)
    rows = torch.arange(idx.numel(), device=dev)
    store(state, rows, idx)
    return ShrinkResult(z=out_z.view(z0.shape), residual=out_res, converged=out_conv,
                        diverged=out_div, steps=out_steps, nfe=nfe, work=work)


__all__ = ["solve_shrinking", "ShrinkResult"]
