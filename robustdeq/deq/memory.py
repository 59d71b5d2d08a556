"""A per-sample warm-start memory across an external attack's calls to a DEQ.

An attack library such as pyautoattack calls the model many times on the same clean batch: on
subsets of it and at perturbed points of the same samples (APGD's iterates, Square's queries).
:class:`WarmMemory` wraps a DEQ for one such run and makes those calls cheaper on the model side,
leaving the attack's algorithm alone.

Keys. :meth:`WarmMemory.begin` is given the clean batch and the threat radius; a query row is the
clean sample ``i`` whose input is nearest to it (Linf), provided it lies within the radius of it
(a perturbed point of that sample); rows that match no clean sample are solved as the model
solves them. :meth:`end` (and every new :meth:`begin`) forgets everything: the memory never
outlives the batch it was built for.

What it can do (each an option; :data:`FAST_OPTIONS` lists those of the attack-speed mode):

- ``forward_warm``: start a row's forward solve from the latest *converged* fixed point of its
  clean sample. ``True`` on any cell, ``"contractive"`` only where
  :func:`robustdeq.deq.contraction.contraction_certificate` certifies the cell a contraction (a unique
  fixed point, so a warm and a cold solve reach the same equilibrium), ``False`` never. On a
  non-contractive cell a warm start can follow another equilibrium branch than the cold solve
  reaches, so the attack would attack another function.
- ``adjoint_tol`` / ``adjoint_warm``: the implicit backward (the adjoint ``a = J^T a + g`` of
  :class:`~robustdeq.deq.grad.ImplicitGrad`) solved to an attack-grade relative tolerance instead
  of the estimator's own, and started from the sample's latest *converged* adjoint. The adjoint
  is the solution of a linear fixed point, unique wherever it converges, so a warm start only
  changes the number of iterations; the gradient only steers the attack, which judges success on
  the forward logits.
- ``shrink``: forward and adjoint solves on a batch that shrinks as samples converge
  (:func:`robustdeq.deq.shrink.solve_shrinking`; per-sample results unchanged up to float
  rounding: matrix products over batches of other sizes round differently, so a sample whose
  solve stops unconverged at ``max_iter`` can differ by ~1e-4 between two calls at the same
  point).
- ``reuse``: a row whose input equals exactly the input of the sample's latest (or clean-point)
  converged solve, made with the solver settings in force at :meth:`begin`, gets that solve's
  fixed point again without a new solve (what a solve started there returns: it converges at its
  first evaluation and returns its start), so the repeated evaluations attacks make (the clean
  point before each sub-attack, the final adversarial point) cost no solver iterations.

The rule of :mod:`robustdeq.deq.warm` holds throughout: only converged solves (forward or
adjoint) are recorded, and a warm-started forward solve that does not converge is redone from the
model's initial state, so every returned prediction is the model's inference (to the solver's
tolerance where the warm-started solve converged, bit for bit where it did not). Rows whose
warm-started logits have a top-2 gap below ``confirm_margin`` are redone cold as well: a warm and
a cold solve differ within the solver's tolerance, and near a tie that flips predictions. Without
``reuse``, a row whose input equals the recorded point exactly starts cold, so that repeated calls
at the same point give identical outputs (as the model does; pyautoattack's randomised-defense
check compares them); with it, the recorded state is returned again, which is identical as well.

The adjoint options, ``shrink`` and ``reuse`` need a :class:`~robustdeq.deq.model.DEQClassifier`
whose pieces are its own and the exact :class:`~robustdeq.deq.grad.ImplicitGrad` estimator
(:func:`robustdeq.deq.warm.supports_implicit_input_gradient`); under another estimator (a
``gradient(...)`` override) calls take the plain path (forward warm starts only).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from .cells import cell_map
from .views import ModelView

logger = logging.getLogger(__name__)

#: the options of the attack-speed mode (``AutoAttack(fast_deq=True)``)
FAST_OPTIONS = {"forward_warm": "contractive", "adjoint_tol": 1e-3, "adjoint_warm": True,
                "shrink": False, "reuse": True}


def _flat(x: Tensor) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).float()


class WarmMemory(ModelView):
    """``x -> logits`` of ``model`` (a DEQ with ``run(x, z0=...)`` and ``init_state``), with the
    per-sample memory described in the module docstring; outside a :meth:`begin` / :meth:`end`
    bracket it is the model itself.

    Args:
        model: the DEQ.
        confirm_margin: warm-started rows whose top-2 logit gap is below it are redone cold.
        forward_warm: ``True``, ``False`` or ``"contractive"`` (see the module docstring).
        adjoint_tol: relative tolerance of the implicit backward's adjoint solve (None: the
            estimator's own solver settings).
        adjoint_warm: start each sample's adjoint solve from its latest converged adjoint.
        shrink: solve on a shrinking batch.
        reuse: restart rows at exactly a recorded input from that input's converged state.
    """

    def __init__(self, model: nn.Module, confirm_margin: float = 0.1, *,
                 forward_warm: Union[bool, str] = True, adjoint_tol: Optional[float] = None,
                 adjoint_warm: bool = False, shrink: bool = False, reuse: bool = False):
        super().__init__()
        self.confirm_margin = float(confirm_margin)
        if not (hasattr(model, "run") and hasattr(model, "init_state") and hasattr(model, "inject")):
            raise ConfigError(f"WarmMemory needs a DEQ (run, inject, init_state); got {type(model).__name__}")
        if not (isinstance(forward_warm, bool) or forward_warm == "contractive"):
            raise ConfigError(f"forward_warm must be True, False or 'contractive', got {forward_warm!r}")
        if adjoint_tol is not None and (isinstance(adjoint_tol, bool)
                                        or not isinstance(adjoint_tol, (int, float))
                                        or not 0 < float(adjoint_tol) < 1):
            raise ConfigError(f"adjoint_tol must be a float in (0, 1) or None, got {adjoint_tol!r}")
        for name, value in (("adjoint_warm", adjoint_warm), ("shrink", shrink), ("reuse", reuse)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be a bool, got {value!r}")
        self.model = model
        self.forward_warm = forward_warm
        self.adjoint_tol = None if adjoint_tol is None else float(adjoint_tol)
        self.adjoint_warm, self.shrink, self.reuse = adjoint_warm, shrink, reuse
        self.fast = self.adjoint_tol is not None or adjoint_warm or shrink or reuse
        if self.fast:
            from .grad import ImplicitGrad
            from .warm import supports_implicit_input_gradient
            if not supports_implicit_input_gradient(model, ImplicitGrad()):
                raise ConfigError("WarmMemory's adjoint_tol, adjoint_warm, shrink and reuse need a "
                                  f"DEQClassifier with its own run/solve/f/inject/readout; got "
                                  f"{type(model).__name__}")
        self.warm_forward = False
        self._adjoint_cfg = None
        self._certified = None   # (parameter versions, certified) of the latest certificate
        self.end()

    # -- the bracket ------------------------------------------------------------------------------
    def begin(self, x_clean: Tensor, radius: float) -> None:
        """Start a memory for the clean batch ``x_clean``: queries within Linf ``radius`` of a
        clean sample are that sample."""
        self.clean = _flat(x_clean)
        self.radius = float(radius) * (1 + 1e-4) + 1e-6
        n = self.clean.shape[0]
        dev = x_clean.device
        self.z: Optional[Tensor] = None           # (N, ...) latest converged fixed points
        self.ok = torch.zeros(n, dtype=torch.bool, device=dev)
        self.at: Optional[Tensor] = None          # (N, d) the inputs they were solved at
        self.zc: Optional[Tensor] = None          # (N, ...) converged fixed points at the clean inputs
        self.ok_c = torch.zeros(n, dtype=torch.bool, device=dev)
        self.a: Optional[Tensor] = None           # (N, ...) latest converged adjoints
        self.a_ok = torch.zeros(n, dtype=torch.bool, device=dev)
        # reuse: the residuals of the recorded states, and whether the latest state was solved
        # with the solver settings of begin() (only those are returned again)
        self.res = torch.zeros(n, device=dev)
        self.res_c = torch.zeros(n, device=dev)
        self.reusable = torch.zeros(n, dtype=torch.bool, device=dev)
        self._cfg = getattr(self.model, "solver_config", None)
        self._last_keys: Optional[Tensor] = None
        self._generation = getattr(self, "_generation", 0) + 1   # backward hooks of older batches
        if self.forward_warm == "contractive":
            self.warm_forward = self._contractive()
        else:
            self.warm_forward = bool(self.forward_warm)
        self.stats: Dict[str, int] = {"calls": 0, "rows": 0, "warm": 0, "redone": 0, "recorded": 0,
                                      "unmatched": 0, "confirmed": 0, "reused": 0, "forward_nfe": 0,
                                      "backward_solves": 0, "backward_nfe": 0, "adjoint_warm": 0,
                                      "adjoint_recorded": 0, "adjoint_unconverged": 0}

    def _contractive(self) -> bool:
        """Whether the cell is certified a contraction (recomputed when a parameter changed)."""
        version = tuple((id(p), p._version) for p in self.model.parameters())
        if self._certified is None or self._certified[0] != version:
            from .contraction import contraction_certificate
            cert = contraction_certificate(self.model)
            self._certified = (version, bool(cert.certified))
            logger.debug("WarmMemory: forward warm starts %s (%s)",
                         "on" if cert.certified else "off", cert.reason)
        return self._certified[1]

    def end(self) -> None:
        """Forget the memory (the next calls are the model's own, cold)."""
        self.clean = None
        self.z = self.at = self.ok = self._last_keys = None
        self.zc = self.ok_c = self.a = self.a_ok = None
        self.res = self.res_c = self.reusable = self._cfg = None
        self.radius = 0.0
        if not hasattr(self, "stats"):
            self.stats = {}

    @property
    def active(self) -> bool:
        """Whether a :meth:`begin` / :meth:`end` bracket is open."""
        return self.clean is not None

    # -- keys -------------------------------------------------------------------------------------
    def keys(self, x: Tensor) -> Tensor:
        """(B,) long: the clean sample of each row of ``x`` (-1: none within the radius)."""
        q = _flat(x)
        last = self._last_keys
        if last is not None and last.shape[0] == q.shape[0] and bool((last >= 0).all()):
            # the usual case: the same samples as the previous call
            if bool(((q - self.clean[last]).abs().amax(dim=1) <= self.radius).all()):
                return last
        keys = torch.full((q.shape[0],), -1, dtype=torch.long, device=x.device)
        for i in range(0, q.shape[0], 256):
            d = torch.cdist(q[i:i + 256], self.clean, p=float("inf"))
            dmin, arg = d.min(dim=1)
            keys[i:i + 256] = torch.where(dmin <= self.radius, arg, torch.full_like(arg, -1))
        self._last_keys = keys
        return keys

    # -- the model --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``x``: the model's own call outside a bracket; inside one, solves started
        and recorded per the memory's options (see the module)."""
        if not self.active:
            return self.model(x)
        self.stats["calls"] += 1
        self.stats["rows"] += int(x.shape[0])
        keys = self.keys(x)
        self.stats["unmatched"] += int((keys < 0).sum())
        if self.fast:
            from .grad import ImplicitGrad
            if type(self.model.estimator) is ImplicitGrad:
                return self._fast_forward(x, keys)
        return self._plain_forward(x, keys)

    def _reuse_now(self) -> bool:
        """Reuse applies while the model's solver settings are those of :meth:`begin`."""
        return self.reuse and getattr(self.model, "solver_config", None) == self._cfg

    def _starts(self, x: Tensor, keys: Tensor, cold: Tensor):
        """``(z0, warm, reused, reused_res)``: where each row's forward solve starts, the rows
        warm-started, the rows at exactly a recorded input (``z0`` is its converged state) and
        those states' residuals."""
        has = keys >= 0
        kk = keys.clamp(min=0)
        none = torch.zeros_like(has)
        if self.z is None and self.zc is None:
            return cold, none, none, None
        q = _flat(x)
        view = (-1,) + (1,) * (cold.dim() - 1)
        z0 = cold
        same = has & self.ok[kk] & (q == self.at[kk]).all(dim=1) if self.z is not None else none
        reused, reused_res = none, None
        if self._reuse_now():
            reused = same & self.reusable[kk]
            if bool(reused.any()):
                z0 = torch.where(reused.view(view), self.z[kk].to(cold), z0)
                reused_res = torch.where(reused, self.res[kk], torch.zeros_like(self.res[kk]))
            if self.zc is not None:
                at_clean = has & ~reused & self.ok_c[kk] & (q == self.clean[kk]).all(dim=1)
                if bool(at_clean.any()):
                    z0 = torch.where(at_clean.view(view), self.zc[kk].to(cold), z0)
                    base = reused_res if reused_res is not None else torch.zeros_like(self.res[kk])
                    reused_res = torch.where(at_clean, self.res_c[kk], base)
                    reused = reused | at_clean
        warm = none
        if self.warm_forward and self.z is not None:
            warm = has & self.ok[kk] & ~same & ~reused
            if bool(warm.any()):
                z0 = torch.where(warm.view(view), self.z[kk].to(cold), z0)
        return z0, warm, reused, reused_res

    def _record(self, x: Tensor, keys: Tensor, z_star: Tensor, conv: Tensor,
                residual: Optional[Tensor] = None) -> None:
        """Record the converged solves of matched rows (latest, and at the clean point)."""
        rec = ((keys >= 0) & conv).nonzero()[:, 0]
        if not rec.numel():
            return
        if self.z is None:
            n = self.clean.shape[0]
            self.z = torch.zeros((n,) + tuple(z_star.shape[1:]), dtype=z_star.dtype, device=z_star.device)
            self.at = torch.full_like(self.clean, float("nan"))
        k = keys[rec]
        q = _flat(x)[rec]
        zr = z_star[rec].detach()
        self.z[k] = zr
        self.at[k] = q
        self.ok[k] = True
        self.stats["recorded"] += int(rec.numel())
        if self.reuse:
            now = self._reuse_now() and residual is not None
            self.reusable[k] = now
            if not now:
                return
            rr = residual[rec].detach().to(self.res.dtype)
            self.res[k] = rr
            at_clean = (q == self.clean[k]).all(dim=1)
            if bool(at_clean.any()):
                if self.zc is None:
                    self.zc = torch.zeros_like(self.z)
                self.zc[k[at_clean]] = zr[at_clean]
                self.res_c[k[at_clean]] = rr[at_clean]
                self.ok_c[k[at_clean]] = True

    def _confirm(self, logits: Tensor, warm: Tensor, conv: Tensor) -> Tensor:
        """Rows to redo cold: warm-started ones that did not converge or are near a tie."""
        if not bool(warm.any()):
            return warm.nonzero()[:, 0]
        top2 = logits.detach().float().topk(2, dim=1).values if logits.shape[1] > 1 else None
        close = (top2[:, 0] - top2[:, 1] < self.confirm_margin) if top2 is not None else warm
        self.stats["warm"] += int(warm.sum())
        self.stats["confirmed"] += int((warm & conv & close).sum())
        return (warm & (~conv | close)).nonzero()[:, 0]

    def _plain_forward(self, x: Tensor, keys: Tensor) -> Tensor:
        """The model's own ``run`` from the memory's starts (forward warm starts only)."""
        model = self.model
        with torch.no_grad():
            cold = model.init_state(model.inject(model.check_input(x.detach())))
        z0, warm, reused, _ = self._starts(x, keys, cold)
        if not bool((warm | reused).any()):
            eq = model.run(x)
            logits, z_star, conv = eq.logits, eq.z_star, eq.stats.converged
        else:
            self.stats["reused"] += int(reused.sum())
            eq = model.run(x, z0=z0)
            logits, z_star, conv = eq.logits, eq.z_star, eq.stats.converged.clone()
        residual = eq.stats.residual
        if bool(warm.any()):
            redo = self._confirm(logits, warm, conv)
            if redo.numel():
                # a warm-started solve that did not converge, or whose prediction is within
                # confirm_margin of a tie: the model's own (cold) solve
                self.stats["redone"] += int(redo.numel())
                eq2 = model.run(x[redo])
                logits = logits.clone()
                logits[redo] = eq2.logits
                z_star = z_star.clone()
                z_star[redo] = eq2.z_star
                conv[redo] = eq2.stats.converged
                residual = residual.clone()
                residual[redo] = eq2.stats.residual
        self._record(x, keys, z_star, conv, residual)
        return logits

    def _solve(self, cfg, make_f, z0: Tensor):
        """A solve of ``z = make_f(None)(z)`` from ``z0`` without autograd: shrinking or not."""
        from .shrink import solve_shrinking
        from .solvers import get_solver
        solver = get_solver(cfg)
        with torch.no_grad():
            if self.shrink:
                return solve_shrinking(solver, make_f, z0.detach())
            return solver.solve(make_f(None), z0.detach())

    def _solve_unless_reused(self, cfg, make_f, z0: Tensor, reused: Tensor,
                             reused_res: Optional[Tensor]):
        """``(z*, converged, stats)``. When every row is reused, their recorded converged states
        without a solve (what a solve started there returns: it converges at its first
        evaluation and returns its start); otherwise one solve of the whole batch from ``z0``
        (the reused rows stop at their first iteration; solving only the other rows would batch
        them differently, and an unconverged row would then differ by rounding between repeats)."""
        if not bool(reused.all()) or reused_res is None:
            res = self._solve(cfg, make_f, z0)
            return res.z.detach(), res.converged, res
        from .shrink import ShrinkResult
        z_star = z0.detach()
        return z_star, reused.clone(), ShrinkResult(
            z=z_star, residual=reused_res, converged=reused.clone(),
            diverged=torch.zeros_like(reused), steps=reused.long(), nfe=0, work=0)

    def _fast_forward(self, x: Tensor, keys: Tensor) -> Tensor:
        """What ``model.run(x).logits`` with ``ImplicitGrad`` computes (``readout(f(z*, u))``, the
        backward solving the adjoint), with the memory's starts, shrinking solves and the
        attack-grade, warm-started adjoint."""
        from .model import SolverStats
        model = self.model
        est = model.estimator
        xin = model.check_input(x)
        with parametrize.cached():
            u = model.inject(xin)
            ud = u.detach()
            model.prepare()
            with torch.no_grad():
                cold = model.init_state(ud)
            z0, warm, reused, reused_res = self._starts(x, keys, cold)
            self.stats["reused"] += int(reused.sum())

            def make_f(idx, uu=ud):
                us = uu if idx is None else uu[idx]
                return cell_map(model.cell, us)
            z_star, conv, res = self._solve_unless_reused(model.solver_config, make_f, z0, reused,
                                                          reused_res)
            residual = res.residual
            nfe = int(res.nfe)
            z_out = model.cell(z_star, u)
            logits = model.readout(z_out)
            redo = self._confirm(logits, warm, conv)
            if redo.numel():
                # a warm-started solve that did not converge, or whose prediction is within
                # confirm_margin of a tie: the model's own (cold) solve for those rows
                self.stats["redone"] += int(redo.numel())
                ur = ud[redo]
                res2 = self._solve(model.solver_config, lambda idx: make_f(idx, ur), cold[redo])
                z_star, conv = z_star.clone(), conv.clone()
                z_star[redo] = res2.z
                conv[redo] = res2.converged
                residual = residual.clone()
                residual[redo] = res2.residual.to(residual.dtype)
                nfe += int(res2.nfe)
                z_out = model.cell(z_star, u)
                logits = model.readout(z_out)
            self.stats["forward_nfe"] += nfe
            stats = SolverStats(residual.detach(), res.steps, conv, res.diverged, nfe)
            model.last_stats = stats
            model._maybe_warn(stats)
        self._record(x, keys, z_star, conv, residual)
        if torch.is_grad_enabled() and z_out.requires_grad:
            z_out.register_hook(self._adjoint_hook(est, z_star, ud, keys))
        return logits

    def _adjoint_hook(self, est, z_star: Tensor, ud: Tensor, keys: Tensor):
        """The backward hook replacing the upstream gradient ``g`` of ``f(z*, u)`` by the adjoint
        ``a = J^T a + g`` (``J = df/dz`` at z*), as :class:`ImplicitGrad` does, solved with the
        memory's tolerance, start and shrinking."""
        model = self.model
        cfg = est.solver
        if self.adjoint_tol is not None:  # SolverConfig.replace is slow: once per base config
            cached = self._adjoint_cfg
            if cached is None or cached[0] is not cfg:
                self._adjoint_cfg = cached = (cfg, cfg.replace(tol=self.adjoint_tol))
            cfg = cached[1]
        closed_form = getattr(model.cell, "has_vjp", False)
        has = keys >= 0
        kk = keys.clamp(min=0)
        generation = self._generation

        def hook(grad: Optional[Tensor]) -> Optional[Tensor]:
            if grad is None:
                return None
            g = grad.detach()
            # the memory of this call's batch only (a backward after end() / a new begin(): cold)
            live = self.adjoint_warm and self.active and self._generation == generation

            def make_adjoint(idx):
                zs = z_star if idx is None else z_star[idx]
                us = ud if idx is None else ud[idx]
                gs = g if idx is None else g[idx]
                if closed_form:  # the cell's closed-form vector-Jacobian product
                    vjp = model.cell.vjp_at(zs, us)
                    return lambda a: vjp(a, gs)
                zl = zs.clone().requires_grad_(True)
                with torch.enable_grad():
                    fz = model.cell(zl, us)
                return lambda a: torch.autograd.grad(fz, zl, a, retain_graph=True)[0] + gs

            a0 = g
            if live and self.a is not None and self.a.shape[1:] == g.shape[1:]:
                warm = has & self.a_ok[kk]
                if bool(warm.any()):
                    self.stats["adjoint_warm"] += int(warm.sum())
                    view = (-1,) + (1,) * (g.dim() - 1)
                    a0 = torch.where(warm.view(view), self.a[kk].to(g), g)
            with parametrize.cached():  # the cell's weights once for the solve
                ares = self._solve(cfg, make_adjoint, a0)
            self.stats["backward_solves"] += 1
            self.stats["backward_nfe"] += int(ares.nfe)
            n_bad = int((~ares.converged).sum())
            self.stats["adjoint_unconverged"] += n_bad
            if n_bad:
                logger.debug("WarmMemory: adjoint solve did not converge for %d/%d samples "
                             "(tol %g)", n_bad, ares.converged.numel(), cfg.tol)
            if live:
                rec = (has & ares.converged).nonzero()[:, 0]
                if rec.numel():
                    if self.a is None or self.a.shape[1:] != g.shape[1:]:
                        self.a = torch.zeros((self.clean.shape[0],) + tuple(g.shape[1:]),
                                             dtype=g.dtype, device=g.device)
                        self.a_ok = torch.zeros_like(self.a_ok)
                    self.a[keys[rec]] = ares.z[rec].detach()
                    self.a_ok[keys[rec]] = True
                    self.stats["adjoint_recorded"] += int(rec.numel())
            return ares.z.to(grad.dtype)
        return hook


__all__ = ["WarmMemory", "FAST_OPTIONS"]
