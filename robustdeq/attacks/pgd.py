"""FGSM and PGD (Linf, L2) with a per-attack gradient estimator and solver warm starts.

Both attacks take their input gradients from :class:`robustdeq.attacks.oracle.GradientOracle`
(the ``method`` is the oracle's policy). PGD's default on a DEQ (``method="auto"``) is the joint forward/adjoint/input iteration of
:mod:`robustdeq.deq.joint` when the attack's gradient is the implicit one, for the samples whose
first solve converges (their examples are then judged by the model's own inference); for the
other samples, the other gradients, and with ``method="exact"``, the exact loop described next.

For a DEQ (a model with ``solve``), step ``t`` of PGD starts the forward solver from the fixed
point of step ``t - 1`` (``z0 = z*(x_{t-1})``) for every sample whose solve converged there (the
others start from the model's initial state, see :mod:`robustdeq.deq.warm`); with the
implicit (IFT) gradient, the adjoint solve ``a = J^T a + g`` likewise starts from the previous
step's converged adjoint, and both solves run on a
batch that shrinks as samples converge (the solver's per-sample results are unchanged, see
``robustdeq/deq/shrink.py``). Each step costs one forward solve and one adjoint solve, nothing else. How much
this saves depends on the model: warm starts cut the per-sample iterations, but a batch's solve
lasts as long as its slowest sample, so samples that never converge (they run to ``max_iter``
at every step) bound the gain; benchmarks/bench_attacks.py measures it. Any other ``nn.Module``
``x -> logits`` is attacked as is (no warm start), with exactly torchattacks' update order, so
that on a feed-forward model ``PGD(random_start=False)`` reproduces ``torchattacks.PGD`` /
``PGDL2`` bit for bit.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from .._tensor import (bshape, clip_delta, correct, default_alpha, per_sample_norm, random_in_ball,
                       targeted_margins, verdict_margins)
from ..errors import ConfigError
from .base import (Attack, check_int, check_number, cross_entropy, estimator_name, get_loss,
                   is_deq, logits_of)
from .oracle import POLICIES, GradientOracle, InputGradient

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
GradFn = Callable[[Tensor, Tensor], Tensor]


def pgd_step(adv: Tensor, images: Tensor, g: Tensor, *, eps: float, alpha: float, norm: str,
             eps_for_division: float = 1e-10) -> Tensor:
    """One projected ascent step from ``adv`` along ``g`` (torchattacks' PGD / PGDL2 order).

    Linf: ``x <- clip_[0,1](x0 + clip_eps(x + alpha sign(g) - x0))``; L2: ``x <- x + alpha g /
    ||g|| + eps_for_division)``, rescale ``x - x0`` into the ball (:func:`robustdeq._tensor.clip_delta`),
    clip to [0, 1]."""
    if norm == "Linf":
        adv = adv.detach() + alpha * g.sign()
        delta = clip_delta(adv - images, eps, "Linf")
        return torch.clamp(images + delta, min=0, max=1).detach()
    b = images.shape[0]
    g_norm = torch.norm(g.reshape(b, -1), p=2, dim=1) + eps_for_division
    adv = adv.detach() + alpha * (g / g_norm.view(bshape(images)))
    # clip_delta's factor is bit for bit torchattacks' nan_to_num(min(eps / ||d||, 1), nan=1)
    delta = clip_delta(adv - images, eps, "L2")
    return torch.clamp(images + delta, min=0, max=1).detach()


def pgd_loop(x: Tensor, y: Tensor, grad_fn: GradFn, *, eps: float, alpha: float, steps: int,
             norm: str, random_start: bool, gen: Optional[torch.Generator],
             eps_for_division: float = 1e-10,
             success_fn: Optional[Callable[[], Tensor]] = None,
             select_fn: Optional[Callable[[Tensor], None]] = None,
             start: Optional[Tensor] = None, frozen_at: Optional[Tensor] = None,
             budget: Optional[Tensor] = None, random_radius: str = "volume") -> Tensor:
    """Projected gradient ascent on the loss behind ``grad_fn(x_adv, y) -> gradient``
    (:func:`pgd_step` per step), from ``start`` (default: ``x``, plus a random start).

    Early stopping: with ``success_fn``, called right after each ``grad_fn`` call, returning a
    bool per sample of that call (the samples that succeed at the point just evaluated), the
    succeeding samples are frozen at that point and the next steps run on the others only;
    ``frozen_at`` (a (B,) int64 tensor, if given) receives the step each sample was frozen at
    (-1: never). ``budget`` (B,) gives each sample its own number of steps (at most ``steps``).
    Whenever samples leave, ``select_fn(keep)`` is told which samples of the latest call go on
    (for warm starts). The other samples follow exactly the plain loop's iterates (the losses
    are per-sample means and the steps per-sample sign or normalised).

    The loss behind ``grad_fn`` is the caller's: a batch mean (the attacks, torchattacks' loss) or
    a batch sum (the training objectives' inner maximisation) give the same per-sample gradient
    up to the factor B, which the Linf sign step ignores exactly; the L2 step divides by
    ``||g|| + eps_for_division``, so only the size of ``eps_for_division`` relative to ``||g||``
    tells the two apart. The random start is :func:`robustdeq._tensor.random_in_ball` with
    ``radius=random_radius`` (``gen=None``: the global RNG).
    """
    images = x.detach()
    adv = images.clone() if start is None else start.detach().clone()
    if random_start:
        adv = torch.clamp(adv + random_in_ball(adv, eps, norm, gen, radius=random_radius),
                          min=0, max=1).detach()
    if frozen_at is not None:
        frozen_at.fill_(-1)
    if budget is not None:
        steps = min(steps, int(budget.max())) if budget.numel() else 0
    idx: Optional[Tensor] = None  # the samples still attacked (None: all)
    for t in range(steps):
        if budget is not None:
            done = (budget if idx is None else budget[idx]) <= t
            if bool(done.any()):
                keep = (~done).nonzero()[:, 0]
                if t and select_fn is not None:
                    select_fn(keep)
                idx = keep if idx is None else idx[keep]
        cur, x0, yy = (adv, images, y) if idx is None else (adv[idx], images[idx], y[idx])
        g = grad_fn(cur, yy)
        if success_fn is not None:
            hit = success_fn()
            if bool(hit.any()):
                if frozen_at is not None:
                    rows = hit.nonzero()[:, 0]
                    frozen_at[rows if idx is None else idx[rows]] = t
                keep = (~hit).nonzero()[:, 0]
                if keep.numel() == 0:
                    break
                if select_fn is not None:
                    select_fn(keep)
                cur, x0, g = cur[keep], x0[keep], g[keep]
                idx = keep if idx is None else idx[keep]
        new = pgd_step(cur, x0, g, eps=eps, alpha=alpha, norm=norm, eps_for_division=eps_for_division)
        adv = new if idx is None else adv.index_copy(0, idx, new)
    return adv


def succeeded(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """(B,) bool: untargeted, the true class's logit is not strictly above every other (a tie
    between it and another class is a success: the evaluation's rule,
    :func:`robustdeq._tensor.correct`); targeted, the prediction ``argmax`` is the target (a
    tie resolves to the lower index, as ``argmax`` does)."""
    if targeted:
        return logits.argmax(dim=1) == y
    return ~correct(logits, y)




METHODS = POLICIES


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al., ICLR 2015); L2: one normalised gradient step of
    length eps. Same update as ``torchattacks.FGSM`` for Linf."""

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", targeted: bool = False,
                 seed: Optional[int] = None, grad=None):
        super().__init__(model, eps=eps, norm=norm, targeted=targeted, seed=seed)
        self.oracle = GradientOracle(model, "exact", grad, warm_start=False)
        self.grad = self.oracle.estimator
        g = estimator_name(self.grad) if self.grad is not None else (
            estimator_name(getattr(model, "estimator", None)) if is_deq(model) else None)
        self.name = "FGSM" + (" L2" if self.norm == "L2" else "") + (f" ({g})" if g else "")

    def params(self) -> Dict[str, Any]:
        """The settings reported by :meth:`describe`: the gradient estimator's name."""
        return {"grad": estimator_name(self.grad) if self.grad is not None else "model default"}

    def _perturb(self, x, y, gen):
        self.oracle.reset()
        g = self.oracle(x, y, self.loss_fn(cross_entropy)).grad
        if self.norm == "Linf":
            adv = x + self.eps * g.sign()
        else:
            n = per_sample_norm(g) + 1e-10
            adv = x + self.eps * g / n.view(bshape(x))
        self.last_stats = dict(self.oracle.stats)
        self.oracle.warn_if_unconverged(self.name)
        return torch.clamp(adv, min=0, max=1).detach()


class PGD(Attack):
    """Projected gradient descent (Madry et al., ICLR 2018), Linf or L2, on any ``x -> logits`` model.

    Args:
        eps, alpha, steps, random_start, norm: torchattacks' names; ``alpha`` defaults to
            ``2.5 * eps / steps``.
        grad: gradient estimator for a DEQ ("ift", "phantom", "unrolled", "full" or an instance);
            None: the model's default (the default).
        method: how the gradient of a DEQ is computed along the attack.
            ``"auto"`` (the default): the DEQ-native joint iteration (below) when the attack's
            gradient is the implicit one at its defaults (``grad="ift"``, or ``None`` on a model
            whose own estimator is implicit), for the samples whose first solve (the model's
            own, at the starting point) converges; the exact loop for the others and for every
            other gradient. ``"exact"``: the exact
            loop: at every step a forward solve and, for the implicit gradient, an adjoint solve
            to tolerance, warm-started from the previous step where that converged.
            ``"joint"``: the joint iteration regardless of convergence.
            The joint iteration (:class:`robustdeq.deq.joint.JointInputGradient`) carries the DEQ
            state and the adjoint across steps (a few solver iterations and adjoint sweeps per
            step); it costs a fraction of exact PGD at the same robust accuracy on DEQs whose
            solves converge, and is weaker on DEQs whose solves never converge (hence the
            convergence condition of ``"auto"``). Its iterates are not the model's solves, so its
            final examples are judged per sample by the model's own (cold) inference: the last
            iterate, the iterate of lowest margin on the iteration's logits and the latest
            evaluated points (``judge`` candidates in all), keeping the one of lowest margin;
            ``last_robust`` then holds the per-sample robust flags, and ``last_methods`` says
            which method each run (restart) used.
        joint_options: for the joint iteration: ``fwd_iters`` (3), ``adj_iters`` (3),
            ``first_adj_iters`` (8), ``fwd_solver`` ("auto", "model" or "picard"), ``judge`` (8).
        warm_start: warm-start the DEQ's forward (and IFT adjoint) solves from the previous step
            (ignored for models without ``solve`` and for full backpropagation).
        loss: "ce" (cross-entropy), "margin" (Carlini-Wagner logit margin) or "dlr"
            (difference of logits ratio).
        restarts: runs from independent random starts; each restart attacks only the samples
            no earlier run has broken (judged by the attacked module's own inference), and each
            sample keeps the example of lowest margin (AutoAttack's rule for APGD's restarts).
        targeted: ``y`` holds target classes; the attack descends their cross-entropy.
        seed: seed of the random start.
        early_stop: freeze a sample once the attack has succeeded (misclassified, or
            classified as the target) at two consecutive iterates, and go on with the others
            only; the frozen samples are confirmed at the end by the model's own inference, and
            any that is not resumes the plain loop where it was frozen (the exact loop only; the
            joint iteration is judged at its end). Never weaker per sample
            than the plain loop (which returns its last iterate, successful or not), and much
            cheaper once most samples are broken. Off by default, which keeps torchattacks'
            semantics (on a feed-forward model the plain loop is bit for bit
            ``torchattacks.PGD``). For a DEQ, success during the loop is judged on the attack's
            own (warm-started) solves, and only where they converged; ``last_stats`` counts the
            ``frozen`` and ``unconfirmed`` samples.
    """

    def __init__(self, model: nn.Module, *, eps: float, alpha: Optional[float] = None,
                 steps: int = 10, random_start: bool = True, norm: str = "Linf", grad=None,
                 warm_start: bool = True, loss: str = "ce", targeted: bool = False,
                 seed: Optional[int] = None, early_stop: bool = False, restarts: int = 1,
                 joint_options: Optional[Dict[str, int]] = None, method: str = "auto"):
        super().__init__(model, eps=eps, norm=norm, targeted=targeted, seed=seed)
        self.steps = check_int(steps, "steps", low=1)
        self.restarts = check_int(restarts, "restarts", low=1)
        if self.restarts > 1 and not random_start:
            raise ConfigError("restarts > 1 needs random_start=True (otherwise every restart is the same run)")
        if not isinstance(early_stop, bool):
            raise ConfigError(f"early_stop must be a bool, got {early_stop!r}")
        self.early_stop = early_stop
        self.alpha = (default_alpha(self.eps, self.steps) if alpha is None
                      else check_number(alpha, "alpha"))
        if not isinstance(random_start, bool):
            raise ConfigError(f"random_start must be a bool, got {random_start!r}")
        self.random_start = random_start
        if not isinstance(warm_start, bool):
            raise ConfigError(f"warm_start must be a bool, got {warm_start!r}")
        self.loss = loss
        self._loss = get_loss(loss)
        if method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.joint_options = dict(joint_options or {})
        #: candidates per sample judged by the model's own inference at the end: the last
        #: iterate, the iterate of lowest margin on the iteration's logits, then the latest points
        self.joint_judge = check_int(self.joint_options.pop("judge", 8), "judge", low=1)
        if method == "joint" and early_stop:
            from ..deq.joint import supports_joint
            if is_deq(model) and supports_joint(model):
                raise ConfigError("method='joint' does not combine with early_stop (its iterates are "
                                  "judged by the model's inference at the end only)")
        #: the input-gradient oracle (robustdeq.attacks.oracle): the policy "joint", "auto" (the
        #: joint iteration for the samples whose first solve converges, the exact loop for the
        #: others) or "exact"
        self.oracle = GradientOracle(model, method, grad, warm_start=warm_start,
                                     joint_options=self.joint_options)
        if joint_options is not None and self.oracle.policy == "exact":
            raise ConfigError("joint_options is only for the joint iteration (method='joint' or "
                              "'auto' on a DEQ with the implicit gradient)")
        self.grad = self.oracle.estimator
        method = self.oracle.policy
        self.method = method
        self.joint = method == "joint"
        self.warm_start = warm_start
        self.last_robust: Optional[Tensor] = None
        #: per run of the latest call (one entry per restart): "joint", "exact" or "mixed"
        self.last_methods: list = []
        g = estimator_name(self.grad) if self.grad is not None else (
            estimator_name(getattr(model, "estimator", None)) if is_deq(model) else None)
        g = {"joint": "joint", "auto": f"{g}, auto"}.get(method, g)
        self.name = ("PGD" + ("-L2" if self.norm == "L2" else "")
                     + {"dlr": "-DLR", "margin": "-margin"}.get(loss, "")
                     + f"-{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")
                     + (f" ({g})" if g else ""))

    @property
    def joint_oracle(self):
        """The joint iteration behind the oracle (None under the exact policy)."""
        return self.oracle.joint

    def params(self) -> Dict[str, Any]:
        """The settings reported by :meth:`describe`: step size, steps, random start, loss,
        restarts, method, gradient, the joint iteration's options where it runs, whether the
        exact solves are warm-started, and early stopping."""
        out = {"alpha": self.alpha, "steps": self.steps, "random_start": self.random_start,
               "loss": self.loss, "restarts": self.restarts, "method": self.method,
               "grad": ("joint" if self.joint else estimator_name(self.grad) if self.grad is not None
                        else "model default")}
        if self.joint_oracle is not None:
            o = self.joint_oracle
            out["joint_options"] = {"fwd_iters": o.fwd_iters, "adj_iters": o.adj_iters,
                                    "first_adj_iters": o.first_adj_iters, "fwd_solver": o.fwd_solver,
                                    "judge": self.joint_judge}
        if not self.joint:
            out["warm_start"] = self.oracle.warm()
        out["early_stop"] = self.early_stop and not self.joint
        return out

    def _perturb(self, x, y, gen):
        self.last_methods = []
        adv, m_best = self._once(x, y, gen)
        if self.restarts == 1:
            self.last_robust = None if m_best is None else m_best > 0
            return adv
        stats = dict(self.last_stats)
        if m_best is None:
            m_best = self._margin(adv, y)
        attacked = []
        for _ in range(self.restarts - 1):
            rows = (m_best > 0).nonzero()[:, 0]
            attacked.append(int(rows.numel()))
            if not rows.numel():
                break
            cand, m_new = self._once(x[rows], y[rows], gen)
            if m_new is None:
                m_new = self._margin(cand, y[rows])
            better = m_new < m_best[rows]
            adv[rows[better]] = cand[better]
            m_best[rows[better]] = m_new[better]
        self.last_stats = dict(stats, restart_samples=attacked, methods=list(self.last_methods))
        self.last_robust = m_best > 0
        return adv

    def _margin(self, x_adv, y, batch_size: int = 256):
        """Per-sample success margin on the attacked module's own inference (<= 0: success)."""
        logits = logits_of(self.model, x_adv, batch_size=max(1, batch_size))
        if self.targeted:  # <= 0 exactly where argmax == target
            return targeted_margins(logits, y)
        # in the logits' own precision (a float64 margin below float32's resolution stays)
        return verdict_margins(logits, y)

    def _once(self, x, y, gen):
        """One run from one random start: ``(x_adv, cold margins or None)``; the margins are
        the model's own inference's, known where the joint iteration served some samples (their
        results are judged cold).

        The oracle (:class:`robustdeq.attacks.oracle.GradientOracle`) decides per sample which
        computation serves it; every sample starts from the same point either way."""
        self.last_frozen = self.last_unconfirmed = 0
        loss_fn = self.loss_fn(self._loss)
        start = x.detach().clone()
        if self.random_start:  # pgd_loop's random start, drawn here once
            start = torch.clamp(start + random_in_ball(start, self.eps, self.norm, gen,
                                                       radius="volume"), min=0, max=1).detach()
        oracle = self.oracle
        oracle.reset()
        judge = None if oracle.policy == "exact" else _Judge(self.joint_judge - 2, self.targeted)
        latest = {}

        def grad_fn(xa, ya):
            out = oracle(xa, ya, loss_fn)
            latest["out"], latest["y"] = out, ya
            if judge is not None:
                judge.see(xa, out.logits, ya)
            return out.grad

        if self.early_stop:
            adv = self._early_stopped(x, y, grad_fn, start, latest, judge)
        else:
            adv = pgd_loop(x, y, grad_fn, eps=self.eps, alpha=self.alpha, steps=self.steps,
                           norm=self.norm, random_start=False, gen=None, start=start)
        method = oracle.method
        self.last_methods.append(method)
        stats = dict(oracle.stats)
        if self.early_stop:
            # samples frozen early, and those the model's inference did not confirm
            stats.update(frozen=self.last_frozen, unconfirmed=self.last_unconfirmed)
        oracle.warn_if_unconverged(self.name)
        if method == "exact":
            self.last_stats = dict(stats, method="exact")
            return adv, None
        rows = oracle.joint_rows
        m = self._judge(y, adv, judge, rows)
        if method == "joint":
            self.last_stats = dict(stats, method="joint")
        else:
            logger.debug("%s: %d of %d first solves did not converge; the exact loop attacked those",
                         self.name, int((~rows).sum()), int(rows.numel()))
            self.last_stats = dict(stats, method="mixed", joint_samples=int(rows.sum()),
                                   exact_samples=int((~rows).sum()))
        return adv, m

    def _judge(self, y, adv, judge: "_Judge", rows: Tensor) -> Tensor:
        """The joint-served samples' results judged by the model's own inference: per sample,
        the last iterate, the iterate of lowest margin on the iteration's logits and the latest
        evaluated points are evaluated cold, and the one of lowest (cold) margin is kept (the
        others keep their last iterate). Returns the cold margins of ``adv``."""
        m = self._margin(adv, y)
        cands = ([(None, judge.best_x)] if judge.best_x is not None and self.joint_judge > 1
                 else []) + judge.recent[::-1]
        b = adv.shape[0]
        all_rows = torch.arange(b, device=adv.device)
        sel_rows, pts = [], []
        for pos, cand in cands:
            full = all_rows if pos is None else pos
            # only the joint-served samples still robust, and only where the candidate differs
            keep = (m[full] > 0) & rows[full] & (cand != adv[full]).reshape(full.shape[0], -1).any(dim=1)
            sel_rows.append(full[keep])
            pts.append(cand[keep])
        if sel_rows and sum(int(r.numel()) for r in sel_rows):
            # one cold evaluation of all candidates (the model's inference, batch-independent)
            r_all, p_all = torch.cat(sel_rows), torch.cat(pts)
            m_c = self._margin(p_all, y[r_all], batch_size=int(r_all.numel()))
            # per sample the candidate of lowest margin (the first one on ties)
            low = m.scatter_reduce(0, r_all, m_c, reduce="amin", include_self=True)
            js = ((m_c == low[r_all]) & (m_c < m[r_all])).nonzero()[:, 0]
            if js.numel():
                ks = r_all[js]
                ks_sorted, perm = torch.sort(ks, stable=True)
                first = torch.ones_like(ks_sorted, dtype=torch.bool)
                first[1:] = ks_sorted[1:] != ks_sorted[:-1]
                js, ks = js[perm[first]], ks_sorted[first]
                adv[ks] = p_all[js]
                m[ks] = m_c[js]
        return m

    def _early_stopped(self, x, y, grad_fn, start, latest, judge):
        """The loop with early stopping. A sample served by the exact computation is frozen once
        the attack has succeeded at two consecutive iterates (judged on the attack's own solves,
        and only where they converged), so that borderline points are pushed one step further
        (joint-served samples are judged at the end instead, never frozen). The frozen samples
        are then checked with the model's own inference (for a DEQ: a cold solve, not the
        attack's warm-started one, whose equilibrium can differ within the solver's tolerance);
        a sample that is not confirmed resumes the plain loop from its frozen point for the
        steps it had left, so it ends where the plain loop would have."""
        oracle = self.oracle
        streak = {"n": None}

        def success_fn():
            out = latest["out"]
            hit = succeeded(out.logits, latest["y"], self.targeted) & out.converged & ~out.joint
            prev = streak["n"] if streak["n"] is not None else torch.zeros_like(hit, dtype=torch.long)
            streak["n"] = (prev + 1) * hit
            return streak["n"] >= 2

        def select_fn(keep):
            oracle.select(keep)
            if judge is not None:
                judge.select(keep)
            streak["n"] = streak["n"][keep]

        frozen_at = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        adv = pgd_loop(x, y, grad_fn, eps=self.eps, alpha=self.alpha, steps=self.steps,
                       norm=self.norm, random_start=False, gen=None, start=start,
                       success_fn=success_fn, select_fn=select_fn, frozen_at=frozen_at)
        frozen = (frozen_at >= 0).nonzero()[:, 0]
        self.last_frozen = int(frozen.numel())
        if frozen.numel():
            bad = ~succeeded(logits_of(self.model, adv[frozen]), y[frozen], self.targeted)
            rows = frozen[bad]
            self.last_unconfirmed = int(rows.numel())
            if rows.numel():
                # frozen samples are all served by the exact computation: it resumes them
                exact = oracle.exact
                exact.reset_warm_start()
                loss_fn = self.loss_fn(self._loss)
                adv[rows] = pgd_loop(x[rows], y[rows], lambda xa, ya: exact(xa, ya, loss_fn),
                                     eps=self.eps, alpha=self.alpha, steps=self.steps,
                                     norm=self.norm, random_start=False, gen=None,
                                     start=adv[rows], select_fn=exact.select,
                                     budget=self.steps - frozen_at[rows])
        return adv


class _Judge:
    """What the judging of joint-served samples needs from a run: per sample the point of
    lowest margin on the oracle's logits, and the latest ``n_recent`` points evaluated (each
    with the rows of the run's batch it covers, ``None``: all)."""

    def __init__(self, n_recent: int, targeted: bool):
        self.n_recent = n_recent
        self.targeted = targeted
        self.pos: Optional[Tensor] = None
        self.best_m: Optional[Tensor] = None
        self.best_x: Optional[Tensor] = None
        self.recent: list = []

    def select(self, keep: Tensor) -> None:
        self.pos = keep if self.pos is None else self.pos[keep]

    def see(self, xa: Tensor, logits: Tensor, ya: Tensor) -> None:
        pos = self.pos
        if self.n_recent > 0:
            self.recent.append((pos, xa.detach()))
            del self.recent[:-self.n_recent]
        m = targeted_margins(logits, ya) if self.targeted else verdict_margins(logits, ya)
        if self.best_m is None:
            self.best_m, self.best_x = m, xa.detach().clone()
        elif pos is None:
            better = m < self.best_m
            self.best_m = torch.where(better, m, self.best_m)
            self.best_x[better] = xa.detach()[better]
        else:
            better = m < self.best_m[pos]
            r = pos[better]
            self.best_m[r] = m[better]
            self.best_x[r] = xa.detach()[better]


__all__ = ["FGSM", "METHODS", "PGD", "InputGradient", "GradientOracle", "pgd_loop", "pgd_step",
           "succeeded"]
