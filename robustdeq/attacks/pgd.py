"""FGSM and PGD (Linf, L2) with a per-attack gradient estimator and solver warm starts.

PGD's default on a DEQ (``method="auto"``) is the joint forward/adjoint/input iteration of
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
import warnings
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from .._tensor import bshape, clip_delta, default_alpha, per_sample_norm
from ..deq.warm import (WarmStart, implicit_input_gradient, run_warm,
                        supports_implicit_input_gradient)
from ..errors import ConfigError, NonConvergenceWarning
from .._support import user_stacklevel
from .base import (Attack, check_int, check_num_classes, check_number, cross_entropy,
                   estimator_name, get_loss, is_deq, logits_of, margins, random_in_ball)

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
GradFn = Callable[[Tensor, Tensor], Tensor]


def _resolve_estimator(model: nn.Module, grad):
    """``None`` (the model's own) or an estimator instance valid for ``model``."""
    if grad is None:
        return None
    from ..deq.grad import make_estimator
    est = make_estimator(grad)
    if hasattr(model, "check_estimator"):
        model.check_estimator(est)
    elif not any(hasattr(m, "_grad_stack") for m in model.modules()):
        raise ConfigError(f"grad={estimator_name(est)!r} was given but {type(model).__name__} "
                          "contains no DEQ whose gradient can be chosen")
    return est


class InputGradient:
    """``(x, y) -> d loss(model(x), y) / dx`` with a chosen estimator and warm starts.

    Args:
        model: any module ``x -> logits``; a DEQ (``solve``/``run``) gets warm starts.
        grad: gradient estimator (instance or name) or None for the model's own.
        warm_start: start each forward solve from the previous call's fixed point and, for the
            implicit gradient, each adjoint solve from the previous adjoint, for the samples
            whose previous solve converged (the others start as the model's inference does).

    Call :meth:`reset` between independent runs (a new batch). ``stats`` counts the function
    evaluations of the forward and adjoint solves.
    """

    def __init__(self, model: nn.Module, grad=None, warm_start: bool = True):
        self.model = model
        self.estimator = _resolve_estimator(model, grad)
        self.deq = is_deq(model)
        self.warm_start = bool(warm_start)
        #: the warm-start state (robustdeq.deq.warm): the previous call's fixed point and
        #: adjoint with their per-sample convergence flags
        self.state = WarmStart(adjoint=False)
        self.reset()

    # the warm-start state, by its historical names
    z_prev = property(lambda self: self.state.z, lambda self, v: setattr(self.state, "z", v))
    z_ok = property(lambda self: self.state.z_ok, lambda self, v: setattr(self.state, "z_ok", v))
    a_prev = property(lambda self: self.state.a, lambda self, v: setattr(self.state, "a", v))
    a_ok = property(lambda self: self.state.a_ok, lambda self, v: setattr(self.state, "a_ok", v))

    def reset(self) -> None:
        self.state.reset()
        self.last_logits: Optional[Tensor] = None  # logits at the latest call's inputs (detached)
        #: (B,) bool: the latest call's forward solve converged per sample (True off a DEQ)
        self.last_converged: Optional[Tensor] = None
        self.stats = {"calls": 0, "forward_nfe": 0, "backward_nfe": 0, "forward_work": 0,
                      "backward_work": 0, "forward_unconverged": 0, "backward_unconverged": 0}
        self._checked = False

    def reset_warm_start(self) -> None:
        """Forget the warm-start states (the next call starts a new batch); keeps the stats."""
        self.state.reset()

    def select(self, keep: Tensor) -> None:
        """Continue with the samples ``keep`` (indices into the latest call's batch) only: the
        warm-start states follow them."""
        self.state.select(keep)

    def current_estimator(self):
        if self.estimator is not None:
            return self.estimator
        return getattr(self.model, "estimator", None)

    def warm(self) -> bool:
        """Whether warm starts apply (a DEQ, and not full backpropagation: through a warm-started
        solve it would only see the last few iterations, a different gradient).

        Where a solve starts (:mod:`robustdeq.deq.warm`): the previous call's solution for the
        samples whose previous solve converged, the model's initial state for the others (as the
        model's own inference starts; on a conv DEQ whose solves never converged, warm-starting
        them made PGD 15 points weaker than torchattacks' cold-started PGD,
        benchmarks/RESULTS.md). For the adjoint, a linear system with one solution, a start only
        changes how close an unconverged iterate gets to it; a non-converged previous adjoint is
        still not reused (it may come from a divergent iteration)."""
        est = self.current_estimator()
        return self.warm_start and self.deq and not getattr(est, "full_graph", False)

    def __call__(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """The gradient of ``loss_fn(logits(x), y)`` w.r.t. ``x`` (shape of ``x``)."""
        self.stats["calls"] += 1
        est = self.current_estimator()
        if self.deq and supports_implicit_input_gradient(self.model, est):
            # the model's warm-started, shrinking-batch implicit gradient (robustdeq.deq.warm)
            r = implicit_input_gradient(self.model, x, y, loss_fn, est,
                                        warm=self.state if self.warm() else None,
                                        check_logits=lambda logits: self._check(logits, y))
            for k, v in r.stats.items():
                self.stats[k] += v
            self.last_logits = r.logits
            self.last_converged = r.converged
            return r.grad
        xr = x.detach().requires_grad_(True)
        if self.deq:
            eq = run_warm(self.model, xr, self.state if self.warm() else None, grad=self.estimator)
            logits = eq.logits
            self.last_converged = eq.stats.converged.detach()
            self.stats["forward_nfe"] += int(eq.stats.nfe)
            self.stats["forward_unconverged"] += int((~eq.stats.converged).sum())
        elif self.estimator is not None:
            from ..deq.grad import gradient
            with gradient(self.model, self.estimator):
                logits = self.model(xr)
        else:
            logits = self.model(xr)
        self._check(logits, y)
        self.last_logits = logits.detach()
        if not self.deq:
            self.last_converged = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        cost = loss_fn(logits, y)
        return torch.autograd.grad(cost, xr, retain_graph=False, create_graph=False)[0]

    def _check(self, logits: Tensor, y: Tensor) -> None:
        if not self._checked:
            check_num_classes(y, logits)
            self._checked = True

    def warn_if_unconverged(self, who: str) -> None:
        s = self.stats
        if s["forward_unconverged"] or s["backward_unconverged"]:
            warnings.warn(
                f"{who}: over {s['calls']} gradient evaluations, {s['forward_unconverged']} "
                f"forward and {s['backward_unconverged']} adjoint per-sample solves did not reach "
                "their tolerance; the attack's gradients may be inaccurate",
                NonConvergenceWarning, stacklevel=user_stacklevel())


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
    """(B,) bool: the prediction is wrong (untargeted) or the target (targeted)."""
    pred = logits.argmax(dim=1)
    return pred == y if targeted else pred != y


METHODS = ("auto", "joint", "exact")


class _Unconverged(Exception):
    """The joint iteration's first solve did not converge for every sample (method="auto");
    ``converged`` holds the per-sample flags."""

    def __init__(self, converged: Tensor):
        super().__init__("not every first solve converged")
        self.converged = converged


def _joint_eligible(model: nn.Module, grad, warm_start: bool) -> bool:
    """Whether ``method="auto"`` runs the joint iteration: a DEQ with the pieces it needs, whose
    attack gradient is the implicit one at its defaults (``grad="ift"``, or ``None`` with the
    model's own estimator implicit; the joint iteration approximates exactly that gradient), and
    warm starts not turned off (``warm_start=False`` asks for the exact cold loop)."""
    from ..deq.grad import ImplicitGrad
    from ..deq.joint import supports_joint
    if not (warm_start and is_deq(model) and supports_joint(model)):
        return False
    if grad is None:
        return isinstance(getattr(model, "estimator", None), ImplicitGrad)
    return isinstance(grad, str) and grad == "ift"


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015); L2: one normalised gradient step of
    length eps. Same update as ``torchattacks.FGSM`` for Linf."""

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", targeted: bool = False,
                 seed: Optional[int] = None, grad=None):
        super().__init__(model, eps=eps, norm=norm, targeted=targeted, seed=seed)
        self.oracle = InputGradient(model, grad, warm_start=False)
        self.grad = self.oracle.estimator
        g = estimator_name(self.grad) if self.grad is not None else (
            estimator_name(getattr(model, "estimator", None)) if is_deq(model) else None)
        self.name = "FGSM" + (" L2" if self.norm == "L2" else "") + (f" ({g})" if g else "")

    def params(self) -> Dict[str, Any]:
        return {"grad": estimator_name(self.grad) if self.grad is not None else "model default"}

    def _perturb(self, x, y, gen):
        self.oracle.reset()
        g = self.oracle(x, y, self.loss_fn(cross_entropy))
        if self.norm == "Linf":
            adv = x + self.eps * g.sign()
        else:
            n = per_sample_norm(g) + 1e-10
            adv = x + self.eps * g / n.view(bshape(x))
        self.last_stats = dict(self.oracle.stats)
        self.oracle.warn_if_unconverged(self.name)
        return torch.clamp(adv, min=0, max=1).detach()


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018), Linf or L2, on any ``x -> logits`` model.

    Args:
        eps, alpha, steps, random_start, norm: torchattacks' names; ``alpha`` defaults to
            ``2.5 * eps / steps``.
        grad: gradient estimator for a DEQ ("ift", "phantom", "unrolled", "full" or an instance);
            None: the model's default (the default). ``"joint"`` is the old spelling of
            ``method="joint"``.
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
            step); it costs about 0.15-0.25x torchattacks' PGD on the same DEQ at the same robust
            accuracy on DEQs whose solves converge (benchmarks/RESULTS.md "Speed (issue 13)"),
            and was 5.9 points weaker on a conv DEQ whose solves never converge (hence the
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
        if isinstance(grad, str) and grad == "joint":  # the historical spelling of method="joint"
            if method == "exact":
                raise ConfigError("grad='joint' contradicts method='exact'")
            method, grad = "joint", None
        self.joint_options = dict(joint_options or {})
        #: candidates per sample judged by the model's own inference at the end: the last
        #: iterate, the iterate of lowest margin on the iteration's logits, then the latest points
        self.joint_judge = check_int(self.joint_options.pop("judge", 8), "judge", low=1)
        self.oracle = InputGradient(model, None if method == "joint" else grad, warm_start=warm_start)
        self.grad = self.oracle.estimator
        self.joint_oracle = None
        if method == "joint":
            from ..deq.joint import supports_joint
            if not (is_deq(model) and supports_joint(model)):
                raise ConfigError(f"grad='joint' needs a DEQ (a fixed-point model with inject, f, "
                                  f"readout, init_state and solver_config); got {type(model).__name__}")
            if early_stop:
                raise ConfigError("grad='joint' does not combine with early_stop (its iterates are "
                                  "judged by the model's inference at the end only)")
        elif method == "auto" and not _joint_eligible(model, grad, warm_start):
            method = "exact"
        if joint_options is not None and method == "exact":
            raise ConfigError("joint_options is only for the joint iteration (method='joint' or "
                              "'auto' on a DEQ with the implicit gradient)")
        if method != "exact":
            from ..deq.joint import JointInputGradient
            self.joint_oracle = JointInputGradient(model, **self.joint_options)
        #: "joint", "auto" (the joint iteration for the samples whose first solve converges,
        #: the exact loop for the others) or "exact"
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

    def params(self) -> Dict[str, Any]:
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
        m = margins(logits_of(self.model, x_adv, batch_size=max(1, batch_size)).float(), y)
        return -m if self.targeted else m

    def _once(self, x, y, gen):
        """One run from one random start: ``(x_adv, cold margins or None)``; the margins are
        the model's own inference's, known where the joint iteration ran (it judges its result).

        Under ``method="auto"``, the samples whose first solve (at the starting point) did not
        converge are attacked by the exact loop, the others by the joint iteration, each sample
        from the same starting point either way."""
        self.last_frozen = self.last_unconfirmed = 0
        loss_fn = self.loss_fn(self._loss)
        start = x.detach().clone()
        if self.random_start:  # pgd_loop's random start, drawn once for both methods
            start = torch.clamp(start + random_in_ball(start, self.eps, self.norm, gen,
                                                       radius="volume"), min=0, max=1).detach()
        if self.joint_oracle is None:
            adv = self._exact(x, y, start, loss_fn)
            self.last_methods.append("exact")
            return adv, None
        try:
            adv = self._joint(x, y, start, loss_fn, check=self.method == "auto")
        except _Unconverged as e:
            ok = e.converged
        else:
            self.last_stats = dict(self.joint_oracle.stats, method="joint")
            self.last_methods.append("joint")
            return adv, self._joint_margin
        if not bool(ok.any()):
            logger.debug("%s: no first solve converged; the exact loop runs", self.name)
            adv = self._exact(x, y, start, loss_fn)
            self.last_methods.append("exact")
            return adv, None
        rows_j, rows_e = ok.nonzero()[:, 0], (~ok).nonzero()[:, 0]
        logger.debug("%s: %d of %d first solves did not converge; the exact loop attacks those",
                     self.name, int(rows_e.numel()), int(ok.numel()))
        adv = start.clone()
        m = torch.empty(x.shape[0], device=x.device)
        adv[rows_j] = self._joint(x[rows_j], y[rows_j], start[rows_j], loss_fn, check=False)
        m[rows_j] = self._joint_margin
        joint_stats = dict(self.joint_oracle.stats)
        adv[rows_e] = self._exact(x[rows_e], y[rows_e], start[rows_e], loss_fn)
        m[rows_e] = self._margin(adv[rows_e], y[rows_e])
        stats = {k: v + joint_stats.get(k, 0) if isinstance(v, int) else v
                 for k, v in self.last_stats.items()}
        self.last_stats = dict(stats, method="mixed", joint_samples=int(rows_j.numel()),
                               exact_samples=int(rows_e.numel()))
        self.last_methods.append("mixed")
        return adv, m

    def _exact(self, x, y, start, loss_fn):
        """The exact loop (:class:`InputGradient`) from ``start``; sets ``last_stats``."""
        self.oracle.reset()
        oracle = self.oracle
        latest = {}

        def grad_fn(xa, ya):
            latest["y"] = ya
            return oracle(xa, ya, loss_fn)

        if self.early_stop:
            adv = self._early_stopped(x, y, grad_fn, start, latest)
            # samples frozen early, and those the model's inference did not confirm
            self.last_stats = dict(self.oracle.stats, frozen=self.last_frozen,
                                   unconfirmed=self.last_unconfirmed)
        else:
            adv = pgd_loop(x, y, grad_fn, eps=self.eps, alpha=self.alpha, steps=self.steps,
                           norm=self.norm, random_start=False, gen=None, start=start)
            self.last_stats = dict(self.oracle.stats)
        self.last_stats["method"] = "exact"
        self.oracle.warn_if_unconverged(self.name)
        return adv

    def _joint(self, x, y, start, loss_fn, check: bool = False):
        """The loop on the joint iteration (:class:`robustdeq.deq.joint.JointInputGradient`) from
        ``start``, judged by the model's own inference: per sample, the last iterate and the
        iterate of lowest margin on the iteration's own logits are evaluated cold (the model's
        inference), and the one of lower (cold) margin is returned; ``_joint_margin`` keeps that
        margin. ``check``: raise :class:`_Unconverged` (with the per-sample flags) when the first
        solve did not converge for every sample."""
        oracle = self.joint_oracle
        oracle.reset()

        def grad_fn(xa, ya):
            g = oracle(xa, ya, loss_fn)
            if check and oracle.stats["calls"] == 1 and not bool(oracle.last_converged.all()):
                raise _Unconverged(oracle.last_converged.clone())
            return g

        best = {"m": None, "x": None}
        recent = []  # the latest points the iteration evaluated (newest last)
        n_recent = self.joint_judge - 2

        def tracked(xa, ya):
            g = grad_fn(xa, ya)
            if n_recent > 0:
                recent.append(xa.detach())
                del recent[:-n_recent]
            m = margins(oracle.last_logits.float(), ya)
            m = -m if self.targeted else m
            if best["m"] is None:
                best["m"], best["x"] = m, xa.detach().clone()
            else:
                better = m < best["m"]
                best["m"] = torch.where(better, m, best["m"])
                best["x"][better] = xa.detach()[better]
            return g

        adv = pgd_loop(x, y, tracked, eps=self.eps, alpha=self.alpha, steps=self.steps,
                       norm=self.norm, random_start=False, gen=None, start=start)
        m = self._margin(adv, y)
        cands = ([best["x"]] if best["x"] is not None and self.joint_judge > 1 else []) + recent[::-1]
        rows, pts = [], []
        for cand in cands:
            # only the samples still robust, and only where the candidate differs
            r = ((m > 0) & (cand != adv).reshape(adv.shape[0], -1).any(dim=1)).nonzero()[:, 0]
            rows.append(r)
            pts.append(cand[r])
        if rows and sum(int(r.numel()) for r in rows):
            # one cold evaluation of all candidates (the model's inference, batch-independent)
            r_all, p_all = torch.cat(rows), torch.cat(pts)
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
        self._joint_margin = m
        return adv

    def _early_stopped(self, x, y, grad_fn, start, latest):
        """The loop with early stopping. A sample is frozen once the attack has succeeded at two
        consecutive iterates (judged on the attack's own solves, and only where they converged),
        so that borderline points are pushed one step further. The frozen samples are then
        checked with the model's own inference (for a DEQ: a cold solve, not the attack's
        warm-started one, whose equilibrium can differ within the solver's tolerance); a sample
        that is not confirmed resumes the plain loop from its frozen point for the steps it had
        left, so it ends where the plain loop would have."""
        oracle = self.oracle
        streak = {"n": None}

        def success_fn():
            hit = succeeded(oracle.last_logits, latest["y"], self.targeted) & oracle.last_converged
            prev = streak["n"] if streak["n"] is not None else torch.zeros_like(hit, dtype=torch.long)
            streak["n"] = (prev + 1) * hit
            return streak["n"] >= 2

        def select_fn(keep):
            oracle.select(keep)
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
                oracle.reset_warm_start()
                adv[rows] = pgd_loop(x[rows], y[rows], grad_fn, eps=self.eps, alpha=self.alpha,
                                     steps=self.steps, norm=self.norm, random_start=False,
                                     gen=None, start=adv[rows], select_fn=oracle.select,
                                     budget=self.steps - frozen_at[rows])
        return adv


__all__ = ["FGSM", "METHODS", "PGD", "InputGradient", "pgd_loop", "pgd_step", "succeeded"]
