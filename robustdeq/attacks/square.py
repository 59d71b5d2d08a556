"""Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search"), Linf and L2.

A score-based attack: it only reads the model's logits, never a gradient, so gradient masking
does not blind it. Random search over the vertices of the eps ball: each iteration proposes one
random square window (side ``s ~ sqrt(p * n_features / c)``, ``p`` shrinking on a fixed schedule
of the iteration index) on the current best point of every sample not yet broken, and keeps the
proposal where it lowers the margin loss (or misclassifies).

- Linf: the start is ``x + eps * (random +-1 per channel and column)`` (vertical stripes); a
  proposal sets the window of each channel to ``x_best + 2 eps * (random +-1)``, clipped to the
  ball and to [0, 1].
- L2: the start is a grid of centred squares of side ``h // 5`` with random signs, rescaled to L2
  norm eps; a proposal moves the mass of one window into another (the "centred square"
  perturbation: concentric rings weighted ``1 / (k + 1)^2``, one half positive, one negative),
  keeping the norm at eps.

The schedule of ``p`` halves ``p_init`` after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
iterations; with ``rescale_schedule`` (the paper's code) those breakpoints are relative to 10,000
queries and are rescaled to ``n_queries``, without it (AutoAttack's setting) they are absolute.
Random draws (stripes, window positions, signs) are taken in the same order and from the same
kind of stream as pyautoattack's ``SquareAttack`` seeded with ``seed``, so on a model without a
fixed-point solve the two return the same examples.

Under Linf an iteration's draws (window and sign) are shared by all samples and do not depend on
the search's state, so a sample's search depends only on its own answers: with ``speculate`` a
sample's next proposals, built as if the earlier ones are rejected, are queried together and
taken in order up to the first accepted one (the one-at-a-time search's decisions, in fewer
query batches).

DEQs. By default every query is the model's own inference (its solver from its initial state,
as AutoAttack queries it): the search then scores exactly the function whose robustness is
measured. With ``warm_start=True`` each query's forward solve starts instead from the converged
fixed point of the sample's current best point (a window change moves the fixed point little):
for a ``DEQClassifier`` by plain fixed-point iteration of its map to the solver's tolerance (one
map evaluation per step, no solver bookkeeping: from a nearby fixed point of a locally
contracting map few steps are needed; a sample not converged after ``FIXED_POINT_STEPS`` goes on
with the model's solver), otherwise by the model's solver through :mod:`robustdeq.deq.warm`.
A sample whose best point's solve did not converge starts where the model's inference starts,
a warm-started solve that does not converge is redone cold, a query that claims a
misclassification from a warm-started solve is confirmed by the model's own inference before
the sample stops being attacked, and at the end every example is judged by the model's own
inference. Warm queries are cheaper, and decide as cold ones where the model's solver
converges tightly to a unique fixed point; but where its inference stops at a loose tolerance or
an iteration cap, or another fixed point lies near, what a warm-started solve returns is a
different function of the input (tied to the search's path), and a search scored by it can miss
examples that the model's own inference misclassifies.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..deq.warm import plain_deq_classifier
from .._tensor import correct
from .base import Attack, check_int, check_num_classes, check_number, is_deq

logger = logging.getLogger(__name__)

LOSSES = ("margin", "ce")

#: the iteration breakpoints of the p schedule (relative to 10,000 queries when rescaled)
_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool) -> float:
    """The fraction ``p`` of features a window covers at iteration ``it``: ``p_init`` halved at
    each breakpoint of :data:`_BREAKS` passed (``it`` rescaled to 10,000 queries with
    ``rescale``)."""
    if rescale:
        it = int(it / n_queries * 10000)
    halvings = sum(1 for b in _BREAKS if it > b)
    return p_init / (2 ** halvings) if halvings else p_init


def warm_queries_supported(model: nn.Module) -> bool:
    """Whether a query may run as ``model.run(x, warm=...)``: a fixed-point model whose forward
    is its ``run(x).logits`` (not overridden)."""
    from ..deq.model import EquilibriumModel
    return is_deq(model) and getattr(type(model), "forward", None) is EquilibriumModel.forward


#: a warm query's plain fixed-point steps before the samples not yet converged go on with the
#: model's solver
FIXED_POINT_STEPS = 10


class _Oracle:
    """The model's logits at queried points: its own inference (cold), or for a DEQ with warm
    queries a solve started from the fixed point of the sample's current best point (``z`` and
    its convergence flags ``ok``)."""

    def __init__(self, model: nn.Module, n: int, warm: bool, deq: bool):
        self.model = model
        self.deq = deq
        self.warm = warm and deq
        self.fast = deq and plain_deq_classifier(model)
        self.z: Optional[Tensor] = None       # (n, ...) fixed point of each sample's best point
        self.ok = None                        # (n,) bool: that solve converged
        self.n = n
        self.stats = {"queries": 0, "solver_steps": 0, "warm_started": 0, "redone_cold": 0,
                      "confirmed_cold": 0, "rejected_by_cold": 0, "unchanged": 0, "speculative": 0}

    def reset(self) -> None:
        self.z, self.ok = None, None

    # -- answers -------------------------------------------------------------------------------
    def cold(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The model's own inference at ``x``: ``(logits, z, ok)`` (z, ok None off DEQs)."""
        if not self.deq:
            return self.model(x), None, None
        eq = self.model.run(x)
        self.stats["solver_steps"] += int(eq.stats.steps.sum())
        return eq.logits, eq.z_star, eq.stats.converged

    def warm_answer(self, x: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(logits, z, ok, started)``: solves of ``x`` started from the fixed points of the
        samples ``idx``'s best points where those converged (``started``), else from the model's
        initial state; ``ok``: the solve converged. Nothing is redone or confirmed here."""
        z0, ok0 = self.z[idx], self.ok[idx]
        started = ok0 & torch.isfinite(z0.reshape(z0.shape[0], -1)).all(dim=1)
        self.stats["warm_started"] += int(started.sum())
        if self.fast:
            if bool(started.all()):
                logits, z, ok = self._iterate(x, z0)
            elif not bool(started.any()):
                logits, z, ok = self.cold(x)
            else:       # the others start where the model's inference starts: they are its own
                lw, zw, okw = self._iterate(x[started], z0[started])
                lc, zc, okc = self.cold(x[~started])
                logits = lw.new_empty((x.shape[0],) + tuple(lw.shape[1:]))
                z = zw.new_empty((x.shape[0],) + tuple(zw.shape[1:]))
                ok = torch.empty(x.shape[0], dtype=torch.bool, device=okw.device)
                logits[started], z[started], ok[started] = lw, zw, okw
                logits[~started], z[~started], ok[~started] = lc.to(lw), zc.to(zw), okc
            return logits, z, ok, started
        from ..deq.warm import WarmStart, run_warm
        ws = WarmStart(adjoint=False)
        ws.z, ws.z_ok = z0, ok0
        eq = run_warm(self.model, x, ws)
        self.stats["solver_steps"] += int(eq.stats.steps.sum())
        return eq.logits.clone(), eq.z_star.clone(), eq.stats.converged.clone(), started

    def _iterate(self, x: Tensor, z0: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Fixed-point iteration ``z <- f(z, u)`` from ``z0`` until every sample's residual is
        within the solver's tolerance, at most ``FIXED_POINT_STEPS`` times: a step costs one
        evaluation of the map, and from a nearby fixed point of a locally contracting map few are
        needed. The samples still above the tolerance go on with the model's solver from where
        the iteration left them (the solver's own ``max_iter``). ``ok``: converged and finite."""
        from torch.nn.utils import parametrize
        from ..deq.solvers import iterate_map
        m = self.model
        cfg = m.solver_config
        m.prepare()
        with parametrize.cached():
            u = m.inject(m.check_input(x))
            z, r, k = iterate_map(m.f_bound(u), z0.to(u.dtype), cfg,
                                  max(1, min(FIXED_POINT_STEPS, cfg.max_iter)))
            self.stats["solver_steps"] += k * int(x.shape[0])
            ok = r <= cfg.tol
            if not bool(ok.all()):
                rows = (~ok).nonzero().flatten()
                res = m.solve(u[rows], z0=z[rows])
                self.stats["solver_steps"] += int(res.steps.sum())
                z = z.index_copy(0, rows, res.z.to(z))
                ok = ok.index_copy(0, rows, res.converged)
            ok = ok & torch.isfinite(z.reshape(z.shape[0], -1)).all(dim=1)
            return m.readout(z), z, ok

    def logits(self, x: Tensor, idx: Tensor, judge) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(logits, z, ok)`` at ``x`` (the queried points of the samples ``idx``). ``judge``
        maps logits to per-sample success flags: claimed successes from warm-started solves are
        confirmed by the model's own inference."""
        self.stats["queries"] += int(x.shape[0])
        if not (self.warm and self.z is not None):
            logits, z, ok = self.cold(x)
            if self.warm:
                self._init(z, ok, idx)
            return logits, z, ok
        logits, z, ok, started = self.warm_answer(x, idx)
        redo = started & ~ok   # a warm-started solve that did not converge: redone cold
        if bool(redo.any()):
            self.stats["redone_cold"] += int(redo.sum())
            self._replace(x, redo, logits, z, ok)
        claim = started & ~redo & judge(logits)
        if bool(claim.any()):  # a misclassification counts only as the model's inference sees it
            self.stats["confirmed_cold"] += int(claim.sum())
            self._replace(x, claim, logits, z, ok)
            self.stats["rejected_by_cold"] += int((claim & ~judge(logits)).sum())
        return logits, z, ok

    def _replace(self, x, rows, logits, z, ok) -> None:
        lc, zc, okc = self.cold(x[rows])
        logits[rows], z[rows], ok[rows] = lc, zc.to(z), okc

    def _init(self, z: Tensor, ok: Tensor, idx: Tensor) -> None:
        self.z = z.new_zeros((self.n,) + tuple(z.shape[1:]))
        self.ok = torch.zeros(self.n, dtype=torch.bool, device=z.device)
        self.z[idx], self.ok[idx] = z, ok

    def accept(self, idx: Tensor, improved: Tensor, z: Optional[Tensor], ok: Optional[Tensor]) -> None:
        """The samples ``idx[improved]`` moved to the queried point: its fixed point is theirs."""
        if not self.warm or z is None or self.z is None:
            return
        rows = idx[improved]
        self.z[rows] = z[improved].to(self.z)
        self.ok[rows] = ok[improved]


class Square(Attack):
    """Square attack (Andriushchenko et al., ECCV 2020), Linf and L2, untargeted or targeted.

    Args:
        eps, norm: threat model.
        n_queries: iterations per restart (each queries every sample not yet broken once; the
            start costs one more query). AutoAttack's standard version uses 5,000.
        n_restarts: runs (each attacks the samples the model's inference still classifies
            correctly; a fresh start with the next draws).
        restart_fraction: None (every run after the first attacks every sample left, as the
            reference implementation's restarts), or a fraction in (0, 1]: runs after the first
            ``full_runs`` attack only the near misses, the samples whose best margin so far is
            below this fraction of their clean margin. A run that fails to cross the decision
            boundary mostly ends far from it; one that ends close is where another start is
            likeliest to cross it, so the extra runs cost little where nothing is close.
        full_runs: with ``restart_fraction``, how many runs (the first ones) attack every sample
            left (1: only the first). Which samples a run breaks depends on its draws, so
            another full run finds samples the first missed wherever the search breaks any.
        restart_while_breaking: a run after the first happens only if the run before it broke at
            least one sample (the search pays off on this model: its restarts continue; where a
            full run breaks nothing the gradient attacks' verdict stands and no more queries are
            spent). ``n_restarts`` is then the most runs.
        p_init: initial fraction of features per window (0.8: AutoAttack's setting, Linf and L2).
        loss: "margin" (``z_y - max_{i != y} z_i``, the default) or "ce" (cross-entropy);
            targeted: the margin to the target class with cross-entropy acceptance, as the paper.
        rescale_schedule: rescale the p schedule's breakpoints to ``n_queries`` (the paper's code,
            and pyautoattack's ``SquareAttack`` default); False: absolute breakpoints (AutoAttack's
            setting with 5,000 queries).
        warm_start: on a fixed-point model whose forward is its ``run`` (a DEQ), start each query's
            forward solve from the converged fixed point of the sample's current best point
            (cheaper; off by default because it scores a function other than the model's
            inference where that inference is inexact, see the module docstring).
        seed: seed of the random draws (pyautoattack's order and stream).
        speculate: (Linf, cold queries) up to this many of a sample's next proposals per query
            batch, built as if the earlier ones are rejected; the sample takes them in order up
            to the first accepted one. The same decisions as one proposal per query (each
            sample's search depends only on its own answers and the iterations' draws) in fewer,
            larger batches: cheaper where a query's cost is mostly per batch (small models, a
            GPU), dearer where it is per row; the proposals after an accepted one are queried
            for nothing (``last_stats["speculative"]``). 1: one proposal per query.

    ``last_stats``: ``queries`` (samples queried, summed over iterations), ``solver_steps``
    (forward-solver iterations summed over queried samples, DEQs), ``warm_started``,
    ``redone_cold`` (warm-started solves that did not converge), ``confirmed_cold`` /
    ``rejected_by_cold`` (claimed misclassifications checked by the model's inference),
    ``unchanged`` (proposals equal to the sample's best point, not queried: the model's answer
    there cannot improve on the best point's), ``speculative`` (proposals queried after one the
    search accepted, with ``speculate``), ``restarted`` (samples attacked by the runs after
    the first), ``runs`` (the runs made) and ``broken`` (samples the model's inference
    misclassifies at the returned examples; untargeted, a tie with the true class is wrong, as
    in the evaluation and in the search's own success test ``margin <= 0``).
    """

    name = "Square"
    needs_input_gradient = False  # queries outputs only: a model without input gradient is fine

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", n_queries: int = 5000,
                 n_restarts: int = 1, p_init: float = 0.8, loss: str = "margin",
                 rescale_schedule: bool = True, warm_start: bool = False, targeted: bool = False,
                 seed: Optional[int] = 0, restart_fraction: Optional[float] = None,
                 restart_while_breaking: bool = False, speculate: int = 1, full_runs: int = 1):
        super().__init__(model, eps=eps, norm=norm, targeted=targeted, seed=seed)
        self.full_runs = check_int(full_runs, "full_runs", low=1)
        if self.full_runs > 1 and restart_fraction is None:
            raise ConfigError("full_runs is for restart_fraction (without it every run attacks "
                              "every sample left)")
        self.speculate = check_int(speculate, "speculate", low=1)
        if self.speculate > 1 and (norm != "Linf" or warm_start):
            raise ConfigError("speculate > 1 is for the Linf search with cold queries (the L2 "
                              "search's draws depend on how many samples are left, and warm "
                              "queries start from the current best point's fixed point)")
        self.n_queries = check_int(n_queries, "n_queries", low=1)
        self.n_restarts = check_int(n_restarts, "n_restarts", low=1)
        self.restart_fraction = check_number(restart_fraction, "restart_fraction", strict=True,
                                             allow_none=True)
        if self.restart_fraction is not None and self.restart_fraction > 1:
            raise ConfigError(f"restart_fraction must be in (0, 1], got {restart_fraction!r}")
        self.p_init = check_number(p_init, "p_init", strict=True)
        if self.p_init > 1:
            raise ConfigError(f"p_init must be in (0, 1], got {p_init!r}")
        if loss not in LOSSES:
            raise ConfigError(f"unknown Square loss {loss!r}; expected one of {', '.join(LOSSES)}")
        self.loss = loss
        for name, v in (("rescale_schedule", rescale_schedule), ("warm_start", warm_start),
                        ("restart_while_breaking", restart_while_breaking)):
            if not isinstance(v, bool):
                raise ConfigError(f"{name} must be a bool, got {v!r}")
        self.rescale_schedule = rescale_schedule
        self.warm_start = warm_start
        self.restart_while_breaking = restart_while_breaking

    def params(self) -> Dict[str, Any]:
        """The settings reported by :meth:`describe`: queries, restarts, ``p_init``, loss, the
        rescaling schedule, whether queries are warm-started on this model, and the restart
        and speculation options where set."""
        out = {"n_queries": self.n_queries, "n_restarts": self.n_restarts, "p_init": self.p_init,
               "loss": self.loss, "rescale_schedule": self.rescale_schedule,
               "warm_start": self.warm_start and warm_queries_supported(self.model)}
        if self.restart_fraction is not None:
            out["restart_fraction"] = self.restart_fraction
            out["full_runs"] = self.full_runs
        if self.restart_while_breaking:
            out["restart_while_breaking"] = True
        if self.speculate > 1:
            out["speculate"] = self.speculate
        return out

    # -- the search -------------------------------------------------------------------------------
    def _margin_loss(self, logits: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """(margin, loss) per sample, as the paper: margin > 0 while the attack has not succeeded,
        loss the quantity the search lowers."""
        logits = logits.detach()
        xent = F.cross_entropy(logits, y, reduction="none")
        u = torch.arange(logits.shape[0], device=logits.device)
        y_corr = logits[u, y].clone()
        others = logits.clone()
        others[u, y] = -float("inf")
        y_others = others.max(dim=-1)[0]
        if self.targeted:
            return y_others - y_corr, xent
        if self.loss == "ce":
            return y_corr - y_others, -1.0 * xent
        return y_corr - y_others, y_corr - y_others

    def _perturb(self, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        shape = x.shape
        x4 = _as_images(x)
        deq = warm_queries_supported(self.model)
        oracle = _Oracle(self.model, x4.shape[0], self.warm_start, deq)

        def judge_logits(logits: Tensor, yy: Tensor) -> Tensor:
            if self.targeted:
                return logits.argmax(dim=1) == yy
            # broken unless the true class's logit is strictly above every other: the search's
            # own success test (margin <= 0) and the evaluation's rule (a tie is wrong), so a
            # search that stops at a tie keeps its example
            return ~correct(logits, yy)

        def model_logits(xq: Tensor) -> Tensor:
            return self.model(xq.reshape((-1,) + tuple(shape[1:])))

        with torch.no_grad():
            clean = model_logits(x4)
            check_num_classes(y, clean)
            broken = judge_logits(clean, y)
            # restart_fraction's gate: each sample's best margin over the runs so far
            near = self.restart_fraction * self._margin_loss(clean, y)[0] \
                if self.restart_fraction is not None else None
            best = torch.full_like(clean[:, 0], float("inf"))
            adv = x4.clone()
            restarted, runs, broke_last = 0, 0, False
            for run in range(self.n_restarts):
                if run and self.restart_while_breaking and not broke_last:
                    break
                live = ~broken if run < self.full_runs or near is None else ~broken & (best < near)
                todo = live.nonzero().flatten()
                if todo.numel() == 0:
                    break
                restarted += int(todo.numel()) if run else 0
                oracle.reset()
                adv_curr, margin = self._single_run(x4[todo], y[todo], gen, oracle, shape)
                best[todo] = torch.minimum(best[todo], margin.to(best.dtype))
                now = judge_logits(model_logits(adv_curr), y[todo])  # the model's own inference
                hit = todo[now]
                broken[hit] = True
                adv[hit] = adv_curr[now]
                runs += 1
                broke_last = bool(now.any())
        self.last_stats = dict(oracle.stats, broken=int(broken.sum()), n=int(x.shape[0]),
                               restarted=restarted, runs=runs)
        return adv.reshape(shape)

    def _single_run(self, x: Tensor, y: Tensor, gen: torch.Generator, oracle: _Oracle,
                    shape) -> Tuple[Tensor, Tensor]:
        """One run: (the best point of each sample, its margin there; <= 0 where the run
        succeeded in the search's judgement)."""
        c, h, w = x.shape[1:]
        n_features = c * h * w
        dev, dt = x.device, x.dtype
        eps = self.eps

        def rand(*size) -> Tensor:
            return torch.rand(size, generator=gen).to(dev)

        def choice(*size) -> Tensor:
            return torch.sign(2 * rand(*size) - 1)

        def randint(high: int) -> int:
            return int((0 + (high - 0) * torch.rand([1], generator=gen)).long())

        def judge(yy):
            return lambda logits: self._margin_loss(logits, yy)[0] <= 0

        def query(xq: Tensor, idx: Tensor, yy: Tensor):
            logits, z, ok = oracle.logits(xq.reshape((-1,) + tuple(shape[1:])), idx, judge(yy))
            margin, loss = self._margin_loss(logits, yy)
            return margin, loss, z, ok

        all_idx = torch.arange(x.shape[0], device=dev)
        if self.norm == "Linf":
            x_best = stripes_start(x, eps, gen)
        else:
            x_best = torch.clamp(x + _normalize_l2(self._l2_start(x, gen, rand, choice)) * eps, 0.0, 1.0)
        margin_min, loss_min, _, _ = query(x_best, all_idx, y)
        if bool((margin_min < 0.0).all()):
            return x_best, margin_min
        if self.norm == "Linf" and self.speculate > 1:
            return self._speculative_linf(x, x_best, margin_min, loss_min, y, query, oracle, gen,
                                          choice, randint)

        for i_iter in range(self.n_queries):
            idx = (margin_min > 0.0).nonzero().flatten()
            x_curr, x_best_curr, y_curr = x[idx], x_best[idx], y[idx]
            margin_min_curr, loss_min_curr = margin_min[idx], loss_min[idx]
            p = p_selection(self.p_init, i_iter, self.n_queries, self.rescale_schedule)
            if self.norm == "Linf":
                s = max(int(round(math.sqrt(p * n_features / c))), 1)
                s = min(s, min(h, w))
                vh, vw = randint(h - s), randint(w - s)
                new_deltas = torch.zeros([c, h, w], device=dev, dtype=dt)
                new_deltas[:, vh:vh + s, vw:vw + s] = 2.0 * eps * choice(c, 1, 1).to(dt)
                x_new = x_best_curr + new_deltas
                x_new = torch.min(torch.max(x_new, x_curr - eps), x_curr + eps)
                x_new = torch.clamp(x_new, 0.0, 1.0)
            else:
                x_new = self._l2_proposal(x_curr, x_best_curr, p, n_features, gen, rand, choice, randint)
            # a proposal equal to the sample's best point (its window already at the drawn vertex,
            # or clipped back to it) is not queried: the model's answer there is the best point's,
            # so it cannot improve
            moved = (x_new != x_best_curr).flatten(1).any(dim=1)
            n_moved = int(moved.sum())
            oracle.stats["unchanged"] += int(idx.numel()) - n_moved
            if n_moved == 0:
                continue
            q = None if n_moved == idx.numel() else moved.nonzero().flatten()
            xq, iq, yq = (x_new, idx, y_curr) if q is None else (x_new[q], idx[q], y_curr[q])
            margin, loss, z, ok = query(xq, iq, yq)
            if q is not None:
                margin = margin_min_curr.clone().index_copy_(0, q, margin.to(margin_min_curr.dtype))
                loss = loss_min_curr.clone().index_copy_(0, q, loss.to(loss_min_curr.dtype))
                if z is not None:
                    z = z.new_zeros((idx.numel(),) + tuple(z.shape[1:])).index_copy_(0, q, z)
                    ok = ok.new_zeros(idx.numel()).index_copy_(0, q, ok)
            improved = loss < loss_min_curr
            loss_min[idx] = torch.where(improved, loss, loss_min_curr)
            improved = improved | (margin <= 0.0)
            margin_min[idx] = torch.where(improved, margin, margin_min_curr)
            x_best[idx] = torch.where(improved.view(-1, 1, 1, 1), x_new, x_best_curr)
            oracle.accept(idx, improved, z, ok)
            if bool((margin_min <= 0.0).all()):
                break
        return x_best, margin_min

    def _speculative_linf(self, x, x_best, margin_min, loss_min, y, query, oracle, gen, choice,
                          randint) -> Tuple[Tensor, Tensor]:
        """The Linf search of :meth:`_single_run` with each sample's next proposals queried
        together: the proposals of its next ``k`` iterations (``k`` at most ``speculate``, see
        :meth:`_lookahead`), each built from its current best point as the search builds it
        while no earlier one is accepted, are queried in one batch with the other samples'; the
        sample then takes them in order up to the first accepted one and goes on from there (the
        proposals after it were built from a point it left: queried for nothing). A sample's
        search depends only on its own answers and on the iterations' draws (windows and signs,
        shared by all samples, drawn in iteration order), so each sample makes the decisions of
        the one-iteration-at-a-time search, at fewer, larger query batches. Draws made beyond
        the last iteration that search reaches are undone (the generator is restored), so later
        runs draw as after it."""
        n, c, h, w = x.shape
        n_features = c * h * w
        dev, dt, eps = x.device, x.dtype, self.eps
        gen_state = {}                       # generator state before an iteration's draws
        # per iteration drawn so far: window (side, row, column) and the signs times 2 eps
        windows = torch.zeros((0, 3), dtype=torch.long, device=dev)
        signs = torch.zeros((0, c), dtype=dt, device=dev)

        def draw_until(last: int) -> None:
            nonlocal windows, signs
            new_w, new_s = [], []
            for it in range(windows.shape[0], last + 1):
                gen_state[it] = gen.get_state()
                p = p_selection(self.p_init, it, self.n_queries, self.rescale_schedule)
                sq = min(max(int(round(math.sqrt(p * n_features / c))), 1), min(h, w))
                vh, vw = randint(h - sq), randint(w - sq)
                new_w.append((sq, vh, vw))
                new_s.append(2.0 * eps * choice(c, 1, 1).to(dt).reshape(c))
            if new_w:
                windows = torch.cat([windows, torch.tensor(new_w, dtype=torch.long, device=dev)])
                signs = torch.cat([signs, torch.stack(new_s)])

        t = torch.zeros(n, dtype=torch.long, device=dev)       # each sample's next iteration
        gap = torch.zeros(n, dtype=torch.long, device=dev)     # iterations since it last moved
        ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
        while True:
            idx = ((margin_min > 0.0) & (t < self.n_queries)).nonzero().flatten()
            if idx.numel() == 0:
                break
            k = self._lookahead(gap[idx]).clamp(max=self.n_queries - t[idx])     # (A,)
            kmax = int(k.max())
            draw_until(int((t[idx] + k).max()) - 1)
            for it in [i for i in gen_state if i < int(t.max())]:
                del gen_state[it]
            steps = torch.arange(kmax, device=dev)
            valid = steps[None, :] < k[:, None]                                  # (A, K)
            its = (t[idx][:, None] + steps[None, :]).clamp(max=windows.shape[0] - 1)
            sq, vh, vw = windows[its].unbind(-1)
            in_h = (ar_h >= vh[..., None]) & (ar_h < (vh + sq)[..., None])        # (A, K, h)
            in_w = (ar_w >= vw[..., None]) & (ar_w < (vw + sq)[..., None])        # (A, K, w)
            window = in_h[..., :, None] & in_w[..., None, :]                       # (A, K, h, w)
            sign = signs[its]                                                     # (A, K, c)
            delta = torch.where(window[:, :, None], sign[..., None, None],
                                torch.zeros((), device=dev, dtype=dt))
            x_curr, x_best_curr = x[idx][:, None], x_best[idx][:, None]
            x_new = torch.clamp(torch.min(torch.max(x_best_curr + delta, x_curr - eps),
                                          x_curr + eps), 0.0, 1.0)                 # (A, K, c, h, w)
            moved = valid & (x_new != x_best_curr).flatten(2).any(dim=2)
            q = moved.nonzero()
            margin = torch.full((idx.numel(), kmax), float("inf"), device=dev, dtype=margin_min.dtype)
            loss = margin.clone()
            if q.numel():
                mq, lq, _, _ = query(x_new[q[:, 0], q[:, 1]], idx[q[:, 0]], y[idx][q[:, 0]])
                margin[q[:, 0], q[:, 1]] = mq.to(margin.dtype)
                loss[q[:, 0], q[:, 1]] = lq.to(loss.dtype)
            lm = loss_min[idx][:, None]
            accept = moved & ((loss < lm) | (margin <= 0.0))
            has = accept.any(dim=1)
            first = torch.where(has, accept.int().argmax(dim=1), k - 1)   # the last one taken
            taken = steps[None, :] <= first[:, None]
            oracle.stats["unchanged"] += int((valid & taken & ~moved).sum())
            oracle.stats["speculative"] += int((moved & ~taken).sum())
            rows = has.nonzero().flatten()
            if rows.numel():
                kk, s_idx = first[rows], idx[rows]
                l_new, m_new = loss[rows, kk], margin[rows, kk]
                loss_min[s_idx] = torch.where(l_new < lm[rows, 0], l_new, lm[rows, 0])
                margin_min[s_idx] = m_new
                x_best[s_idx] = x_new[rows, kk]
            t[idx] += first + 1
            gap[idx] = torch.where(has, torch.zeros_like(first), gap[idx] + first + 1)
        end = int(t.max())          # the one-at-a-time search's draws: iterations 0 .. end - 1
        if windows.shape[0] > end:
            gen.set_state(gen_state[end])
        return x_best, margin_min

    def _lookahead(self, gap: Tensor) -> Tensor:
        """Proposals per sample in the next query batch: ``min(speculate, 1 + gap // 2)`` for a
        sample whose last ``gap`` proposals were all rejected (a search that moves often wastes
        the proposals after a move; one that has not moved for long rarely does)."""
        return torch.clamp(1 + gap // 2, max=self.speculate)

    # -- L2: centred squares ----------------------------------------------------------------------
    def _l2_start(self, x, gen, rand, choice) -> Tensor:
        b, c, h, w = x.shape
        delta = torch.zeros_like(x)
        s = h // 5
        if s < 1:
            raise ConfigError(f"the L2 Square attack needs images of height >= 5, got {h}")
        sp = (h - s * 5) // 2
        vh = sp
        for _ in range(h // s):
            vw = sp
            for _ in range(w // s):
                delta[:, :, vh:vh + s, vw:vw + s] += (_eta(s, rand, x).view(1, 1, s, s)
                                                      * choice(b, c, 1, 1).to(x.dtype))
                vw += s
            vh += s
        return delta

    def _l2_proposal(self, x_curr, x_best_curr, p, n_features, gen, rand, choice, randint) -> Tensor:
        b, c, h, w = x_curr.shape
        eps = self.eps
        delta = x_best_curr - x_curr
        s = max(int(round(math.sqrt(p * n_features / c))), 3)
        if s % 2 == 0:
            s += 1
        s = min(s, min(h, w))
        vh, vw = randint(h - s), randint(w - s)
        mask1 = torch.zeros_like(x_curr)
        mask1[:, :, vh:vh + s, vw:vw + s] = 1.0
        norms_window_1 = (delta[:, :, vh:vh + s, vw:vw + s] ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
        vh2, vw2 = randint(h - s), randint(w - s)
        mask2 = torch.zeros_like(x_curr)
        mask2[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1.0
        norms_image = _l2_norm(x_best_curr - x_curr)
        mask_image = torch.max(mask1, mask2)
        norms_windows = ((delta * mask_image) ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
        new = torch.ones([b, c, s, s], device=x_curr.device, dtype=x_curr.dtype)
        new *= _eta(s, rand, x_curr).view(1, 1, s, s) * choice(b, c, 1, 1).to(x_curr.dtype)
        new += delta[:, :, vh:vh + s, vw:vw + s] / (1e-12 + norms_window_1)
        room = torch.max((eps * torch.ones_like(new)) ** 2 - norms_image ** 2, torch.zeros_like(new))
        new = new / (1e-12 + (new ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * (
            room / c + norms_windows ** 2).sqrt()
        delta[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
        delta[:, :, vh:vh + s, vw:vw + s] = new + 0
        return torch.clamp(x_curr + _normalize_l2(delta) * eps, 0.0, 1.0)


def stripes_start(x: Tensor, eps: float, gen: torch.Generator) -> Tensor:
    """The Linf Square attack's start: ``x`` shifted by ``+eps`` or ``-eps``, one random sign per
    column and channel (images ``(..., h, w)``; flat ``(B, D)`` inputs: one per feature), clipped
    to [0, 1]. The signs are ``sign(2u - 1)`` for ``u`` uniform, drawn from ``gen``."""
    shape = tuple(x.shape[:-2]) + (1, x.shape[-1]) if x.dim() >= 3 else tuple(x.shape)
    signs = torch.sign(2 * torch.rand(shape, generator=gen, device=gen.device) - 1).to(x)
    return torch.clamp(x + eps * signs, 0.0, 1.0)


def _as_images(x: Tensor) -> Tensor:
    """``x`` as (B, c, h, w): images as they are, (B, h, w) with one channel, flat features as
    one row (B, 1, 1, D)."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], 1, 1, -1)


def _l2_norm(x: Tensor) -> Tensor:
    return (x ** 2).view(x.shape[0], -1).sum(-1).sqrt().view(-1, 1, 1, 1)


def _normalize_l2(x: Tensor) -> Tensor:
    return x / (_l2_norm(x) + 1e-12)


def _rectangles(a: int, b: int, like: Tensor) -> Tensor:
    """Concentric rectangles centred in an (a, b) window, ring k weighted 1 / (k + 1)^2, unit
    L2 norm."""
    delta = torch.zeros([a, b], device=like.device, dtype=like.dtype)
    c0, c1 = a // 2, b // 2
    for k in range(max(a // 2 + 1, b // 2 + 1)):
        delta[max(c0, 0):min(c0 + (2 * k + 1), a), max(0, c1):min(c1 + (2 * k + 1), b)] += (
            1.0 / (torch.tensor([[float(k + 1)]], device=like.device, dtype=like.dtype) ** 2))
        c0 -= 1
        c1 -= 1
    return delta / (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


def _eta(s: int, rand, like: Tensor) -> Tensor:
    """The centred-square perturbation of side ``s``: rectangles of one sign in the top half and
    of the other in the bottom half, unit L2 norm, transposed with probability 1/2."""
    delta = torch.zeros([s, s], device=like.device, dtype=like.dtype)
    delta[:s // 2] = _rectangles(s // 2, s, like)
    delta[s // 2:] = -1.0 * _rectangles(s - s // 2, s, like)
    delta = delta / (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt()
    if bool(rand(1) > 0.5):
        delta = delta.permute([1, 0])
    return delta


__all__ = ["Square", "p_selection", "stripes_start", "warm_queries_supported"]
