"""Checks for gradient masking and DEQ-specific failure modes of an evaluation.

Each check returns a :class:`CheckResult` (``name``, ``fired``, ``message``, ``value``,
``threshold``) and, when it fires, emits a :class:`~robustdeq.errors.GradientMaskingWarning`
(:class:`~robustdeq.errors.NonConvergenceWarning` for the two convergence checks). The harness records
every result in the report. The checks are cheap: they work on a subset of ``CheckConfig.subset``
samples (32 by default), ``unconverged_breaks`` on the samples broken (two solves each at most).

==========================  ==========================================================================
``randomized_output``       two forward passes on the same input give different logits
``softmax_output``          outputs are non-negative and every row sums to 1 (probabilities, not logits)
``zero_gradients``          share of samples whose input gradient is all zero or non-finite
``black_box_stronger``      a black-box (Square, AutoAttack's own Square stage in a cascade) or transfer attack breaks samples the white-box ones missed
``large_eps_not_chance``    robust accuracy at a huge eps (Linf 0.5 / L2 4) stays above chance + margin
``non_monotonic``           robust accuracy rises with more attack steps, or with a larger eps
``non_convergence``         share of clean or adversarial inputs whose forward solve did not converge
``estimator_disagreement``  mean cosine between IFT and unrolled input gradients is low
``unconverged_breaks``      samples broken only where the solver stops unconverged (their equilibrium is correct)
==========================  ==========================================================================

The idea follows AutoAttack's checks (Croce & Hein 2020); nothing here keeps global state
between calls (AutoAttack's dynamic-defense counter is a never-reset module global).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Norm, coerce_enum
from ..errors import ConfigError, GradientMaskingWarning, NonConvergenceWarning
from .._support import user_stacklevel

logger = logging.getLogger(__name__)

CHECKS = (
    "randomized_output", "softmax_output", "zero_gradients", "black_box_stronger",
    "large_eps_not_chance", "non_monotonic", "non_convergence", "estimator_disagreement",
    "unconverged_breaks",
)


@dataclass(frozen=True)
class CheckConfig:
    """Thresholds and budgets of the checks.

    Attributes:
        subset: samples used by the checks that run forward/backward passes or attacks.
        random_tol: relative change of the logits between two passes that counts as randomness.
        softmax_tol: tolerance on ``sum(row) == 1`` and ``row >= 0``.
        zero_grad_fraction: share of samples with a zero/non-finite input gradient that fires.
        black_box_fraction: the check fires when the share of samples broken by black-box
            attacks only exceeds this (default 0: any such sample).
        black_box_queries: queries of the Square probe run when the suite has no black-box or
            transfer attack and no cascaded AutoAttack with its Square stage (whose results the
            check reads instead) (0: no probe, the check is skipped then).
        large_eps_linf, large_eps_l2: the "huge" radii; large_eps_steps: PGD steps there.
        chance_margin: accuracy above ``1 / num_classes + chance_margin`` at the huge radius fires.
        steps_short, steps_long: PGD steps compared by the monotonicity check.
        monotonic_tol: a rise of robust accuracy larger than this fires.
        nonconvergence_rate: share of unconverged solves (clean or adversarial) that fires.
        cosine_threshold: mean cosine(IFT, unrolled) input gradients below this fires.
        unroll_steps: steps of the unrolled estimator compared with IFT.
        unconverged_break_fraction: share of the samples broken only where the model's solver
            stops unconverged (correct at a tight solve) that fires (default 0: any such sample).
        equilibrium_tol_factor, equilibrium_iter_factor: the tight solve of that check: the
            model's solver with its tolerance times the first and its iteration budget times
            the second.
        enabled: the checks to run (default all of :data:`CHECKS`).
    """

    subset: int = 32
    random_tol: float = 1e-5
    softmax_tol: float = 1e-4
    zero_grad_fraction: float = 0.05
    black_box_fraction: float = 0.0
    black_box_queries: int = 100
    large_eps_linf: float = 0.5
    large_eps_l2: float = 4.0
    large_eps_steps: int = 10
    chance_margin: float = 0.1
    steps_short: int = 5
    steps_long: int = 20
    monotonic_tol: float = 0.05
    nonconvergence_rate: float = 0.05
    cosine_threshold: float = 0.5
    unroll_steps: int = 8
    unconverged_break_fraction: float = 0.0
    equilibrium_tol_factor: float = 0.01
    equilibrium_iter_factor: int = 10
    enabled: tuple = CHECKS

    def __post_init__(self):
        if self.subset < 1:
            raise ConfigError(f"CheckConfig.subset must be >= 1, got {self.subset}")
        for name in ("random_tol", "softmax_tol", "zero_grad_fraction", "black_box_fraction",
                     "large_eps_linf", "large_eps_l2", "chance_margin", "monotonic_tol",
                     "nonconvergence_rate", "unconverged_break_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"CheckConfig.{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.equilibrium_tol_factor, (int, float))
                and 0 < self.equilibrium_tol_factor <= 1):
            raise ConfigError("CheckConfig.equilibrium_tol_factor must be in (0, 1], got "
                              f"{self.equilibrium_tol_factor!r}")
        for name in ("large_eps_steps", "steps_short", "steps_long", "unroll_steps",
                     "equilibrium_iter_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CheckConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.black_box_queries < 0:
            raise ConfigError(f"CheckConfig.black_box_queries must be >= 0, got {self.black_box_queries}")
        if self.steps_long <= self.steps_short:
            raise ConfigError("CheckConfig.steps_long must be larger than steps_short")
        if not -1.0 <= self.cosine_threshold <= 1.0:
            raise ConfigError(f"CheckConfig.cosine_threshold must be in [-1, 1], got {self.cosine_threshold}")
        enabled = tuple(self.enabled)
        unknown = sorted(set(enabled) - set(CHECKS))
        if unknown:
            raise ConfigError(f"unknown check(s) {unknown}; known checks: {', '.join(CHECKS)}")
        object.__setattr__(self, "enabled", enabled)


@dataclass
class CheckResult:
    """The outcome of one check. ``skipped`` checks did not apply (``fired`` is False)."""

    name: str
    fired: bool
    message: str
    value: Optional[float] = None
    threshold: Optional[float] = None
    skipped: bool = False
    details: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The result as a JSON-ready dict (a non-finite ``value`` or ``threshold`` as None)."""
        d = asdict(self)
        d["value"] = _finite_or_none(self.value)
        d["threshold"] = _finite_or_none(self.threshold)
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "CheckResult":
        """The result of a dict written by :meth:`to_dict`; a ``ConfigError`` for an unknown key."""
        known = {"name", "fired", "message", "value", "threshold", "skipped", "details"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) in a check result: {unknown}")
        return CheckResult(name=d["name"], fired=bool(d["fired"]), message=d["message"],
                           value=d.get("value"), threshold=d.get("threshold"),
                           skipped=bool(d.get("skipped", False)), details=dict(d.get("details") or {}))


def _finite_or_none(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _result(name: str, fired: bool, message: str, value=None, threshold=None, *, warn: bool = True,
            category=GradientMaskingWarning, details=None) -> CheckResult:
    res = CheckResult(name, bool(fired), message, None if value is None else float(value),
                      None if threshold is None else float(threshold), False, dict(details or {}))
    if fired:
        logger.info("check %s fired: %s", name, message)
        if warn:
            warnings.warn(f"[{name}] {message}", category, stacklevel=user_stacklevel())
    else:
        logger.info("check %s: %s", name, message)
    return res


def skipped(name: str, why: str) -> CheckResult:
    """A check that does not apply (e.g. a DEQ check on a feed-forward model)."""
    return CheckResult(name, False, f"skipped: {why}", skipped=True)


def _config(config: Optional[CheckConfig]) -> CheckConfig:
    if config is None:
        return CheckConfig()
    if not isinstance(config, CheckConfig):
        raise ConfigError(f"config must be a CheckConfig, got {type(config).__name__}")
    return config


def _norm(norm) -> str:
    return coerce_enum(Norm, norm, "threat").value


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{i != y} z_i`` per sample (B,); negative when misclassified, -inf for rows
    with non-finite logits; in the logits' own precision (float16/bfloat16 upcast to float32).
    Correct iff ``> 0`` (a tie is wrong): :func:`robustdeq._tensor.verdict_margins`."""
    from .._tensor import verdict_margins
    return verdict_margins(logits, y)


def _subset(x: Tensor, y: Optional[Tensor], n: int):
    return x[:n], (None if y is None else y[:n])


# -- 1. randomised output ---------------------------------------------------------------------------
def check_randomized(model: nn.Module, x: Tensor, config: Optional[CheckConfig] = None, *,
                     warn: bool = True) -> CheckResult:
    """Two forward passes on the same inputs ``x`` (B, ...) give logits that differ by more than
    ``random_tol`` (relative to the largest logit)."""
    cfg = _config(config)
    xs, _ = _subset(x, None, cfg.subset)
    with torch.no_grad():
        a, b = model(xs), model(xs)
    scale = float(torch.nan_to_num(a.abs(), posinf=0.0).max()) + 1e-12
    diff = float(torch.nan_to_num((a - b).abs(), nan=float("inf")).max()) / scale
    fired = diff > cfg.random_tol
    declared = getattr(model, "randomized", None)
    if fired:
        msg = (f"two forward passes on the same inputs differ (relative change {diff:.2e}); the "
               "model is randomised: judge with expectations over the randomness (EOT, AutoAttack "
               "'rand') and do not trust single-pass robust accuracy"
               + (" (the model declares randomized=True)" if declared else
                  " (the model does not declare randomized=True)"))
    else:
        msg = f"deterministic output (relative change {diff:.2e})"
    return _result("randomized_output", fired, msg, diff, cfg.random_tol, warn=warn,
                   details={"declared_randomized": declared})


# -- 2. softmax instead of logits -------------------------------------------------------------------
def check_softmax(model: nn.Module, x: Tensor, config: Optional[CheckConfig] = None, *,
                  warn: bool = True) -> CheckResult:
    """The outputs look like probabilities: every entry >= 0 and every row sums to 1."""
    cfg = _config(config)
    xs, _ = _subset(x, None, cfg.subset)
    with torch.no_grad():
        out = model(xs).double()
    dev = float((out.sum(dim=1) - 1).abs().max())
    nonneg = bool((out >= -cfg.softmax_tol).all())
    fired = nonneg and dev <= cfg.softmax_tol
    msg = ("the model outputs probabilities (non-negative rows summing to 1, max deviation "
           f"{dev:.1e}) instead of logits: cross-entropy and margin losses saturate and attacks "
           "underperform; attack the logits" if fired else
           "outputs are not probability vectors (logits)")
    return _result("softmax_output", fired, msg, dev, cfg.softmax_tol, warn=warn)


# -- 3. zero or non-finite gradients ----------------------------------------------------------------
def input_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Input gradient of the summed margin ``z_y - max_{i != y} z_i`` (no softmax saturation),
    shape of ``x``. Zeros when the output has no gradient path to ``x``."""
    xr = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xr)
        if not logits.requires_grad:
            return torch.zeros_like(x)
        m = margin(logits, y)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        g = torch.autograd.grad(m.sum(), xr, allow_unused=True)[0]
    return torch.zeros_like(x) if g is None else g.detach()


def check_gradients(model: nn.Module, x: Tensor, y: Tensor, config: Optional[CheckConfig] = None,
                    *, warn: bool = True) -> CheckResult:
    """Share of samples whose input gradient (of the logit margin) is exactly zero or has
    non-finite entries."""
    cfg = _config(config)
    xs, ys = _subset(x, y, cfg.subset)
    g = input_gradients(model, xs, ys).flatten(1)
    nonfinite = ~torch.isfinite(g).all(dim=1)
    zero = (g == 0).all(dim=1)
    frac = float((nonfinite | zero).float().mean())
    fired = frac > cfg.zero_grad_fraction
    msg = (f"{frac:.0%} of samples have a zero ({int(zero.sum())}) or non-finite "
           f"({int(nonfinite.sum())}) input gradient: gradients are masked or shattered (use BPDA, "
           "adaptive views or black-box attacks)" if fired else
           f"input gradients are non-zero and finite ({frac:.0%} bad)")
    if fired and getattr(model, "differentiable", None) is False:
        msg += "; the model declares differentiable=False: its adaptive views must carry the attack"
    return _result("zero_gradients", fired, msg, frac, cfg.zero_grad_fraction, warn=warn,
                   details={"zero": int(zero.sum()), "non_finite": int(nonfinite.sum()),
                            "samples": int(g.shape[0])})


# -- 4. black-box stronger than white-box ------------------------------------------------------------
def check_black_box(white_success: Tensor, black_success: Tensor,
                    config: Optional[CheckConfig] = None, *, source: str = "black-box",
                    warn: bool = True, details: Optional[dict] = None) -> CheckResult:
    """Black-box (or transfer) attacks broke samples that every white-box attack missed.

    Args:
        white_success, black_success: (N,) bool, per sample: some white-box / some black-box
            attack found an adversarial example (clean-misclassified samples: False in both).

    ``details["only"]`` lists the samples broken by black-box attacks only.
    """
    if white_success.shape != black_success.shape:
        raise ConfigError(f"flag shapes differ: {tuple(white_success.shape)} vs {tuple(black_success.shape)}")
    only = black_success.bool() & ~white_success.bool()
    d = {"only": only.nonzero().flatten().tolist()}
    d.update(details or {})
    return check_black_box_count(int(only.sum()), int(white_success.numel()), config, source=source,
                                 warn=warn, details=d)


def check_black_box_count(count: int, n: int, config: Optional[CheckConfig] = None, *,
                          source: str = "black-box", warn: bool = True,
                          details: Optional[dict] = None) -> CheckResult:
    """:func:`check_black_box` from counts: ``count`` of ``n`` samples were broken by black-box
    attacks only (e.g. by AutoAttack's Square stage after its gradient-based stages and every
    earlier attack of a cascade missed them)."""
    cfg = _config(config)
    if not 0 <= count <= n:
        raise ConfigError(f"black-box-only count {count} is not within [0, {n}]")
    frac = count / max(n, 1)
    fired = frac > cfg.black_box_fraction
    msg = (f"{source} attacks broke {count}/{n} samples that every white-box attack missed: "
           "white-box gradients are unreliable (gradient masking)" if fired else
           f"{source} attacks found {count}/{n} samples the white-box ones missed")
    d = {"black_box_only": count, "samples": n, "source": source}
    d.update(details or {})
    return _result("black_box_stronger", fired, msg, frac, cfg.black_box_fraction, warn=warn, details=d)


def square_probe(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str,
                 queries: int, seed: int = 0) -> Tensor:
    """Success flags (B,) of torchattacks' Square attack (black-box) with ``queries`` queries."""
    from ..attacks import TorchAttack
    atk = TorchAttack(model, "Square", eps=float(eps), norm=_norm(norm), n_queries=int(queries),
                      seed=int(seed))
    x_adv = atk(x, y)
    with torch.no_grad():
        return margin(model(x_adv), y) <= 0


# -- PGD helpers for checks 5 and 6 -----------------------------------------------------------------
def _pgd_robust(targets: Sequence[nn.Module], judge: nn.Module, x: Tensor, y: Tensor, *,
                eps: float, norm: str, steps: int, seed: int) -> Tensor:
    """(B,) bool: correctly classified by ``judge`` on ``x`` and on the PGD example of every
    target (the worst case over targets)."""
    from .._tensor import default_alpha
    from ..attacks import PGD
    with torch.no_grad():
        robust = margin(judge(x), y) > 0
    for t in targets:
        if not bool(robust.any()):
            break
        atk = PGD(t, eps=float(eps), alpha=default_alpha(eps, steps), steps=int(steps), norm=norm,
                  seed=int(seed))
        x_adv = atk(x, y)
        with torch.no_grad():
            robust = robust & (margin(judge(x_adv), y) > 0)
    return robust


# -- 5. accuracy at a large eps ----------------------------------------------------------------------
def check_large_eps(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "Linf",
                    views: Optional[Mapping[str, nn.Module]] = None,
                    num_classes: Optional[int] = None, config: Optional[CheckConfig] = None,
                    seed: int = 0, warn: bool = True) -> CheckResult:
    """PGD at a huge radius (Linf 0.5: every image can reach the grey image; L2 4) must bring the
    robust accuracy to about chance; if it stays above ``1/C + chance_margin`` the attack's
    gradients do not work. ``views``: extra modules to craft on (judged on ``model``)."""
    cfg = _config(config)
    norm = _norm(norm)
    xs, ys = _subset(x, y, cfg.subset)
    with torch.no_grad():
        c = int(num_classes) if num_classes is not None else int(model(xs[:1]).shape[1])
    eps = cfg.large_eps_linf if norm == "Linf" else cfg.large_eps_l2
    targets = [model] + list((views or {}).values())
    acc = float(_pgd_robust(targets, model, xs, ys, eps=eps, norm=norm, steps=cfg.large_eps_steps,
                            seed=seed).float().mean())
    thr = 1.0 / c + cfg.chance_margin
    fired = acc > thr
    msg = (f"robust accuracy {acc:.1%} at {norm} eps {eps:g} (PGD-{cfg.large_eps_steps}) is above "
           f"chance ({1 / c:.1%}) + {cfg.chance_margin:.0%}: at this radius every input can be "
           "moved to a class-neutral one, so the attack is failing (gradient masking)" if fired else
           f"robust accuracy {acc:.1%} at {norm} eps {eps:g} is about chance or below")
    return _result("large_eps_not_chance", fired, msg, acc, thr, warn=warn,
                   details={"eps": eps, "num_classes": c, "samples": int(xs.shape[0])})


# -- 6. robust accuracy rising with steps or eps ---------------------------------------------------
def check_monotonic(model: nn.Module, x: Tensor, y: Tensor, *, eps: Optional[float],
                    norm: str = "Linf", views: Optional[Mapping[str, nn.Module]] = None,
                    sweep: Optional[Mapping[float, float]] = None,
                    config: Optional[CheckConfig] = None, seed: int = 0,
                    warn: bool = True) -> CheckResult:
    """Robust accuracy must not rise with more attack steps (PGD-``steps_short`` vs
    PGD-``steps_long`` at ``eps`` on a subset) nor with a larger eps (``sweep``: eps -> robust
    accuracy of the full evaluation). Either rise larger than ``monotonic_tol`` fires."""
    cfg = _config(config)
    norm = _norm(norm)
    problems, details, worst = [], {}, 0.0
    if eps is not None and eps > 0:
        xs, ys = _subset(x, y, cfg.subset)
        targets = [model] + list((views or {}).values())
        a_short = float(_pgd_robust(targets, model, xs, ys, eps=eps, norm=norm,
                                    steps=cfg.steps_short, seed=seed).float().mean())
        a_long = float(_pgd_robust(targets, model, xs, ys, eps=eps, norm=norm,
                                   steps=cfg.steps_long, seed=seed).float().mean())
        details.update({"eps": float(eps), "steps_short": cfg.steps_short,
                        "steps_long": cfg.steps_long, "accuracy_short": a_short,
                        "accuracy_long": a_long})
        rise = a_long - a_short
        worst = max(worst, rise)
        if rise > cfg.monotonic_tol:
            problems.append(f"PGD-{cfg.steps_long} leaves {a_long:.1%} robust vs {a_short:.1%} for "
                            f"PGD-{cfg.steps_short} at eps {eps:g}")
    if sweep:
        pts = sorted((float(e), float(a)) for e, a in sweep.items())
        details["sweep"] = [[e, a] for e, a in pts]
        for (e0, a0), (e1, a1) in zip(pts, pts[1:]):
            rise = a1 - a0
            worst = max(worst, rise)
            if rise > cfg.monotonic_tol:
                problems.append(f"robust accuracy {a1:.1%} at eps {e1:g} exceeds {a0:.1%} at eps {e0:g}")
    if eps is None and not sweep:
        return skipped("non_monotonic", "no eps to compare")
    fired = bool(problems)
    msg = ("robust accuracy rises with attack strength (" + "; ".join(problems) + "): the attack "
           "is not converging or the gradients are masked" if fired else
           "robust accuracy does not rise with more steps or larger eps")
    return _result("non_monotonic", fired, msg, worst, cfg.monotonic_tol, warn=warn, details=details)


# -- 7. non-convergence ------------------------------------------------------------------------------
def check_convergence(clean: Optional[Mapping[str, Any]], adversarial: Mapping[Any, Mapping[str, Any]],
                      config: Optional[CheckConfig] = None, *, warn: bool = True) -> CheckResult:
    """Non-convergence rate of the forward solver on clean inputs and on the (worst-case)
    adversarial inputs of each eps.

    Args:
        clean: solver-stat summary with ``converged_fraction`` (None: no solver).
        adversarial: eps -> summary with ``converged_fraction``.
    """
    cfg = _config(config)
    if clean is None and not adversarial:
        return skipped("non_convergence", "the model has no fixed-point solver")
    rates = {}
    if clean is not None:
        rates["clean"] = 1.0 - float(clean["converged_fraction"])
    for e, s in adversarial.items():
        if s is not None:
            rates[f"adversarial eps={float(e):g}"] = 1.0 - float(s["converged_fraction"])
    worst_key = max(rates, key=rates.get)
    worst = rates[worst_key]
    fired = worst > cfg.nonconvergence_rate
    bad = [f"{k}: {v:.1%}" for k, v in rates.items() if v > cfg.nonconvergence_rate]
    msg = ("the forward solver did not converge for a large share of inputs (" + ", ".join(bad)
           + "): predictions depend on the iteration budget and attacks may exploit or be misled "
           "by unconverged states" if fired else
           f"forward solves converge (worst non-convergence rate {worst:.1%}, {worst_key})")
    return _result("non_convergence", fired, msg, worst, cfg.nonconvergence_rate, warn=warn,
                   category=NonConvergenceWarning, details={"rates": rates})


# -- 8. IFT vs unrolled gradients --------------------------------------------------------------------
def find_deq(model: nn.Module):
    """The DEQClassifier of ``model`` (itself, or the first submodule), or None
    (:func:`robustdeq.deq.protocols.find_fixed_point_model`)."""
    from ..deq.protocols import find_fixed_point_model
    return find_fixed_point_model(model)


def check_estimators(model: nn.Module, x: Tensor, y: Tensor, config: Optional[CheckConfig] = None,
                     *, warn: bool = True) -> CheckResult:
    """Mean cosine similarity between the input gradients (of the logit margin) of the DEQ in
    ``model`` (itself, or the one a defense wraps) under the implicit (IFT) estimator and under
    ``UnrolledGrad(unroll_steps)``. The DEQ's own ``ImplicitGrad`` (and its adjoint solver) is
    used when it has one."""
    from ..deq.grad import ImplicitGrad, UnrolledGrad, gradient
    cfg = _config(config)
    deq = find_deq(model)
    if deq is None:
        return skipped("estimator_disagreement", "the model has no DEQ whose gradient can be chosen")
    xs, ys = _subset(x, y, cfg.subset)
    ift = deq.grad if isinstance(deq.grad, ImplicitGrad) else ImplicitGrad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        with gradient(deq, ift):
            g_ift = input_gradients(deq, xs, ys).flatten(1).double()
        with gradient(deq, UnrolledGrad(steps=cfg.unroll_steps)):
            g_unr = input_gradients(deq, xs, ys).flatten(1).double()
    ok = torch.isfinite(g_ift).all(1) & torch.isfinite(g_unr).all(1)
    cos = F.cosine_similarity(torch.nan_to_num(g_ift), torch.nan_to_num(g_unr), dim=1, eps=1e-30)
    cos = torch.where(ok, cos, torch.full_like(cos, -1.0))  # non-finite: full disagreement
    mean = float(cos.mean())
    fired = mean < cfg.cosine_threshold
    msg = (f"IFT and unrolled ({cfg.unroll_steps} steps) input gradients disagree (mean cosine "
           f"{mean:.2f}): the fixed point is unstable or the adjoint is inaccurate, so attacks with "
           "one estimator may badly underestimate the model's vulnerability; attack with several"
           if fired else f"IFT and unrolled input gradients agree (mean cosine {mean:.2f})")
    return _result("estimator_disagreement", fired, msg, mean, cfg.cosine_threshold, warn=warn,
                   details={"min_cosine": float(cos.min()), "unroll_steps": cfg.unroll_steps,
                            "samples": int(xs.shape[0])})


# -- 9. breaks only where the solver stops unconverged ----------------------------------------------
def _solve_flags(model: nn.Module, x: Tensor, y: Tensor, batch_size: int):
    """(correct, converged) per row of ``x`` under ``model``'s own inference."""
    correct, converged = [], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i:i + batch_size])
            stats = getattr(model, "last_stats", None)
            if stats is None or getattr(stats, "converged", None) is None:
                raise ConfigError(f"{type(model).__name__} records no per-sample solver statistics "
                                  "(last_stats.converged) after its forward pass")
            correct.append(margin(logits, y[i:i + batch_size]) > 0)  # a tie is wrong
            converged.append(stats.converged.to(logits.device).bool())
    return torch.cat(correct), torch.cat(converged)


def check_unconverged_breaks(model: nn.Module, x_adv: Tensor, y: Tensor, broken: Tensor,
                             config: Optional[CheckConfig] = None, *, batch_size: int = 256,
                             warn: bool = True) -> CheckResult:
    """Samples broken only where the model's forward solver stops unconverged: at the example
    ``x_adv`` the model's own inference (its solver and budget, which is what the attacks judge)
    misclassifies, its solve did not reach the tolerance, and the same solver run to a tight
    tolerance (``tol x equilibrium_tol_factor``, up to ``max_iter x equilibrium_iter_factor``
    iterations) converges to an equilibrium that is classified correctly.

    Such a break is real for the model as deployed, but it is a property of the solver's budget,
    not of the equilibrium: attacks that follow the equilibrium's (implicit) gradient do not aim
    at it (they reach it only by chance), a score-based search that queries the model's inference
    does, and another solver budget changes the robust accuracy
    (``evaluate(..., solver=...)``). Fires when their share of the samples exceeds
    ``unconverged_break_fraction``. Needs a model that runs a :class:`~robustdeq.config.SolverConfig`
    solver itself and records ``last_stats`` (a :class:`~robustdeq.DEQClassifier`).

    Args:
        x_adv: each sample's worst-case example (B, ...); y: labels (B,).
        broken: (B,) bool, the samples the attacks broke (clean-correct, misclassified at x_adv).
    """
    from ..config import SolverConfig
    from .targets import with_solver
    cfg = _config(config)
    name = "unconverged_breaks"
    solver = getattr(model, "solver_config", None)
    if not (hasattr(model, "solve") and isinstance(solver, SolverConfig)):
        return skipped(name, "the model does not run a fixed-point solver of its own")
    broken = broken.to(torch.bool).reshape(-1)
    if broken.shape[0] != x_adv.shape[0] or y.shape[0] != x_adv.shape[0]:
        raise ConfigError(f"x_adv, y and broken disagree on the batch size ({x_adv.shape[0]}, "
                          f"{y.shape[0]}, {broken.shape[0]})")
    n = int(broken.shape[0])
    idx = broken.nonzero().flatten()
    tight_cfg = solver.replace(tol=solver.tol * cfg.equilibrium_tol_factor,
                               max_iter=solver.max_iter * cfg.equilibrium_iter_factor)
    found: list = []
    not_found: list = []
    unconverged = 0
    if idx.numel():
        xb, yb = x_adv[idx], y[idx]
        correct, converged = _solve_flags(model, xb, yb, batch_size)
        suspect = (~correct) & (~converged)
        unconverged = int(suspect.sum())
        if unconverged:
            tight = with_solver(model, tight_cfg)  # shares every parameter; only the budget differs
            sel = suspect.nonzero().flatten()
            t_correct, t_converged = _solve_flags(tight, xb[sel], yb[sel], batch_size)
            rows = idx[sel].tolist()
            found = [r for r, c, v in zip(rows, t_correct.tolist(), t_converged.tolist()) if c and v]
            not_found = [r for r, v in zip(rows, t_converged.tolist()) if not v]
    share = len(found) / n if n else 0.0
    fired = share > cfg.unconverged_break_fraction
    budget = f"tol {tight_cfg.tol:g}, up to {tight_cfg.max_iter} iterations"
    if fired:
        msg = (f"{len(found)} of the {int(idx.numel())} samples broken are misclassified only by the "
               f"solver's unconverged iterate: solved to the equilibrium ({budget}) they are "
               f"classified correctly. The robust accuracy is that of the model with its solver budget "
               f"(max_iter {solver.max_iter}, tol {solver.tol:g}); gradient attacks that follow the "
               "equilibrium do not aim at such examples (a score-based search does), and another "
               "budget changes the result (evaluate(..., solver=...))")
    elif found:
        msg = (f"{len(found)} of the {int(idx.numel())} samples broken are misclassified only by the "
               f"solver's unconverged iterate (equilibria at {budget}), a share of {share:.1%}, not "
               f"above the threshold")
    else:
        msg = (f"no sample is broken only by an unconverged solve ({unconverged} of "
               f"{int(idx.numel())} breaks unconverged at their example; equilibria at {budget})")
    return _result(name, fired, msg, share, cfg.unconverged_break_fraction, warn=warn,
                   category=NonConvergenceWarning,
                   details={"samples": found, "broken": int(idx.numel()), "unconverged": unconverged,
                            "no_equilibrium": not_found, "tight_tol": tight_cfg.tol,
                            "tight_max_iter": tight_cfg.max_iter})


__all__ = [
    "CHECKS", "CheckConfig", "CheckResult", "skipped", "margin", "input_gradients",
    "check_randomized", "check_softmax", "check_gradients", "check_black_box", "check_black_box_count",
    "square_probe",
    "check_large_eps", "check_monotonic", "check_convergence", "check_estimators", "find_deq",
    "check_unconverged_breaks",
]
