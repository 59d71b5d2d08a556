"""Steppable, batched fixed-point solvers: fixed-point iteration, Anderson acceleration, Broyden.

Protocol (docs/ARCHITECTURE.md)::

    solver = get_solver(SolverConfig(name="anderson"))
    state = solver.init(f, z0)          # no evaluation of f yet
    state = solver.step(f, state)       # evaluates f at the current iterate z_k, proposes z_{k+1}
    result = solver.solve(f, z0, record="all")

``f`` maps a batch of states ``(B, ...)`` to ``(B, ...)`` and may change between steps (input
updates of inference-time defenses or of JIIO); call :meth:`Solver.reset` after a change to clear
the quasi-Newton memory and the convergence flags.

Semantics, stated once:

- the iterate with step index ``k`` is ``z_k`` (``z_0`` is the initial state); step ``k`` evaluates
  ``f(z_k)`` and measures its residual ``||f(z_k) - z_k||`` (absolute) or
  ``||f(z_k) - z_k|| / (||f(z_k)|| + eps)`` (relative), per sample;
- a sample whose residual reaches the tolerance is *frozen* at that iterate (per-sample convergence
  mask); a sample whose residual is non-finite or grows by ``divergence_factor`` is marked
  ``diverged`` and frozen at its last iterate; neither ever raises;
- ``max_iter`` bounds the number of evaluations of ``f`` (steps): a solve evaluates at most
  ``f(z_0), ..., f(z_{max_iter - 1})``. Every returned iterate has a measured residual;
  ``select="best"`` returns the lowest-residual iterate per sample, ``"last"`` the last
  evaluated one: without an early stop (``tol=0``) that is ``z_{max_iter - 1}``, not the last
  step's proposal ``z_{max_iter}`` (which is never evaluated, so never returned). ``k`` steps
  from ``z_0`` lead to ``z_k`` (``DEQClassifier.iterates(u, n)`` returns ``z_n``: what a solve
  with ``max_iter = n + 1``, ``tol = 0``, ``select="last"`` returns);
- a recorded trajectory state ``k`` holds, for each sample, what the solver holds at step ``k``: the
  raw iterate ``z_k`` (never a best-so-far estimate), or the frozen iterate for samples that stopped
  earlier (``TrajectoryState.active`` says which).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import registry as _registry
from ..config import Select, SolverConfig, StopMode, from_dict
from ..errors import ConfigError

logger = logging.getLogger(__name__)

Fn = Callable[[Tensor], Tensor]
RecordSpec = Union[None, str, int, Iterable[int]]


@dataclass
class TrajectoryState:
    """One recorded solver state: the iterate ``z`` with its step index and residual."""

    step: int
    z: Tensor            # (B, ...) the raw iterate z_step (frozen iterate for stopped samples)
    residual: Tensor     # (B,) residual of z (nan where it was not evaluated)
    active: Tensor       # (B,) bool: the sample was still being iterated at this step


@dataclass
class SolverState:
    """Everything a solver carries between steps (tensors are flattened to ``(B, D)``)."""

    z: Tensor                      # the iterate to evaluate next, z_step
    step: int                      # index of z
    shape: torch.Size
    best_z: Tensor
    best_res: Tensor
    best_step: Tensor
    last_z: Optional[Tensor] = None
    last_fz: Optional[Tensor] = None
    last_res: Optional[Tensor] = None
    res0: Optional[Tensor] = None
    div_thresh: Optional[Tensor] = None    # divergence_factor * (res0 + eps)
    div_min: float = math.inf              # float(div_thresh.min())
    converged: Optional[Tensor] = None
    diverged: Optional[Tensor] = None
    steps: Optional[Tensor] = None  # per-sample number of evaluations until it stopped
    nfe: int = 0
    memory: Dict[str, object] = field(default_factory=dict)
    residual_history: List[Tensor] = field(default_factory=list)
    active_mask: Optional[Tensor] = None   # (B,) ~(converged | diverged), kept up to date by step
    n_active: int = 0                      # int(active_mask.sum())

    @property
    def active(self) -> Tensor:
        """(B,) bool: samples still being iterated (neither converged nor diverged)."""
        if self.active_mask is None:
            return ~(self.converged | self.diverged)
        return self.active_mask

    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return self.z.shape[0]


@dataclass
class SolveResult:
    """The outcome of a solve. ``z`` has the shape of ``z0``; per-sample tensors have shape (B,)."""

    z: Tensor
    residual: Tensor
    converged: Tensor
    diverged: Tensor
    steps: Tensor                 # per-sample evaluations used (index of convergence + 1, or max)
    best_step: Tensor             # step index of the returned iterate when select="best"
    nfe: int
    trajectory: List[TrajectoryState]
    residual_history: Tensor      # (K, B) residual of z_k for k = 0..K-1
    select: Select
    fz: Optional[Tensor] = None   # f(z) of the last evaluated iterate (shape of z0)

    @property
    def converged_fraction(self) -> float:
        """Fraction of the batch that reached the tolerance (1.0 for an empty batch)."""
        return float(self.converged.float().mean()) if self.converged.numel() else 1.0


def _parse_record(record: RecordSpec, max_iter: int) -> Optional[set]:
    """None -> record nothing; "all" -> everything; ints -> those steps. Returns a set or ALL."""
    if record is None or (isinstance(record, str) and record == "none"):
        return set()
    if isinstance(record, str):
        if record == "all":
            return None
        raise ConfigError(f"unknown record spec {record!r}; expected 'none', 'all' or step indices")
    if isinstance(record, int):
        record = [record]
    steps = set()
    for s in record:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"record steps must be non-negative ints, got {s!r}")
        if s >= max_iter:
            raise ConfigError(f"record step {s} is beyond max_iter={max_iter} (steps 0..{max_iter - 1})")
        steps.add(s)
    return steps


def residual(z: Tensor, fz: Tensor, config: SolverConfig, g: Optional[Tensor] = None) -> Tensor:
    """Per-sample residual ``||f(z) - z||`` of ``(B, ...)`` states as ``config`` measures it
    (``stop_mode``: absolute, or relative to ``||f(z)||`` with the guard ``eps``); ``g = fz - z``
    if already computed."""
    b = z.shape[0]
    g = fz - z if g is None else g
    diff = torch.linalg.vector_norm(g if g.dim() == 2 else g.reshape(b, -1), dim=1)
    if config.stop_mode == StopMode.REL:
        fz2 = fz if fz.dim() == 2 else fz.reshape(b, -1)
        return diff.div_(torch.linalg.vector_norm(fz2, dim=1).add_(config.eps))
    return diff


def iterate_map(f: Fn, z: Tensor, config: SolverConfig,
                steps: int) -> Tuple[Tensor, Optional[Tensor], int]:
    """Plain fixed-point steps ``z <- f(z)`` from ``z``, at most ``steps``, stopping once every
    sample's residual (as ``config`` measures it, of the state a step started from) is within
    ``config.tol``: one evaluation of ``f`` per step and no solver bookkeeping (the cheap way on
    from a nearby fixed point of a contracting map). Returns ``(z, residual, steps taken)``; the
    residual is that of the last step's start (None when no step was taken)."""
    r: Optional[Tensor] = None
    k = 0
    for k in range(1, steps + 1):
        fz = f(z)
        r = residual(z, fz, config)
        z = fz
        if bool((r <= config.tol).all()):
            break
    return z, r, k


class Solver:
    """Base class: the bookkeeping shared by all solvers; subclasses implement :meth:`propose`.

    A solver with settings of its own declares them in :attr:`OPTIONS` (name -> default) and may
    check their values in :meth:`check_options`; they are given as
    ``SolverConfig(name=..., options={...})`` (an undeclared option is a ConfigError) and read
    with :meth:`option`.
    """

    name = "base"
    #: the solver's own options and their defaults (``SolverConfig.options``)
    OPTIONS: Dict[str, Any] = {}

    @classmethod
    def check_options(cls, options: Dict[str, Any]) -> None:
        """Raise a ConfigError for an invalid option value (the names are already checked)."""

    def option(self, name: str) -> Any:
        """The value of the solver option ``name``: the config's, else the declared default."""
        if name not in self.OPTIONS:
            raise ConfigError(f"solver {self.name!r} declares no option {name!r}")
        return self.config.options.get(name, self.OPTIONS[name])

    def __init__(self, config: Optional[SolverConfig] = None, **overrides):
        cfg = config if config is not None else SolverConfig(name=self.name)
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg

    # -- protocol -----------------------------------------------------------------------------
    def init(self, f: Fn, z0: Tensor) -> SolverState:
        """Start a solve at ``z0`` (B, ...). ``f`` is not evaluated until the first step."""
        if z0.dim() < 1:
            raise ConfigError("z0 must have a batch dimension")
        b = z0.shape[0]
        z = z0.reshape(b, -1)
        dev = z.device
        return SolverState(
            z=z, step=0, shape=z0.shape,
            best_z=z, best_res=torch.full((b,), float("inf"), device=dev, dtype=z.dtype),
            best_step=torch.zeros(b, dtype=torch.long, device=dev),
            converged=torch.zeros(b, dtype=torch.bool, device=dev),
            diverged=torch.zeros(b, dtype=torch.bool, device=dev),
            steps=torch.zeros(b, dtype=torch.long, device=dev),
            active_mask=torch.ones(b, dtype=torch.bool, device=dev), n_active=b,
        )

    def reset(self, state: SolverState) -> SolverState:
        """Forget the solver memory and convergence flags (after ``f`` changed). Keeps ``z``."""
        state.memory = {}
        state.converged = torch.zeros_like(state.converged)
        state.diverged = torch.zeros_like(state.diverged)
        state.active_mask = torch.ones_like(state.converged)
        state.n_active = state.batch_size
        state.best_res = torch.full_like(state.best_res, float("inf"))
        state.best_z = state.z
        state.res0 = None
        state.div_thresh = None
        return state

    #: keys of ``state.memory`` that hold per-sample entries, with their batch dimension
    #: (sliced by :meth:`select`); other entries are shared by the whole batch
    per_sample_memory: Dict[str, int] = {}

    def select(self, state: SolverState, keep: Tensor) -> SolverState:
        """A state for the samples ``keep`` (long indices into the batch) only, to continue the
        solve on fewer samples: every per-sample tensor, the solver memory included, is sliced;
        each kept sample then iterates exactly as it would have in the whole batch."""
        b = state.batch_size

        def cut(v, dim=0):
            if isinstance(v, Tensor) and v.dim() > dim and v.shape[dim] == b:
                return v.index_select(dim, keep)
            return v

        memory = {k: (cut(v, self.per_sample_memory[k]) if k in self.per_sample_memory else v)
                  for k, v in state.memory.items()}
        new = SolverState(
            z=state.z[keep], step=state.step,
            shape=torch.Size((int(keep.numel()),) + tuple(state.shape[1:])),
            best_z=cut(state.best_z), best_res=cut(state.best_res), best_step=cut(state.best_step),
            last_z=cut(state.last_z), last_fz=cut(state.last_fz), last_res=cut(state.last_res),
            res0=cut(state.res0), div_thresh=cut(state.div_thresh),
            converged=cut(state.converged), diverged=cut(state.diverged),
            steps=cut(state.steps), nfe=state.nfe, memory=memory,
            residual_history=[cut(r) for r in state.residual_history],
        )
        new.active_mask = ~(new.converged | new.diverged)
        new.n_active = int(new.active_mask.sum())
        if new.div_thresh is not None:
            new.div_min = float(new.div_thresh.min()) if new.div_thresh.numel() else math.inf
        return new

    def residual(self, z: Tensor, fz: Tensor, g: Optional[Tensor] = None) -> Tensor:
        """Per-sample residual of ``z`` given ``fz = f(z)`` (``g = fz - z`` if already computed)."""
        return residual(z, fz, self.config, g)

    def step(self, f: Fn, state: SolverState) -> SolverState:
        """Evaluate ``f(z_k)``, update the per-sample flags and the best iterate, propose z_{k+1}.

        The bookkeeping costs a few ``(B,)`` operations in the common case (every sample active,
        every residual finite, none stopping); the masks are applied only when needed."""
        cfg = self.config
        z = state.z
        b = z.shape[0]
        fz = f(z if z.shape == state.shape else z.view(state.shape))
        if fz.dim() != 2:
            fz = fz.reshape(b, -1)
        state.nfe += 1
        out = None
        if not torch.is_grad_enabled() and fz.dtype == z.dtype and fz.device == z.device:
            out = self.residual_buffer(state, z)
        g = fz - z if out is None else torch.sub(fz, z, out=out)
        res = self.residual(z, fz, g)
        if res.requires_grad:
            res = res.detach()
        lo, hi = (float(v) for v in torch.aminmax(res))   # NaN propagates to both
        all_finite = math.isfinite(hi)
        finite = None
        if not all_finite:
            finite = torch.isfinite(res)
            res = res.masked_fill(~finite, float("inf"))
        if state.active_mask is None:  # a state built by hand: derive the cached mask
            state.active_mask = ~(state.converged | state.diverged)
            state.n_active = int(state.active_mask.sum())
        full = state.n_active == b
        active_before = state.active_mask
        if state.res0 is None:
            state.res0 = res if all_finite else res.masked_fill(~finite, 1.0)
            state.div_thresh = None
        if state.div_thresh is None:
            state.div_thresh = cfg.divergence_factor * (state.res0 + cfg.eps)
            state.div_min = float(state.div_thresh.min())
        if cfg.select == Select.BEST:  # best iterate so far (frozen samples keep theirs)
            improved = res < state.best_res
            if not full:
                improved &= active_before
            if bool(improved.all()):
                state.best_z, state.best_res = z, res
                state.best_step = torch.full_like(state.best_step, state.step)
            else:
                state.best_z = torch.where(improved[:, None], z, state.best_z)
                state.best_res = torch.where(improved, res, state.best_res)
                state.best_step = state.best_step.masked_fill(improved, state.step)
        state.steps = (torch.full_like(state.steps, state.step + 1) if full
                       else state.steps.masked_fill(active_before, state.step + 1))
        state.last_z, state.last_fz, state.last_res = z, fz, res
        state.residual_history.append(res)
        if not (all_finite and lo > cfg.tol and hi <= state.div_min):  # some sample may stop
            conv_now = res <= cfg.tol
            stop = (conv_now | (res > state.div_thresh)) & active_before
            if bool(stop.any()):
                state.converged = state.converged | (stop & conv_now)
                state.diverged = state.diverged | (stop & ~conv_now)
                state.active_mask = active_before & ~stop
                state.n_active = int(state.active_mask.sum())
        n_active = state.n_active
        if n_active:
            if not all_finite:  # one diverged sample must not poison batched linear algebra
                z, fz, g = _sanitize(z, fz, g, finite)
            z_next = self.propose(state, z, fz, g)
            if n_active < b:
                z_next = torch.where(state.active_mask[:, None], z_next, state.last_z)
        else:
            z_next = z
        state.z = z_next
        state.step += 1
        return state

    def residual_buffer(self, state: SolverState, z: Tensor) -> Optional[Tensor]:
        """Where this step's ``g = f(z) - z`` may be written, (B, D), or None (a new tensor).
        Anderson hands out the memory slot that ``g`` goes to, saving a copy."""
        return None

    def propose(self, state: SolverState, z: Tensor, fz: Tensor, g: Tensor) -> Tensor:  # pragma: no cover
        """The next iterate from ``z``, ``fz = f(z)`` and ``g = fz - z`` (all (B, D), finite)."""
        raise NotImplementedError

    def finalize(self, state: SolverState, trajectory: Optional[List[TrajectoryState]] = None) -> SolveResult:
        """Package the state into a :class:`SolveResult` according to ``select``."""
        if state.last_z is None:
            raise ConfigError("finalize() needs at least one step")
        if self.config.select == Select.BEST:
            # diverged samples may never have had a finite residual: fall back to the last iterate
            has_best = torch.isfinite(state.best_res)
            z = torch.where(has_best[:, None], state.best_z, state.last_z)
            res = torch.where(has_best, state.best_res, state.last_res)
            best_step = state.best_step
        else:
            z, res = state.last_z, state.last_res
            best_step = torch.full_like(state.best_step, state.step - 1)
        hist = torch.stack(state.residual_history) if state.residual_history else torch.empty(0)
        return SolveResult(
            z=z.view(state.shape), residual=res, converged=state.converged.clone(),
            diverged=state.diverged.clone(), steps=state.steps.clone(), best_step=best_step,
            nfe=state.nfe, trajectory=trajectory or [], residual_history=hist,
            select=self.config.select, fz=state.last_fz.view(state.shape),
        )

    def solve(self, f: Fn, z0: Tensor, record: RecordSpec = None,
              callback: Optional[Callable[[SolverState], None]] = None) -> SolveResult:
        """Iterate until every sample converged or diverged, or ``max_iter`` evaluations (the
        last evaluated iterate is then ``z_{max_iter - 1}``; see the module's semantics).

        ``record``: ``None``/"none", "all", or step indices (ints < max_iter). Requested steps after
        the whole batch stopped are filled with the frozen iterates (no extra evaluations).
        """
        cfg = self.config
        wanted = _parse_record(record, cfg.max_iter)
        state = self.init(f, z0)
        traj: List[TrajectoryState] = []
        for _ in range(cfg.max_iter):
            k = state.step
            active_k = state.active
            state = self.step(f, state)
            if wanted is None or k in wanted:
                traj.append(TrajectoryState(k, state.last_z.view(state.shape), state.last_res, active_k))
            if callback is not None:
                callback(state)
            if not state.n_active:
                break
        if wanted:
            done = {t.step for t in traj}
            nan = torch.full_like(state.last_res, float("nan"))
            inactive = torch.zeros_like(state.converged)
            for k in sorted(wanted - done):
                if k < cfg.max_iter:
                    traj.append(TrajectoryState(k, state.last_z.view(state.shape), nan, inactive))
        return self.finalize(state, traj)


class FixedPointIteration(Solver):
    """z_{k+1} = (1 - tau) z_k + tau f(z_k), tau = ``damping``."""

    name = "fixed_point"

    def propose(self, state, z, fz, g):
        """The damped step ``(1 - tau) z + tau f(z)`` (``f(z)`` itself when ``tau = 1``)."""
        tau = self.config.damping
        return fz if tau == 1.0 else (1 - tau) * z + tau * fz


def _sanitize(z: Tensor, fz: Tensor, g: Tensor, finite: Tensor):
    """Zero the rows of non-finite samples (they are frozen; their proposal is discarded)."""
    ok = finite[:, None]
    z = torch.where(ok, z, torch.zeros_like(z))
    return z, torch.where(ok, fz, z), torch.where(ok, g, torch.zeros_like(g))


class Anderson(Solver):
    """Anderson acceleration (type II) with memory m, Tikhonov regularisation lam, mixing beta
    (Anderson, J. ACM 1965; Walker & Ni, SIAM J. Numer. Anal. 2011).

    Solves, per sample, ``min_a ||sum_i a_i G_i||^2 + lam s ||a||^2`` s.t. ``sum_i a_i = 1`` (``s``
    the mean squared residual in memory, which makes lam scale-free): ``a = c / sum(c)`` with
    ``(G G^T + lam s I) c = 1``, batched with ``torch.linalg.solve_ex``. The Gram matrix is
    updated one row and column per step.

    Safeguard (``SolverConfig.safeguard``, default 1): when an extrapolated iterate (one that
    combined two or more memory slots) has a residual norm ``||g_k||`` above ``safeguard`` times
    the smallest residual norm of the sample so far, the sample's memory is restarted and it takes plain steps
    ``f(z)`` for a cool-down of ``m`` iterations (``2 m`` after further failures; longer
    cool-downs made Anderson as slow as plain iteration on monotone splittings, where plain
    iteration of the cell is much slower); growth after a plain step is
    the map's own (transient growth of non-normal maps, or an unstable fixed point that only
    Anderson can find) and triggers nothing. Restarting Anderson on residual growth is the usual
    safeguard (Fang & Saad, Numer. Linear Algebra Appl. 2009; Zhang, O'Donoghue & Boyd, SIAM J. Optim.
    2020 fall back to the plain step).
    Unguarded Anderson can diverge on non-normal contractions such as ``A = 0.5 I + 0.6 N``
    (``N`` the shift) where the plain iteration converges; guarded, it converges there too.
    ``safeguard=0`` turns it off.
    """

    name = "anderson"

    # F and G are stored slot-major, (m, B, D): a slot is one contiguous block
    per_sample_memory = {"F": 1, "G": 1, "H": 0, "ones": 0, "valid": 0, "ref": 0, "mixed": 0, "cool": 0,
                         "backoff": 0}

    def residual_buffer(self, state, z):
        """The memory slot the next ``g`` is stored in (so ``g`` is written there directly), or
        None before the memory exists or when its shape differs."""
        mem = state.memory
        G = mem.get("G")
        if G is None or G.shape[1:] != z.shape:
            return None
        buf = mem["pending"] = G[mem["n"] % self.config.m]   # the slot propose stores g in
        return buf

    def propose(self, state, z, fz, g):
        """The Anderson step. The safeguard's per-sample bookkeeping (cool-downs, masked
        slots) is materialised only once some sample has restarted: until then every slot in
        memory is usable and the step costs the Gram update, one small solve and the
        combination (the same arithmetic either way)."""
        cfg = self.config
        mem = state.memory
        m = cfg.m
        if "F" not in mem:
            b, d = z.shape
            mem["F"] = z.new_empty(m, b, d)     # images f(X_i), slot i % m
            mem["G"] = z.new_empty(m, b, d)     # residuals G_i = f(X_i) - X_i
            mem["H"] = z.new_zeros(b, m, m)     # Gram matrix <G_i, G_j>
            mem["ones"] = z.new_ones(b, m, 1)
            mem["n"] = 0
            # safeguard state: ref = min_j ||g_j||^2 (None before the first step); valid (B, m)
            # usable slots, cool (B,) plain steps left, backoff (B,) next cool-down, all None
            # while no sample has restarted (every slot usable, no cool-down)
            mem["ref"] = mem["valid"] = mem["cool"] = mem["backoff"] = None
            mem["mixed"] = False   # z_k extrapolated: a bool for all samples, or (B,) bool
        F, G, H = mem["F"], mem["G"], mem["H"]
        pending = mem.pop("pending", None)
        grad = torch.is_grad_enabled()
        if grad:  # keep autograd history valid for full backpropagation
            F, G, H = F.clone(), G.clone(), H.clone()
            n = min(mem["n"] + 1, m)
            v = _AndersonViews.window(F, G, H, mem["ones"], n)
        else:  # the buffers' slot and window views, made once per buffer (a few ops less a step)
            v = mem.get("views")
            if v is None or v.F is not F or v.H is not H or v.G is not G:
                v = mem["views"] = _AndersonViews(F, G, H, mem["ones"], m)
        slot = mem["n"] % m
        v.Fs[slot].copy_(fz) if not grad else F.__setitem__(slot, fz)
        if g is not pending:  # not already written there by step()
            G[slot] = g
        mem["n"] += 1
        n = min(mem["n"], m)
        if n * g.numel() <= 1 << 18:   # small: one product over the memory (fewest operations)
            row = torch.linalg.vecdot(v.Gn[n], g).t()                        # (B, n): <G_i, g>
        else:  # large: one slot at a time (each product stays in cache)
            row = torch.stack([torch.linalg.vecdot(G[i], g) for i in range(n)], 1)
        if grad:
            H[:, slot, :n] = row
            H[:, :n, slot] = row
        else:
            h_row, h_col = v.row_col(slot, n)
            h_row.copy_(row)
            h_col.copy_(row)
        mem["F"], mem["G"], mem["H"] = F, G, H
        if cfg.safeguard > 0:
            gn2 = row[:, slot]                                              # ||g_k||^2
            restarted = self._safeguard(mem, gn2.detach() if gn2.requires_grad else gn2, slot, n)
        else:
            restarted = False
        if n == 1:
            return fz if cfg.beta == 1 else z + cfg.beta * g
        # Tikhonov term lam * (mean squared residual in memory): scale invariant, so the
        # acceleration does not fade as residuals shrink (an absolute lam dominates tiny G G^T)
        if restarted:  # masked slots: zero rows/columns, unit diagonal, zero right-hand side
            valid = mem["valid"][:, :n].to(H.dtype)
            Hn = v.Hn[n] * valid[:, :, None] * valid[:, None, :]
            diag = Hn.diagonal(dim1=1, dim2=2)
            diag.add_(diag.sum(dim=1, keepdim=True) * (cfg.lam / valid.sum(dim=1, keepdim=True)))
            diag.add_(1 - valid)
            rhs = valid[..., None]
        else:
            Hn = v.Hn[n].clone()
            diag = Hn.diagonal(dim1=1, dim2=2)
            diag.add_(diag.sum(dim=1, keepdim=True), alpha=cfg.lam / n)
            rhs = v.ones[n]
        c, info = torch.linalg.solve_ex(Hn, rhs)                          # (B, n, 1)
        # singular: all G_i = 0 (an exact fixed point), a plain step. With lam > 0 that is the
        # only singular case, and such a sample has residual 0 and stops at this step (its
        # proposal is discarded), so without autograd the check is not needed
        if (cfg.lam <= 0 or grad) and bool(info.any()):
            plain = torch.zeros_like(c)
            plain[:, slot] = 1
            c = torch.where((info != 0)[:, None, None], plain, c)
        # alpha = c / sum(c), laid out (n, B, 1) to weight the slot-major memory
        alpha = (c / c.sum(dim=1, keepdim=True)).transpose(0, 1)
        z_f = _combine(alpha, v.Fn[n])                                    # sum_i a_i f(X_i)
        if cfg.beta == 1.0:
            return z_f
        # beta f + (1 - beta) X  =  f - (1 - beta) G
        return z_f - (1 - cfg.beta) * _combine(alpha, v.Gn[n])

    def _safeguard(self, mem: dict, gn2: Tensor, slot: int, n: int) -> bool:
        """Update the safeguard with ``gn2 = ||g_k||^2`` (B,): an extrapolated iterate whose
        squared residual exceeds ``safeguard**2`` times the smallest one so far restarts the
        sample (growth after a plain step is the map's own: not blamed). Returns whether some
        sample has a masked slot for this step's proposal."""
        m = self.config.m
        ref, mixed = mem["ref"], mem["mixed"]
        if ref is not None and mixed is not False:
            sg2 = self.config.safeguard ** 2
            grew = gn2 > (ref if sg2 == 1.0 else sg2 * ref)
            if mixed is not True:
                grew &= mixed
            if bool(grew.any()):
                if mem["cool"] is None:  # the first restart: materialise the per-sample state
                    b = gn2.shape[0]
                    mem["cool"] = torch.zeros(b, dtype=torch.long, device=gn2.device)
                    mem["backoff"] = torch.full((b,), m, dtype=torch.long, device=gn2.device)
                    valid = torch.zeros(b, m, dtype=torch.bool, device=gn2.device)
                    valid[:, :n] = True
                    mem["valid"] = valid
                mem["cool"] = torch.where(grew, mem["backoff"], mem["cool"])
                mem["backoff"] = torch.where(grew, (2 * mem["backoff"]).clamp_(max=2 * m), mem["backoff"])
        mem["ref"] = gn2 if ref is None else torch.minimum(gn2, ref)
        valid = mem["valid"]
        if valid is None:  # every slot usable: the proposal mixes n slots for every sample
            mem["mixed"] = n > 1
            return False
        cooling = mem["cool"] > 0
        if bool(cooling.any()):       # restarted samples: plain steps while cooling down
            valid = valid & ~cooling[:, None]
            mem["cool"] = (mem["cool"] - 1).clamp_(min=0)
        valid[:, slot] = True
        mem["valid"] = valid
        n_valid = valid[:, :n].sum(dim=1)
        mem["mixed"] = n_valid > 1    # the proposal below combines >= 2 slots
        return not bool((n_valid == n).all())


class _AndersonViews:
    """Views of Anderson's buffers used at every step, indexed by slot and window size ``n``:
    ``Fs[i]`` slot i of F, ``Fn[n]``/``Gn[n]`` the first n slots, ``Hn[n]`` the n x n Gram
    block, ``row_col(i, n)`` row and column i of it, ``ones[n]`` the right-hand side.

    The row and column views are made on first use (a solve of k steps uses at most
    ``min(k, 2 m)`` of the ``m (m + 1)`` pairs; short solves, the common case, would otherwise
    spend more on making views than on the steps)."""

    __slots__ = ("F", "G", "H", "Fs", "Fn", "Gn", "Hn", "rc", "ones")

    def __init__(self, F: Tensor, G: Tensor, H: Tensor, ones: Tensor, m: int):
        self.F, self.G, self.H = F, G, H
        r = range(m + 1)
        if m < 0:  # window(): filled by the caller
            return
        self.Fs = [F[i] for i in range(m)]
        self.Fn = [F[:n] for n in r]
        self.Gn = [G[:n] for n in r]
        self.Hn = [H[:, :n, :n] for n in r]
        self.rc = {}
        self.ones = [ones[:, :n] for n in r]

    def row_col(self, i: int, n: int) -> Tuple[Tensor, Tensor]:
        """Views of row i and column i of the n x n Gram block (made once per buffer)."""
        v = self.rc.get((i, n))
        if v is None:
            v = self.rc[(i, n)] = (self.H[:, i, :n], self.H[:, :n, i])
        return v

    @classmethod
    def window(cls, F: Tensor, G: Tensor, H: Tensor, ones: Tensor, n: int) -> "_AndersonViews":
        """Only the window-``n`` views (buffers that change every step: the autograd path)."""
        v = cls(F, G, H, ones, -1)
        v.Fn, v.Gn, v.Hn, v.ones = ({n: F[:n]}, {n: G[:n]}, {n: H[:, :n, :n]}, {n: ones[:, :n]})
        return v


def _combine(alpha: Tensor, M: Tensor) -> Tensor:
    """``sum_i alpha[i, :, 0] M[i]`` for ``alpha`` (n, B, 1) and slot-major ``M`` (n, B, D): a
    batched matrix product for wide states, a broadcast product and sum for narrow ones (where
    the batched product's per-sample overhead dominates)."""
    if M.shape[-1] >= 192:
        return torch.bmm(alpha.permute(1, 2, 0), M.transpose(0, 1))[:, 0]
    return (alpha * M).sum(0)


class Broyden(Solver):
    """Broyden's (good) method (Broyden, Math. Comp. 1965) on g(z) = f(z) - z with a low-rank
    inverse-Jacobian estimate.

    ``B = -I + U V^T`` (B approximates (J_f - I)^{-1}); the step is ``z <- z - B g(z)``; the update
    ``B += (dz - B dg) dz^T B / (dz^T B dg)`` is stored as rank-one factors in a ring buffer of size
    ``memory`` (default ``max_iter``).
    """

    name = "broyden"

    @staticmethod
    def _matvec(U, VT, v):  # B v
        if U is None:
            return -v
        return -v + torch.einsum("bdm,bm->bd", U, torch.einsum("bmd,bd->bm", VT, v))

    @staticmethod
    def _rmatvec(U, VT, v):  # v^T B
        if U is None:
            return -v
        return -v + torch.einsum("bm,bmd->bd", torch.einsum("bd,bdm->bm", v, U), VT)

    per_sample_memory = {"U": 0, "VT": 0, "prev_z": 0, "prev_g": 0}

    def propose(self, state, z, fz, g):
        """The quasi-Newton step ``z - B g(z)`` after the rank-one update of ``B`` from the
        previous step (skipped per sample where its denominator vanishes)."""
        cfg = self.config
        mem = state.memory
        b, d = z.shape
        M = cfg.memory or cfg.max_iter
        if "U" not in mem:
            mem.update(U=z.new_zeros(b, d, M), VT=z.new_zeros(b, M, d), n=0, prev_z=None, prev_g=None)
        U, VT = mem["U"], mem["VT"]
        if mem["prev_z"] is not None:
            dz = z - mem["prev_z"]
            dg = g - mem["prev_g"]
            Uu, VTu = (U, VT) if mem["n"] > 0 else (None, None)
            vT = self._rmatvec(Uu, VTu, dz)
            denom = (vT * dg).sum(dim=1, keepdim=True)
            ok = denom.abs() > 1e-12 * (vT.norm(dim=1, keepdim=True) * dg.norm(dim=1, keepdim=True) + 1e-30)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok, (dz - self._matvec(Uu, VTu, dg)) / safe, torch.zeros_like(dz))
            vT = torch.where(ok, vT, torch.zeros_like(vT))
            if torch.is_grad_enabled():
                U, VT = U.clone(), VT.clone()
            slot = mem["n"] % M
            U[:, :, slot] = u
            VT[:, slot] = vT
            mem["U"], mem["VT"] = U, VT
            mem["n"] += 1
        mem["prev_z"], mem["prev_g"] = z, g
        Uu, VTu = (U, VT) if mem["n"] > 0 else (None, None)
        return z - self._matvec(Uu, VTu, g)


def register_solver(name: str, cls: type, *, replace: bool = False) -> type:
    """Make the :class:`Solver` subclass ``cls`` available as ``SolverConfig(name=name)`` /
    ``get_solver(name)`` (and so to every DEQ, attack and certificate that takes a solver
    config). Re-registering a name (a built-in included) is a ConfigError unless
    ``replace=True``. Returns ``cls`` (whose ``name`` is set to ``name`` if it has none)."""
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise ConfigError(f"register_solver({name!r}, ...) needs a Solver subclass, got {cls!r}")
    _registry.SOLVERS.register(name, cls, replace=replace)
    if "name" not in cls.__dict__:
        cls.name = name
    return cls


def get_solver(config: Union[SolverConfig, dict, str, None] = None, **overrides) -> Solver:
    """Return a solver for a config, a dict of options, or a solver name (``ConfigError`` if unknown)."""
    if isinstance(config, str):
        if config not in _registry.SOLVERS:
            raise ConfigError(f"unknown solver {config!r}; expected one of {', '.join(_registry.SOLVERS.names())}")
        config = SolverConfig(name=config)
    cfg = from_dict(SolverConfig, config)
    if overrides:
        cfg = cfg.replace(**overrides)
    return _registry.SOLVERS.get(cfg.name.value)(cfg)


def solve(f: Fn, z0: Tensor, config: Union[SolverConfig, dict, str, None] = None,
          record: RecordSpec = None, **overrides) -> SolveResult:
    """One-call solve: ``get_solver(config, **overrides).solve(f, z0, record)``."""
    return get_solver(config, **overrides).solve(f, z0, record=record)


__all__ = ["TrajectoryState", "SolverState", "SolveResult", "Solver", "FixedPointIteration",
           "Anderson", "Broyden", "register_solver", "get_solver", "solve", "residual",
           "iterate_map"]
