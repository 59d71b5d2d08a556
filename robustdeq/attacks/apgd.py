"""Auto-PGD (APGD) with the cross-entropy, DLR and targeted DLR losses, on the input-gradient
oracle (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020).

APGD is PGD with momentum whose step size needs no tuning. With ``N`` iterations, the step size
starts at ``2 eps`` and is examined at checkpoints ``w_j = ceil(p_j N)``, ``p_0 = 0``,
``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, computed as the reference
implementation does, in whole iterations: the first window is ``int(0.22 N)`` iterations long,
each next one ``int(0.03 N)`` shorter, down to ``int(0.06 N)`` (each at least 1). At a
checkpoint the step size of a sample is halved, and the sample restarts from its best point (the
iterate of highest loss so far, with the gradient there), when

1. the loss increased at no more than a fraction ``rho = 0.75`` of the window's steps
   (``#{i in window: L(x_{i+1}) > L(x_i)} <= rho * len(window)``; as in the reference
   implementation, the first window's first comparison is against 0, not the initial loss), or
2. the step size was not halved at the previous checkpoint and the best loss has not improved
   since it.

An iteration is ``z = P(x_k + eta sign(grad))`` (Linf; L2: ``eta grad / ||grad||``), then
``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with momentum ``a = 0.75`` (1 at
the first step), ``P`` the projection onto the eps ball and [0, 1]. The start is uniform on the
ball's surface direction (Linf: ``x + eps t / ||t||_inf``, ``t`` uniform in [-1, 1]; L2: ``t``
Gaussian). ``start="stripes"`` (Linf) starts instead where the Square attack does (Andriushchenko
et al., ECCV 2020): every column of every channel shifted by ``+eps`` or ``-eps`` (one random sign
each; flat inputs: every feature), a vertex of the ball far from the uniform start's region. On
models whose first layers threshold their input (adversarially trained at large radii), the
gradient at the clean point and in the uniform start's region is zero along many pixels, so the
iterates never leave them there; from a vertex with many pixels shifted those units are live and
the gradient leads to other local maxima: runs from such starts break samples that runs from
uniform starts miss. ``restarts`` runs attack only the samples no earlier run broke; ``parallel_runs``
of them can go side by side in one batch (a copy of each sample per run: the same per-sample
algorithm in fewer, larger batched steps).

Losses: cross-entropy; DLR ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``; targeted DLR
``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (``pi`` sorts the logits decreasingly), which
:class:`APGDT` runs once per target ``t`` among the ``n_target_classes`` classes of highest clean
logit after the top one (the second, third, ...), each run on the samples still robust.

The gradients come from :class:`robustdeq.attacks.oracle.GradientOracle` (``method``): on a DEQ
whose solves converge, the joint forward/adjoint/input iteration (with :data:`JOINT_FWD_ITERS`
forward iterations per step: APGD's steps are long); the warm-started exact solves
elsewhere (a feed-forward model: plain autograd, so that the attack is the reference
implementation's under the same seed). ``eot_iter > 1`` averages each gradient over that many
evaluations of a randomized model (AutoAttack's ``rand`` version: ``eot_iter=20``). On a DEQ,
unless the oracle makes the model's own computation (``method="exact", warm_start=False``: cold
solves, the reference implementation's), the oracle's logits are an estimate: a misclassification
they claim during a run counts only once the model's own (cold) inference confirms it, and the
sample keeps that first confirmed example; at the end of a run its example (the confirmed one,
else the point of highest loss) counts only where the model's inference misclassifies it.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._tensor import correct
from ..errors import ConfigError, InputError
from .base import Attack, check_int, check_num_classes, check_number, is_deq, logits_of
from .oracle import POLICIES, GradientOracle
from .square import stripes_start

logger = logging.getLogger(__name__)

LOSSES = ("ce", "dlr")
#: where a run starts: ``uniform`` (the reference implementation's) or ``stripes`` (the Square
#: attack's Linf start; module docstring)
STARTS = ("uniform", "stripes")

#: the joint iteration's forward iterations per APGD step (its default for PGD is 3; fewer
#: where every sample's residual is within the solver's tolerance sooner). APGD's steps start at
#: ``2 eps`` (PGD's are a fraction of eps): after such a step three iterations from the carried
#: state leave the loss and logits the attack reads lagging behind the new point's, and APGD's
#: step-size checkpoints and best-point choice rest on those values; six keep them close at a
#: fraction of an exact solve's cost. On adversarially trained multiscale DEQs, whose solves
#: take most of ten iterations to reach the tolerance after a step, ten cost more than six and
#: broke no more samples.
JOINT_FWD_ITERS = 6


def checkpoints(n_iter: int) -> list:
    """The iterations (1-based counts) after which APGD examines its step size, for ``n_iter``
    iterations: windows of ``int(0.22 N)``, then each ``int(0.03 N)`` shorter, at least
    ``int(0.06 N)`` (each at least 1)."""
    n_iter = check_int(n_iter, "steps", low=1)
    k = max(int(0.22 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    decr = max(int(0.03 * n_iter), 1)
    out, t = [], 0
    while t + k <= n_iter:
        t += k
        out.append(t)
        k = max(k - decr, k_min)
    return out


def ce_per_sample(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr_per_sample(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample DLR loss ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``."""
    srt, ind = logits.sort(dim=1)
    top_is_y = (ind[:, -1] == y).float()
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_other = srt[:, -2] * top_is_y + srt[:, -1] * (1.0 - top_is_y)
    return -(z_y - z_other) / (srt[:, -1] - srt[:, -3] + 1e-12)


def dlr_targeted_per_sample(logits: Tensor, yt: Tensor) -> Tensor:
    """Per-sample targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``;
    ``yt`` is ``(B, 2)``: the true class and the target."""
    srt, _ = logits.sort(dim=1)
    z_y = logits.gather(1, yt[:, :1])[:, 0]
    z_t = logits.gather(1, yt[:, 1:])[:, 0]
    return -(z_y - z_t) / (srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)


def _normalize(v: Tensor, norm: str) -> Tensor:
    b = v.shape[0]
    if norm == "Linf":
        t = v.abs().reshape(b, -1).max(1)[0]
    else:
        t = (v ** 2).reshape(b, -1).sum(-1).sqrt()
    return v / (t.view(-1, *([1] * (v.dim() - 1))) + 1e-12)


def _l2(v: Tensor) -> Tensor:
    return (v ** 2).reshape(v.shape[0], -1).sum(-1).sqrt().view(-1, *([1] * (v.dim() - 1)))


class APGD(Attack):
    """APGD (module docstring) with the cross-entropy (``loss="ce"``, APGD-CE) or DLR loss.

    Args:
        eps, norm: threat model (Linf or L2).
        steps: iterations per run (AutoAttack: 100).
        restarts: runs from independent random starts, each on the samples still robust.
        loss: "ce" or "dlr".
        rho: the fraction of the halving condition 1 (0.75).
        eot_iter: gradients averaged per iteration (1; AutoAttack's ``rand`` version: 20).
        seed: seed of the random starts (AutoAttack's default 0).
        method, grad, warm_start, joint_options: the gradient oracle's policy ("auto",
            "joint" or "exact"), estimator and options (:class:`~robustdeq.attacks.oracle.GradientOracle`;
            the joint iteration's ``fwd_iters`` defaults to :data:`JOINT_FWD_ITERS` here).
        early_stop: a sample leaves a run once broken (on a DEQ: once the model's own
            inference confirms it); the samples broken are the plain run's (off a DEQ).
        parallel_runs: how many runs (restarts; for APGD-T, targets x restarts) go side by side
            in one batch, a copy of each sample per run (1: one after another, the reference
            implementation's order and random draws). Each copy runs the same per-sample
            algorithm, so what one run can break is unchanged; the runs' starts are drawn
            together (other draws than one after another) and, with ``early_stop``, a sample
            leaves every run once one breaks it. Far fewer, larger batched steps: on models
            whose steps cost their per-call overhead (small models, a GPU) several times
            faster; the batch, and its memory, is up to ``parallel_runs`` times larger.
        start: ``"uniform"`` (the reference implementation's random start) or ``"stripes"``
            (Linf: the Square attack's, a random sign per column and channel; module docstring).

    ``last_stats`` holds the oracle's work counts and ``runs`` (per run: the samples attacked,
    the oracle's method, the samples broken). Only the untargeted threat model (``y`` = true
    labels); :class:`APGDT` picks its targets itself. A sample counts as broken where the true
    class's logit is not strictly above every other (the evaluation's rule: an exact tie is
    broken; the reference implementation's ``argmax`` differs only there).
    """

    supports_targeted = False
    _loss_name = "ce"

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", steps: int = 100,
                 restarts: int = 1, loss: str = "ce", rho: float = 0.75, eot_iter: int = 1,
                 seed: Optional[int] = 0, method: str = "auto", grad=None, warm_start: bool = True,
                 joint_options: Optional[Dict[str, Any]] = None, early_stop: bool = False,
                 parallel_runs: int = 1, start: str = "uniform"):
        super().__init__(model, eps=eps, norm=norm, targeted=False, seed=seed)
        if start not in STARTS:
            raise ConfigError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        if start == "stripes" and self.norm != "Linf":
            raise ConfigError("start='stripes' is the Linf Square attack's start; "
                              f"with norm={self.norm!r} use start='uniform'")
        self.start = start
        if not isinstance(early_stop, bool):
            raise ConfigError(f"early_stop must be a bool, got {early_stop!r}")
        self.early_stop = early_stop
        self.parallel_runs = check_int(parallel_runs, "parallel_runs", low=1)
        self.steps = check_int(steps, "steps", low=1)
        self.restarts = check_int(restarts, "restarts", low=1)
        self.rho = check_number(rho, "rho")
        if not 0 < self.rho <= 1:
            raise ConfigError(f"rho must lie in (0, 1], got {rho!r}")
        if loss not in self._losses():
            raise ConfigError(f"loss must be one of {', '.join(self._losses())}, got {loss!r}")
        self.loss = loss
        if method not in POLICIES:
            raise ConfigError(f"method must be one of {', '.join(POLICIES)}, got {method!r}")
        self.oracle = GradientOracle(model, method, grad, warm_start=warm_start,
                                     joint_options=joint_options, eot_iter=eot_iter,
                                     joint_defaults={"fwd_iters": JOINT_FWD_ITERS})
        self.method = self.oracle.policy
        self.eot_iter = self.oracle.eot_iter
        self.name = self._base_name() + ("-L2" if self.norm == "L2" else "") + (
            f"-{self.steps}" if self.steps != 100 else "") + (
            f" (EOT {self.eot_iter})" if self.eot_iter > 1 else "") + (
            " (stripes start)" if start == "stripes" else "")

    def _losses(self) -> Tuple[str, ...]:
        return LOSSES

    def _base_name(self) -> str:
        return {"ce": "APGD-CE", "dlr": "APGD-DLR"}[self.loss]

    def params(self) -> Dict[str, Any]:
        """The settings reported by :meth:`describe`: steps, restarts, loss, rho, early stop,
        parallel runs, start, the gradient oracle's method and, for a DEQ under the exact
        policy, whether its solves are warm-started."""
        out = {"steps": self.steps, "restarts": self.restarts, "loss": self.loss, "rho": self.rho,
               "early_stop": self.early_stop, "parallel_runs": self.parallel_runs,
               "start": self.start}
        out.update(self.oracle.describe())
        if self.oracle.policy == "exact" and is_deq(self.model):
            out["warm_start"] = self.oracle.warm()
        return out

    # -- one run ----------------------------------------------------------------------------------
    def _hits(self, x_adv: Tensor, logits: Tensor, y: Tensor, unbroken: Tensor) -> Tensor:
        """Per row: the run records a success at ``x_adv``. Where the oracle's logits are the
        model's own inference, every misclassified row (the reference's bookkeeping: a sample's
        latest misclassified iterate is kept). Where they are an estimate, a misclassification
        they claim counts only once the model's own inference confirms it, and only for samples
        not broken yet (``unbroken``), which then keep that first confirmed example: the run's
        success flags and examples are the model's own, and an unconfirmed claim cannot replace
        a confirmed example. Misclassified: the true class's logit not strictly above every
        other (:func:`robustdeq._tensor.correct`; a tie is wrong, the evaluation's rule; the
        reference's ``argmax != y`` differs only at exact ties)."""
        wrong = ~correct(logits, y)
        if not self._confirm:
            return wrong
        claim = wrong & unbroken
        if bool(claim.any()):
            rows = claim.nonzero()[:, 0]
            claim[rows] = ~correct(logits_of(self.model, x_adv[rows]), y[rows])
        return claim

    def _random_start(self, x: Tensor, gen: torch.Generator) -> Tensor:
        if self.start == "stripes":
            return stripes_start(x, self.eps, gen)
        if self.norm == "Linf":
            t = 2 * torch.rand(x.shape, generator=gen, device=gen.device).to(x.device) - 1
        else:
            t = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        return (x + self.eps * torch.ones_like(x) * _normalize(t, self.norm)).clamp(0.0, 1.0)

    def _project_step(self, x: Tensor, x_adv: Tensor, grad: Tensor, grad2: Tensor,
                      step_size: Tensor, a: float) -> Tensor:
        eps = self.eps
        if self.norm == "Linf":
            z = x_adv + step_size * torch.sign(grad)
            z = torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
            return torch.clamp(torch.min(torch.max(x_adv + (z - x_adv) * a + grad2 * (1 - a),
                                                   x - eps), x + eps), 0.0, 1.0)
        z = x_adv + step_size * _normalize(grad, "L2")
        z = torch.clamp(x + _normalize(z - x, "L2") * torch.min(eps * torch.ones_like(x), _l2(z - x)),
                        0.0, 1.0)
        z = x_adv + (z - x_adv) * a + grad2 * (1 - a)
        return torch.clamp(x + _normalize(z - x, "L2") * torch.min(eps * torch.ones_like(x), _l2(z - x)),
                           0.0, 1.0)

    def _run(self, x: Tensor, y: Tensor, loss_fn, gen: torch.Generator, y_loss: Tensor,
             copies: Optional[Tensor] = None):
        """One run: ``(x_best, acc, loss_best, x_best_adv)`` as the reference implementation's
        single run (``acc`` judged on the oracle's logits; ``y_loss`` is what the loss gets).
        ``copies`` (parallel runs): the sample each row is a copy of; with ``early_stop`` all
        copies of a sample leave once one of them is broken.

        With ``early_stop``, a sample leaves the run once it is broken (on a DEQ: once the
        model's own inference confirms the oracle's success). Off a DEQ every sample's iterates
        are the plain run's until then (the algorithm is per sample), so the samples broken are
        the same and the cost falls with them; on a DEQ the batch's solves (a solver's stopping
        rule, the joint iteration's choice of inner solver) couple the samples a little, so a
        shrinking batch can break a few samples more or fewer."""
        oracle = self.oracle
        oracle.reset()
        self._confirm = not oracle.logits_are_inference
        n_iter, b = self.steps, x.shape[0]
        view = (b,) + (1,) * (x.dim() - 1)
        x_adv = self._random_start(x, gen)
        x_best, x_best_adv = x_adv.clone(), x_adv.clone()

        out = oracle(x_adv, y_loss, loss_fn)
        loss_steps = torch.zeros(n_iter, b, device=x.device, dtype=out.loss.dtype)  # a float64 model's losses
        grad = out.grad.clone()
        grad_best = grad.clone()
        acc = ~self._hits(x_adv, out.logits, y, torch.ones_like(y, dtype=torch.bool))
        loss_best = out.loss.detach().clone()

        step_size = 2.0 * self.eps * torch.ones(view, device=x.device)
        x_adv_old = x_adv.clone()
        k = max(int(0.22 * n_iter), 1)
        k_min = max(int(0.06 * n_iter), 1)
        size_decr = max(int(0.03 * n_iter), 1)
        counter3 = 0
        loss_best_last_check = loss_best.clone()
        reduced_last_check = torch.ones_like(loss_best)
        self.last_halvings = []  # per checkpoint: (iteration, samples halved)
        idx = torch.arange(b, device=x.device)  # the samples still in the run
        done = self._leave(~acc, copies) if self.early_stop else None
        if done is not None and bool(done.any()):
            idx = self._select(idx, ~done)
        for i in range(n_iter):
            if not idx.numel():
                break
            with torch.no_grad():
                xa = x_adv[idx]
                grad2 = xa - x_adv_old[idx]
                x_adv_old[idx] = xa
                a = 0.75 if i > 0 else 1.0
                xa = self._project_step(x[idx], xa, grad[idx], grad2, step_size[idx], a)
                x_adv[idx] = xa
            out = oracle(xa, y_loss[idx], loss_fn)
            grad[idx] = out.grad
            pred = ~self._hits(xa, out.logits, y[idx], acc[idx])
            acc[idx] = torch.min(acc[idx], pred)
            hit = idx[~pred]
            x_best_adv[hit] = x_adv[hit]
            with torch.no_grad():
                y1 = out.loss.detach()
                loss_steps[i, idx] = y1
                better = y1 > loss_best[idx]
                up = idx[better]
                x_best[up] = x_adv[up]
                grad_best[up] = grad[up]
                loss_best[up] = y1[better]
                counter3 += 1
                if counter3 == k:
                    # condition 1: the loss increased at <= rho of the window's steps (the
                    # reference compares the first window's first iterate with a zero row)
                    t = torch.zeros(idx.numel(), device=x.device)
                    for c in range(k):
                        t += (loss_steps[i - c, idx] > loss_steps[i - c - 1, idx]).float()
                    fl = (t <= k * self.rho * torch.ones_like(t)).float()
                    # condition 2: not halved last time and no improvement since
                    fl_no_impr = (1.0 - reduced_last_check[idx]) * (
                        loss_best_last_check[idx] >= loss_best[idx]).float()
                    fl = torch.max(fl, fl_no_impr)
                    reduced_last_check[idx] = fl
                    loss_best_last_check[idx] = loss_best[idx]
                    halve = idx[fl > 0]
                    self.last_halvings.append((i + 1, int(halve.numel())))
                    if halve.numel():
                        step_size[halve] /= 2.0
                        x_adv[halve] = x_best[halve]
                        grad[halve] = grad_best[halve]
                    k = max(k - size_decr, k_min)
                    counter3 = 0
            if done is not None and not bool(pred.all()):
                left = self._leave(~pred, None if copies is None else copies[idx])
                if bool(left.any()):
                    idx = self._select(idx, ~left)
        self.last_step_size = step_size.reshape(b)
        return x_best, acc, loss_best, x_best_adv

    @staticmethod
    def _leave(hit: Tensor, copies: Optional[Tensor] = None) -> Tensor:
        """(early stopping) Which rows leave the run: those ``hit`` (misclassified by the model's
        own inference, :meth:`_hits`) and, with ``copies`` (parallel runs), every copy of a
        sample one of whose copies is hit."""
        if copies is None or not bool(hit.any()):
            return hit
        return torch.isin(copies, copies[hit])

    def _select(self, idx: Tensor, keep: Tensor) -> Tensor:
        self.oracle.select(keep.nonzero()[:, 0])
        return idx[keep]

    # -- runs on the samples still robust ---------------------------------------------------------
    def _judge(self, x_best: Tensor, x_best_adv: Tensor, acc: Tensor, y: Tensor):
        """Per sample of a run: broken (bool) and its example. Off a DEQ the oracle's logits are
        the model's own: the run's ``acc``. On a DEQ the model's own inference judges the latest
        misclassified iterate, else the point of highest loss."""
        if not is_deq(self.model):
            return ~acc, x_best_adv
        wrong_adv = ~correct(logits_of(self.model, x_best_adv), y)
        wrong_best = ~correct(logits_of(self.model, x_best), y)
        ex = torch.where(wrong_adv.view((-1,) + (1,) * (x_best.dim() - 1)), x_best_adv, x_best)
        return wrong_adv | wrong_best, ex

    def _clean_robust(self, x: Tensor, y: Tensor) -> Tensor:
        logits = logits_of(self.model, x)
        check_num_classes(y, logits)
        self._num_classes = logits.shape[1]
        return correct(logits, y)  # a tie is wrong (the evaluation's rule)

    def _perturb(self, x, y, gen):
        loss_fn = ce_per_sample if self.loss == "ce" else dlr_per_sample
        if self.loss == "dlr":
            self._check_classes(x, 3)
        acc = self._clean_robust(x, y)
        return self._attack_runs(x, y, acc, loss_fn, gen, [{}] * self.restarts)

    def _y_loss(self, xs: Tensor, ys: Tensor, runs) -> Tensor:
        """What the loss gets, for the rows ``xs`` in each of ``runs`` (stacked run-major)."""
        return ys.repeat(len(runs))

    def _attack_runs(self, x: Tensor, y: Tensor, acc: Tensor, loss_fn, gen: torch.Generator,
                     runs) -> Tensor:
        """The runs (each a dict describing it for ``last_stats``), each on the samples no
        earlier run broke; ``parallel_runs`` of them at a time side by side in one batch (a copy
        of each sample per run, the runs' random starts drawn together). A sample is broken
        where one of its copies is, with the example of the first such run."""
        adv = x.clone()
        self.last_stats = {"runs": []}
        stats = {}
        for start in range(0, len(runs), self.parallel_runs):
            group = runs[start:start + self.parallel_runs]
            rows = acc.nonzero()[:, 0]
            if not rows.numel():
                break
            c, n = len(group), int(rows.numel())
            xs, ys = x[rows], y[rows]
            if c > 1:   # a copy of each sample per run, run-major
                xc, yc = xs.repeat((c,) + (1,) * (x.dim() - 1)), ys.repeat(c)
                copies = torch.arange(n, device=x.device).repeat(c)
            else:
                xc, yc, copies = xs, ys, None
            x_best, acc_run, _, x_best_adv = self._run(xc, yc, loss_fn, gen,
                                                       self._y_loss(xs, ys, group), copies)
            broken, ex = self._judge(x_best, x_best_adv, acc_run, yc)
            if c > 1:
                per_run = broken.view(c, n)
                first = per_run.int().argmax(0)  # the first run that broke the sample
                broken = per_run.any(0)
                ex = ex.view((c, n) + tuple(x.shape[1:]))[first, torch.arange(n, device=x.device)]
            acc[rows[broken]] = False
            adv[rows[broken]] = ex[broken]
            extra = group[0] if c == 1 else {"runs": list(group)}
            self._account(stats, rows, broken, **extra)
        self.last_stats.update(stats)
        self.last_robust = acc.clone()
        self.oracle.warn_if_unconverged(self.name)
        return adv

    def _account(self, stats: Dict[str, Any], rows: Tensor, broken: Tensor, **extra) -> None:
        for k, v in self.oracle.stats.items():
            stats[k] = stats.get(k, 0) + v
        self.last_stats["runs"].append(dict(extra, samples=int(rows.numel()),
                                            method=self.oracle.method, broken=int(broken.sum())))

    def _check_classes(self, x: Tensor, need: int) -> None:
        c = logits_of(self.model, x[:1]).shape[1]
        if c < need:
            raise InputError(f"{self.name} needs a model with at least {need} classes; it outputs {c}")


class APGDDLR(APGD):
    """APGD on the (untargeted) DLR loss, APGD-DLR (AutoAttack's ``rand`` and ``plus`` versions)."""

    def __init__(self, model: nn.Module, *, eps: float, loss: str = "dlr", **options):
        super().__init__(model, eps=eps, loss=loss, **options)


class APGDT(APGD):
    """APGD-T: APGD on the targeted DLR loss, once per target class among the
    ``n_target_classes`` of highest clean logit after the top one (AutoAttack: 9), each run on
    the samples no earlier run broke (``restarts`` runs per target). Needs ``n_target_classes + 1``
    classes and at least 4 (the loss's denominator)."""

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", steps: int = 100,
                 restarts: int = 1, n_target_classes: int = 9, rho: float = 0.75,
                 eot_iter: int = 1, seed: Optional[int] = 0, method: str = "auto", grad=None,
                 warm_start: bool = True, joint_options: Optional[Dict[str, Any]] = None,
                 early_stop: bool = False, parallel_runs: int = 1, start: str = "uniform"):
        self.n_target_classes = check_int(n_target_classes, "n_target_classes", low=1)
        super().__init__(model, eps=eps, norm=norm, steps=steps, restarts=restarts,
                         loss="dlr-targeted", rho=rho, eot_iter=eot_iter, seed=seed,
                         method=method, grad=grad, warm_start=warm_start,
                         joint_options=joint_options, early_stop=early_stop,
                         parallel_runs=parallel_runs, start=start)

    def _losses(self) -> Tuple[str, ...]:
        return ("dlr-targeted",)

    def _base_name(self) -> str:
        return "APGD-T"

    def params(self) -> Dict[str, Any]:
        """APGD's settings (:meth:`APGD.params`) and ``n_target_classes``."""
        return dict(super().params(), n_target_classes=self.n_target_classes)

    def _perturb(self, x, y, gen):
        acc = self._clean_robust(x, y)
        need = max(4, self.n_target_classes + 1)
        if self._num_classes < need:
            raise InputError(f"{self.name} with n_target_classes={self.n_target_classes} needs a "
                             f"model with at least {need} classes; it outputs {self._num_classes}")
        runs = [{"target": t} for t in range(2, self.n_target_classes + 2) for _ in range(self.restarts)]
        return self._attack_runs(x, y, acc, dlr_targeted_per_sample, gen, runs)

    def _y_loss(self, xs: Tensor, ys: Tensor, runs) -> Tensor:
        """``(true class, target)`` per row: the run's target is the ``target``-th class by the
        model's logits on the rows (the second, third, ...), stacked run-major."""
        order = logits_of(self.model, xs).sort(dim=1)[1]
        return torch.cat([torch.stack([ys, order[:, -r["target"]]], dim=1) for r in runs])


__all__ = ["APGD", "APGDDLR", "APGDT", "STARTS", "checkpoints", "ce_per_sample", "dlr_per_sample",
           "dlr_targeted_per_sample"]
