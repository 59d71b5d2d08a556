"""Randomized-smoothing certificates for any robustdeq model, and Serialized Randomized Smoothing.

Gaussian smoothing (Cohen, Rosenfeld, Kolter 2019, "Certified Adversarial Robustness via
Randomized Smoothing"): for a base classifier ``f`` (here ``argmax`` of the model's logits) the
smoothed classifier is ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``. If the top
class has probability ``p_A >= p_lower > 1/2`` then ``g`` is constant on the L2 ball of radius
``R = sigma * Phi^-1(p_lower)`` around ``x`` (in R^d: the certificate does not use the [0, 1] box).

``certify`` is Cohen et al.'s CERTIFY: ``n0`` selection samples pick the guess ``c_hat`` (most
frequent class), ``n`` fresh estimation samples give ``n_A = #{f(x + e_i) = c_hat}``, and
``p_lower`` is the one-sided (1 - alpha) Clopper-Pearson lower bound
``Beta^-1(alpha; n_A, n - n_A + 1)`` (0 when ``n_A = 0``). If ``p_lower <= 1/2`` the answer is
ABSTAIN (-1) with radius 0; otherwise ``(c_hat, sigma * Phi^-1(p_lower))``. With probability at
least ``1 - alpha`` over the noise, a returned radius is valid for ``g``. ``predict`` is their
PREDICT: the top two counts ``n_1, n_2`` of ``n`` samples, ABSTAIN unless the two-sided binomial
test of ``n_1`` out of ``n_1 + n_2`` against 1/2 has p-value <= alpha.

The base classifier is the model exactly as its ``forward`` computes it (for a DEQ: its solver from
its initial state, then its gradient estimator's read-out, without autograd), evaluated on the
noisy input ``x + e``, which leaves [0, 1]: the model's input range check is bypassed, never
switched off (the model is not modified: no flag, buffer or parameter changes; its training flags
are restored exactly). With ``clip=True`` the smoothed function is ``f(clip(x + e, 0, 1))`` instead
(needed for models whose forward insists on [0, 1] inputs). Noise is drawn from a private CPU
generator seeded per image from ``seed`` and the image index, so the result of an image does not
depend on the batch it was certified in, and the same seed gives the same certificate. Under
``torchrun`` (any process group) the images are therefore shared out over the processes and the
merged certificate equals the single-process one image for image.

Serialized Randomized Smoothing (SRS; Gao, Hou, Xu, Liu 2024, "Certified Robustness for Deep
Equilibrium Models via Serialized Random Smoothing"), ``srs_steps = S > 0``, DEQs only. With
``srs_start="chain"`` (the paper's rule) the noise batches of one image are solved in sequence:
the first batch with the model's own solver from its initial state, every later batch starting
from the previous batch's fixed points (row ``i`` from row ``i mod B_prev``) with only ``S``
solver steps (the model's solver with ``max_iter = S``; it still stops early where its tolerance is
met). The selection batch starts the chain and the estimation batches continue it. With
``srs_start="clean"`` every noise sample starts from the fixed point of the clean input instead
(solved once from scratch): no sequence (the batch size is free), and the start is the centre of
the noisy fixed points rather than another noisy one. Rows whose start diverged or is not finite
start cold and get the full solve (:func:`robustdeq.attacks.base.warm_start_rows`).

Warm-started predictions ``J_i`` are neither those of the base classifier nor independent, so the
binomial bound does not apply to their counts. The correlation-eliminated bound used here: a
random permutation of the ``n`` estimation positions is drawn from a separate generator,
independent of the noise, and its first ``K`` positions are checked: the base classifier is also
evaluated there from scratch (``I_i``; after the warm pass, their noise re-drawn from the
generator state saved before each batch and solved in full batches). ``K = check_samples``, or,
with ``check_max > 0``, a function of the warm-started count alone (:func:`check_count`: the
fewest checks that would cost at most ``check_slack * sigma`` of radius if none disagreed); given
the noise, the first ``K`` positions of the permutation are still a uniform random ``K``-subset. Let ``D`` be the number of positions (out
of all ``n``) with ``J_i = c_hat`` but ``I_i != c_hat``; the ``d`` such positions seen among the
``K`` checked ones are a hypergeometric draw, so ``D_up = max{D' : HypergeomCDF(d; n, D', K) >
alpha_1}`` bounds ``D`` with probability ``>= 1 - alpha_1`` (conditionally on the noise). The count
of base-classifier successes ``#{I_i = c_hat}``, which is exactly Binomial(n, p_A) because the
noise draws are i.i.d., is ``n_A - D + U`` (``n_A`` = SRS count of ``c_hat``, ``U`` = positions
with ``J_i != c_hat = I_i``), hence at least ``n_A - D_up + u`` (``u`` = such positions among the
checked ones), and

    p_lower = ClopperPearsonLower(n_A - max(min(D_up, n_A - a) - u, 0), n, alpha_2),

``a`` = checked positions where both agree on ``c_hat`` (so ``D <= n_A - a``). The failure
probability is split, ``alpha_1 = check_alpha_fraction * alpha`` and ``alpha_2 = alpha - alpha_1``
(half each by default, as in the paper), so by the union bound the certificate holds with
probability ``>= 1 - alpha`` for the smoothed *base* classifier ``g`` -- never only for the
warm-started approximation. The count bounded is at most ``n_A`` and ``alpha_2 <= alpha``, so the
corrected radius is never larger than the uncorrected one ``sigma Phi^-1(CP(n_A, n, alpha))``
(reported beside it).

The price of soundness: from ``K`` checks that show no disagreement, no sound bound can exclude
about ``n ln(1/alpha_1) / K`` disagreements (a chain that disagrees on that many positions is missed
by all ``K`` checks with probability ``alpha_1``), so ``p_lower`` stays below about
``1 - ln(1/alpha_1) / K`` whatever the warm-started counts; disagreements that are seen (the warm
solve not converged to the from-scratch prediction) lower it further. Large radii therefore need
many checks (each a full solve) -- the adaptive count spends them only on the inputs whose
warm-started count is high enough to need them.

This differs from the reference implementation of SRS, which estimates the agreement rate
``rho`` on the *first* ``K`` estimation samples and bounds ``CP(rho n_A, rho n, alpha/2)``: that
keeps the point estimate ``n_A / n`` and only shrinks the sample size, so a warm-started chain that
always answers ``c_hat`` where the base classifier does so half of the time would still be
certified with a large radius; and the first samples of a chain (closest to its cold start) are
not a random sample of it. Both are avoided here at the price of a smaller radius.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import SolverConfig, from_dict, to_dict
from ..errors import ConfigError, InputError, NonConvergenceWarning

logger = logging.getLogger(__name__)

ABSTAIN = -1
SCHEMA = "robustdeq.certify.smoothing/1"
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
PLOT_FILE = "certified_accuracy.png"
SRS_STARTS = ("chain", "clean")


# ============================================================================= configuration
@dataclass(frozen=True)
class SmoothingConfig:
    """Settings of :func:`certify` / :func:`predict`.

    Attributes:
        sigma: standard deviation of the Gaussian noise (> 0).
        n0: selection samples (CERTIFY). n: estimation samples (CERTIFY) / samples (PREDICT).
        alpha: failure probability in (0, 1).
        batch_size: noise samples solved together (the SRS serialisation unit).
        srs_steps: 0 for independent solves; S > 0 for SRS with S solver steps per warm batch.
        check_samples: K, estimation samples also solved from scratch (SRS only, 1..n).
        check_alpha_fraction: share of alpha spent on the agreement bound (SRS only, in (0, 1)).
        srs_start: where the warm-started solves start (SRS only): ``"chain"`` (the paper's rule:
            each batch from the previous batch's fixed points, solved in sequence) or ``"clean"``
            (every noise sample from the fixed point of the clean input; no sequence, so any
            batch size, and the start is closer to the noisy fixed points).
        check_max: 0 (default) checks exactly ``check_samples`` positions; > ``check_samples``
            (at most n) chooses the number of checked positions per input in
            [check_samples, check_max] from the warm-started count alone (``check_count``).
        check_slack: the radius (in units of sigma) that the adaptive check count is sized to lose
            at most when the check finds no disagreement (``check_max > 0`` only).
        clip: smooth ``f(clip(x + e, 0, 1))`` instead of ``f(x + e)``.
        radii: L2 radii at which the report gives certified accuracy.
        seed: base seed of the noise (per image: derived from seed and the image index).
    """

    sigma: float = 0.25
    n0: int = 100
    n: int = 10000
    alpha: float = 0.001
    batch_size: int = 400
    srs_steps: int = 0
    check_samples: int = 400
    check_alpha_fraction: float = 0.5
    srs_start: str = "chain"
    check_max: int = 0
    check_slack: float = 0.1
    clip: bool = False
    radii: Tuple[float, ...] = DEFAULT_RADII
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"SmoothingConfig.sigma must be a finite number > 0, got {self.sigma!r}")
        for name, low in (("n0", 1), ("n", 1), ("batch_size", 1), ("srs_steps", 0), ("seed", 0),
                          ("check_samples", 0), ("check_max", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"SmoothingConfig.{name} must be an int >= {low}, got {v!r}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"SmoothingConfig.alpha must be in (0, 1), got {self.alpha!r}")
        if not 0 < self.check_alpha_fraction < 1:
            raise ConfigError("SmoothingConfig.check_alpha_fraction must be in (0, 1), got "
                              f"{self.check_alpha_fraction!r}")
        if self.srs_steps > 0 and not 1 <= self.check_samples <= self.n:
            raise ConfigError(f"SmoothingConfig.check_samples must be in [1, n={self.n}] with SRS "
                              f"(srs_steps > 0): without checked samples the warm-started counts carry "
                              f"no evidence about the base classifier; got {self.check_samples}")
        if self.srs_start not in SRS_STARTS:
            raise ConfigError(f"SmoothingConfig.srs_start must be one of {', '.join(SRS_STARTS)}, got "
                              f"{self.srs_start!r}")
        if self.check_max and not self.check_samples <= self.check_max <= self.n:
            raise ConfigError(f"SmoothingConfig.check_max must be 0 (a fixed number of checked samples) or "
                              f"in [check_samples={self.check_samples}, n={self.n}], got {self.check_max}")
        if not (math.isfinite(self.check_slack) and self.check_slack > 0):
            raise ConfigError(f"SmoothingConfig.check_slack must be a finite number > 0, got {self.check_slack!r}")
        radii = tuple(float(r) for r in self.radii)
        if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
            raise ConfigError(f"SmoothingConfig.radii must be finite numbers >= 0, got {self.radii!r}")
        object.__setattr__(self, "radii", tuple(sorted(set(radii))))

    @property
    def srs(self) -> bool:
        return self.srs_steps > 0

    def replace(self, **changes) -> "SmoothingConfig":
        return make_config({**to_dict(self), **changes})


def make_config(config: Union[SmoothingConfig, Mapping[str, Any], None] = None, **options) -> SmoothingConfig:
    """A :class:`SmoothingConfig` from an instance or a mapping, with ``options`` overriding;
    unknown keys raise :class:`ConfigError`."""
    if isinstance(config, SmoothingConfig):
        base = to_dict(config)
    elif config is None:
        base = {}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"smoothing config must be a SmoothingConfig or a mapping, got {type(config).__name__}")
    return from_dict(SmoothingConfig, {**base, **options})


# ============================================================================= statistics
def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from ``k``
    successes in ``n`` trials: ``Beta^-1(alpha; k, n - k + 1)``, 0 for ``k = 0``."""
    from scipy.stats import beta
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise InputError(f"Clopper-Pearson needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound: ``Beta^-1(1 - alpha; k + 1, n - k)``,
    1 for ``k = n``."""
    from scipy.stats import beta
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise InputError(f"Clopper-Pearson needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == n:
        return 1.0
    return float(beta.ppf(1 - alpha, k + 1, n - k))


def hypergeom_upper(d: int, population: int, sample: int, alpha: float) -> int:
    """(1 - alpha) upper confidence bound on the number ``D`` of marked items in a population of
    ``population`` items when a uniform sample without replacement of ``sample`` items holds ``d``
    marked ones: the largest ``D`` with ``P(X <= d | D) > alpha`` (X hypergeometric)."""
    from scipy.stats import hypergeom
    d, population, sample = int(d), int(population), int(sample)
    if not 0 <= sample <= population or not 0 <= d <= sample:
        raise InputError(f"hypergeometric bound needs 0 <= d <= sample <= population, got d={d}, "
                         f"sample={sample}, population={population}")
    hi = population - (sample - d)          # the unmarked items seen must exist
    if hypergeom.cdf(d, population, hi, sample) > alpha:
        return hi
    lo = d                                   # cdf(d; D=d) = 1 > alpha
    while hi - lo > 1:                       # invariant: cdf(lo) > alpha >= cdf(hi)
        mid = (lo + hi) // 2
        if hypergeom.cdf(d, population, mid, sample) > alpha:
            lo = mid
        else:
            hi = mid
    return lo


def radius_from(p_lower: float, sigma: float) -> float:
    """``sigma * Phi^-1(p_lower)`` for ``p_lower > 1/2``, else 0 (abstain)."""
    from scipy.stats import norm
    if not p_lower > 0.5:
        return 0.0
    return float(sigma * norm.ppf(p_lower))


def srs_lower_bound(n_a: int, n: int, checked: int, disagree: int, agree: int, alpha: float,
                    check_alpha_fraction: float = 0.5, *, gained: int = 0) -> Tuple[float, int]:
    """The correlation-eliminated lower bound of the module docstring: ``(p_lower, D_up)``.

    ``n_a``: warm-started count of ``c_hat`` among ``n``; ``checked``: K positions re-solved from
    scratch; ``disagree``: checked positions with SRS = c_hat but base != c_hat; ``agree``: checked
    positions where both are c_hat; ``gained``: checked positions with SRS != c_hat but
    base = c_hat (base-classifier successes the warm-started count missed, which offset
    disagreements; 0 leaves them out). The count bounded is ``n_a - max(D_up - gained, 0)``."""
    gained = int(gained)
    if gained < 0 or disagree + agree + gained > checked:
        raise InputError(f"srs_lower_bound: disagree + agree + gained must be <= checked, got "
                         f"{disagree} + {agree} + {gained} > {checked}")
    a1 = check_alpha_fraction * alpha
    a2 = alpha - a1
    d_up = hypergeom_upper(disagree, n, checked, a1)
    d_up = min(d_up, n_a - agree)
    # gained positions offset disagreements, but the bound never exceeds the warm-started count
    # (the corrected radius is never larger than the uncorrected one)
    return clopper_pearson_lower(max(n_a - max(d_up - gained, 0), 0), n, a2), int(d_up)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def check_count(n_a: int, n: int, alpha: float, k_min: int, k_max: int,
                check_alpha_fraction: float = 0.5, slack: float = 0.1) -> int:
    """The number of checked positions of the adaptive SRS check (``check_max > 0``), a function
    of the warm-started count ``n_a`` alone (so that, given the noise, the checked positions --
    the first K of a random permutation drawn independently of it -- are still a uniform random
    K-subset and the hypergeometric bound holds).

    The smallest K in [k_min, k_max] such that, should the check find no disagreement, the
    corrected radius is at most ``slack * sigma`` below the uncorrected one
    ``sigma Phi^-1(CP(n_a, n, alpha_2))`` (whatever sigma); ``k_max`` when none is; ``k_min`` when
    the input would abstain anyway. Inputs whose warm-started count is near n need many checks (a
    bound on the disagreements from K checks with none seen is about n ln(1/alpha_1) / K), inputs
    far from 1 few."""
    from scipy.stats import norm
    a1 = check_alpha_fraction * alpha
    a2 = alpha - a1
    p_unc = clopper_pearson_lower(n_a, n, a2)
    if p_unc <= 0.5 or k_min >= k_max:
        return int(k_min)
    target = max(float(norm.cdf(norm.ppf(p_unc) - slack)), 0.5)
    # D_allow: the most disagreements the corrected bound can absorb and still reach target
    lo, hi = 0, n_a                       # CP(n_a - lo) >= target > CP(n_a - hi) (or hi = n_a)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if clopper_pearson_lower(n_a - mid, n, a2) >= target:
            lo = mid
        else:
            hi = mid
    # hypergeom_upper(0, n, K, a1) <= d_allow  <=>  P(X = 0 | D = d_allow + 1) <= a1,
    # decreasing in K: binary search on log C(n - D, K) - log C(n, K)
    dd, la = lo + 1, math.log(a1)

    def ok(k: int) -> bool:
        return k > n - dd or _log_comb(n - dd, k) - _log_comb(n, k) <= la

    if ok(k_min):
        return int(k_min)
    if not ok(k_max):
        return int(k_max)
    lo, hi = k_min, k_max                 # ok(lo) false, ok(hi) true
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return int(hi)


# ============================================================================= the base classifier
def _is_deq(model: nn.Module) -> bool:
    from ..deq.protocols import SolverModel
    return isinstance(model, SolverModel)


def _is_unrolled(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("unroll", "inject", "readout", "init_state", "depth"))


def base_logits(model: nn.Module, x: Tensor, *, clip: bool = False) -> Tensor:
    """The model's logits on (possibly out-of-[0, 1]) inputs ``x``: the same computation as
    ``model(x)`` (for a DEQ: its solver, then its gradient estimator's read-out, with autograd as
    enabled) without the input-range check, and without touching the model's state. ``clip``:
    clamp ``x`` to [0, 1] first. Other modules are called as they are."""
    if clip:
        x = x.clamp(0.0, 1.0)
    x = _to_model_dtype(model, x)
    if _is_deq(model):
        return _run_noisy(model, x).logits
    if _is_unrolled(model):
        u = model.inject(x)
        return model.readout(model.unroll(u, model.init_state(u), int(model.depth)))
    try:
        return model(x)
    except InputError as e:
        raise ConfigError(f"{type(model).__name__} rejects the noisy inputs ({e}); smooth "
                          "f(clip(x + noise, 0, 1)) instead with clip=True") from None


def _run_noisy(model: nn.Module, x: Tensor, **options):
    """``model.run`` on noisy inputs (outside [0, 1] allowed); its per-call non-convergence
    warning is left out (the smoothing report counts solver work itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        return model.run(x, in_range=False, **options)


def _to_model_dtype(model: nn.Module, x: Tensor) -> Tensor:
    """Floating-point inputs in the dtype of the model's parameters (as the models' input check does)."""
    p = next(model.parameters(), None)
    if p is not None and p.is_floating_point() and x.is_floating_point() and p.dtype != x.dtype:
        return x.to(p.dtype)
    return x


class _Base:
    """Evaluates the base classifier on noise batches: independent solves, or (SRS) warm-started
    solves with ``S`` solver steps (a chain of batches, or from the clean input's fixed point).
    Counts the solver's per-sample steps (``f_evals``) and the rows actually passed through the
    cell (``cell_evals``: a batched solve evaluates every row until its last row stops, and a
    read-out may evaluate the cell once more; counted while :meth:`counting` is active)."""

    def __init__(self, model: nn.Module, cfg: SmoothingConfig):
        self.model, self.cfg = model, cfg
        self.deq = _is_deq(model)
        if cfg.srs and not self.deq:
            raise ConfigError(f"SRS (srs_steps > 0) needs a DEQ with a fixed-point solver; "
                              f"{type(model).__name__} has none: use srs_steps=0")
        self.f_evals = 0
        self.cell_evals = 0
        self.z: Optional[Tensor] = None       # the chain: previous batch's fixed points
        self.ok: Optional[Tensor] = None
        self.anchor: Optional[Tuple[Tensor, Tensor]] = None   # clean start: (z*(x), ok)
        if self.deq:
            self.est = model.estimator
            self.rec = sorted(set(self.est.required_record()))
            if cfg.srs:
                base_cfg = getattr(model, "solver_config", None) or SolverConfig()
                self.chain_cfg = base_cfg.replace(max_iter=int(cfg.srs_steps))
                self.chain_rec = [s for s in self.rec if s < cfg.srs_steps]

    def reset(self) -> None:
        self.z = self.ok = self.anchor = None
        self.f_evals = 0
        self.cell_evals = 0

    @contextlib.contextmanager
    def counting(self):
        """Count the rows through ``model.cell`` (a forward hook, removed on exit)."""
        cell = getattr(self.model, "cell", None) if self.deq else None
        if not isinstance(cell, nn.Module):
            yield
            return

        def hook(_mod, inputs, _out):
            t = inputs[0] if inputs else None
            while isinstance(t, (list, tuple)) and t:
                t = t[0]
            if isinstance(t, Tensor) and t.dim() > 0:
                self.cell_evals += int(t.shape[0])
        handle = cell.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _noisy(self, xn: Tensor) -> Tensor:
        return _to_model_dtype(self.model, xn.clamp(0.0, 1.0) if self.cfg.clip else xn)

    def full(self, xn: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Independent (from-scratch) predictions ``(pred, z*, ok)`` of the base classifier."""
        if not self.deq:
            logits = base_logits(self.model, xn, clip=self.cfg.clip)
            return logits.argmax(dim=1), None, None
        eq = _run_noisy(self.model, self._noisy(xn))
        self.f_evals += int(eq.stats.steps.sum())
        return eq.logits.argmax(dim=1), eq.z_star, ~eq.stats.diverged

    def full_batched(self, xn: Tensor) -> Tensor:
        """:meth:`full`'s predictions on ``xn`` in batches of ``batch_size``."""
        out = [self.full(xn[s:s + b])[0] for s, b in _batches(xn.shape[0], self.cfg.batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=xn.device)

    def _warm(self, xn: Tensor, z0: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        # S solver steps from the chain; an estimator whose state is not recorded within S
        # steps reads out the iterate itself
        grad = None if len(self.chain_rec) == len(self.rec) else "none"
        eq = _run_noisy(self.model, self._noisy(xn), z0=z0, solver=self.chain_cfg, grad=grad)
        self.f_evals += int(eq.stats.steps.sum())
        return eq.logits.argmax(dim=1), eq.z_star, ~eq.stats.diverged

    def set_anchor(self, x1: Tensor) -> None:
        """Clean start: solve the clean input ``x1`` (1, ...) from scratch; its fixed point starts
        every warm solve of this input (where it converged and is finite)."""
        _, z, ok = self.full(x1)
        finite = torch.isfinite(z.reshape(1, -1)).all(dim=1)
        self.anchor = (z.detach(), ok & finite)

    def chain(self, xn: Tensor) -> Tuple[Tensor, Tensor]:
        """SRS predictions of one noise batch ``(pred, warm)``; ``warm``: rows warm-started."""
        from ..attacks.base import initial_state_fn, warm_start_rows
        b = xn.shape[0]
        start = None
        if self.anchor is not None:
            za, oka = self.anchor
            start = warm_start_rows(za.expand((b,) + tuple(za.shape[1:])), oka.expand(b),
                                    initial_state_fn(self.model, self._noisy(xn)), b)
        elif self.z is not None:
            idx = torch.arange(b, device=self.z.device) % self.z.shape[0]
            start = warm_start_rows(self.z[idx], self.ok[idx], initial_state_fn(self.model, self._noisy(xn)), b)
        if start is None:
            pred, z, ok = self.full(xn)
            warm = torch.zeros(b, dtype=torch.bool, device=xn.device)
        else:
            z0, warm = start
            pred = torch.empty(b, dtype=torch.long, device=xn.device)
            z = torch.empty(z0.shape, dtype=z0.dtype, device=z0.device)
            ok = torch.empty(b, dtype=torch.bool, device=xn.device)
            if bool(warm.all()):
                pred, zw, ok = self._warm(xn, z0.contiguous())
                z = zw.reshape(z.shape)
            else:
                wi, ci = warm.nonzero().flatten(), (~warm).nonzero().flatten()
                pw, zw, okw = self._warm(xn[wi], z0[wi])
                pred[wi], z[wi], ok[wi] = pw, zw.reshape(z[wi].shape), okw
                if ci.numel():
                    pc, zc, okc = self.full(xn[ci])
                    pred[ci], z[ci], ok[ci] = pc, zc.reshape(z[ci].shape), okc
        if self.anchor is None:
            finite = torch.isfinite(z.reshape(b, -1)).all(dim=1)
            self.z, self.ok = z.detach(), (ok & finite)
        return pred, warm


# ============================================================================= results
@dataclass
class SmoothingResult:
    """The smoothed certificate of one input.

    prediction: the certified class, or ABSTAIN (-1); radius: certified L2 radius (0 when
    abstaining); p_lower: the lower bound on p_A used; count / n: estimation count of the
    selected class; selected: the class chosen on the selection samples; correct: prediction ==
    label (None without labels); seconds: wall time for this input; f_evals: evaluations of the
    cell per noise sample (DEQs: the solver's per-sample steps); srs: for SRS, the correction's
    ingredients (checked, disagree, agree, gained, d_upper, p_lower_uncorrected,
    radius_uncorrected, warm_fraction); cell_evals: rows passed through the cell per noise sample
    (DEQs: what was computed -- a batched solve evaluates every row of the batch until its last
    row stops, and the read-out may evaluate the cell once more).
    """

    index: int
    label: Optional[int]
    prediction: int
    radius: float
    p_lower: float
    count: int
    n: int
    selected: int
    correct: Optional[bool]
    seconds: float
    f_evals: Optional[float] = None
    srs: Optional[Dict[str, Any]] = None
    cell_evals: Optional[float] = None

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def certified_at(self, r: float) -> bool:
        """Certified (and correct when labelled) on the open L2 ball of radius ``r``."""
        ok = self.correct if self.correct is not None else True
        return bool(ok) and not self.abstained and self.radius > r


def _frac(vals) -> Optional[float]:
    vals = list(vals)
    return float(sum(bool(v) for v in vals)) / len(vals) if vals else None


def summarize(results: Sequence[SmoothingResult], radii: Sequence[float]) -> Dict[str, Any]:
    """Certified accuracy (fraction certified when unlabelled) at ``radii``, abstain rate, timing."""
    n = len(results)
    if not n:
        return {"n": 0}
    labelled = all(r.correct is not None for r in results)
    key = "certified_accuracy" if labelled else "certified_fraction"
    out: Dict[str, Any] = {
        "n": n, "labelled": labelled,
        key: {f"{float(r):g}": _frac(s.certified_at(r) for s in results) for r in radii},
        "abstain_rate": _frac(s.abstained for s in results),
        "smoothed_accuracy": _frac(s.correct and not s.abstained for s in results) if labelled else None,
        "mean_radius": sum(s.radius for s in results) / n,
        "time_per_image_s": sum(s.seconds for s in results) / n,
    }
    fe = [s.f_evals for s in results if s.f_evals is not None]
    out["f_evals_per_noise_sample"] = sum(fe) / len(fe) if fe else None
    ce = [s.cell_evals for s in results if s.cell_evals is not None]
    out["cell_evals_per_noise_sample"] = sum(ce) / len(ce) if ce else None
    srs = [s.srs for s in results if s.srs]
    if srs:
        chk = sum(s["checked"] for s in srs)
        out["srs"] = {
            "checked": chk,
            "checked_per_input": chk / len(srs),
            "disagreement_rate": sum(s["disagree"] for s in srs) / max(chk, 1),
            "gained_rate": sum(s.get("gained", 0) for s in srs) / max(chk, 1),
            "certified_accuracy_uncorrected" if labelled else "certified_fraction_uncorrected": {
                f"{float(r):g}": _frac((s.selected == s.label if s.label is not None else True)
                                       and s.srs["radius_uncorrected"] > r for s in results) for r in radii},
            "mean_radius_uncorrected": sum(s["radius_uncorrected"] for s in srs) / len(srs),
            "warm_fraction": sum(s["warm_fraction"] for s in srs) / len(srs),
        }
    return out


def _json_safe(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


@dataclass
class SmoothingReport:
    """Smoothed certificates of one model on a batch of inputs (JSON, Markdown, plot)."""

    config: Dict[str, Any]
    results: List[SmoothingResult]
    summary: Dict[str, Any]
    model: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    @property
    def radii(self) -> List[float]:
        return [float(r) for r in self.config.get("radii", DEFAULT_RADII)]

    def radius(self) -> Tensor:
        """(N,) certified radii (0 where abstaining or wrong is NOT applied: the raw radius)."""
        return torch.tensor([r.radius for r in self.results], dtype=torch.float64)

    def prediction(self) -> Tensor:
        return torch.tensor([r.prediction for r in self.results], dtype=torch.long)

    def certified_accuracy(self, r: float) -> float:
        return _frac(s.certified_at(r) for s in self.results) or 0.0

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _json_safe({"schema": self.schema, "kind": "randomized_smoothing", "model": self.model,
                           "config": self.config, "summary": self.summary, "provenance": self.provenance,
                           "results": [dataclasses.asdict(r) for r in self.results]})

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "SmoothingReport":
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise InputError(f"not a robustdeq smoothing certificate (schema "
                             f"{d.get('schema') if isinstance(d, Mapping) else None!r}, expected {SCHEMA!r})")
        known = {"schema", "kind", "model", "config", "summary", "provenance", "results"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown smoothing-report field(s): {unknown}")
        try:
            results = [SmoothingResult(**r) for r in d["results"]]
        except TypeError as e:
            raise InputError(f"malformed smoothing results: {e}") from None
        return SmoothingReport(config=dict(d["config"]), results=results, summary=dict(d["summary"]),
                               model=dict(d.get("model") or {}), provenance=dict(d.get("provenance") or {}))

    @staticmethod
    def load(path) -> "SmoothingReport":
        p = Path(path)
        if p.is_dir():
            p = p / "certificate.json"
        if not p.is_file():
            raise InputError(f"no smoothing certificate at {p}")
        return SmoothingReport.from_dict(json.loads(p.read_text()))

    def save(self, out_dir, *, plot: bool = True) -> Dict[str, str]:
        """Write ``certificate.json``, ``certificate.md`` and (``plot``) ``certified_accuracy.png``."""
        from .report import write_certificate_files
        paths = write_certificate_files(out_dir, self.to_json(), self.to_markdown())
        if plot:
            paths["plot"] = self.plot(Path(out_dir) / PLOT_FILE)
        return paths

    # -- people -----------------------------------------------------------------------------------
    def _acc_key(self) -> str:
        return "certified_accuracy" if "certified_accuracy" in self.summary else "certified_fraction"

    def brief(self) -> str:
        s, c = self.summary, self.config
        mode = f"SRS, {c['srs_steps']} solver steps per warm batch" if c.get("srs_steps") else "independent solves"
        acc = s.get(self._acc_key(), {})
        lines = [f"randomized smoothing (sigma {c['sigma']:g}, n0 {c['n0']}, n {c['n']}, alpha {c['alpha']:g}; "
                 f"{mode}) on {s.get('n')} inputs:",
                 "  " + ", ".join(f"{self._acc_key().replace('_', ' ')}@{r} {_pct(v)}" for r, v in acc.items()),
                 f"  abstain rate {_pct(s.get('abstain_rate'))}; {s.get('time_per_image_s', 0.0):.3f} s per image"]
        if s.get("srs"):
            lines.append(f"  SRS check: {s['srs']['checked']} samples re-solved, disagreement rate "
                         f"{s['srs']['disagreement_rate']:.4f}")
        return "\n".join(lines)

    def to_markdown(self, max_rows: int = 20) -> str:
        s, c = self.summary, self.config
        name = self.model.get("name") or self.model.get("class", "model")
        acc = s.get(self._acc_key(), {})
        L = [f"# Randomized-smoothing certificate: {name}", ""]
        L.append(f"Gaussian smoothing (Cohen, Rosenfeld, Kolter 2019), sigma = {c['sigma']:g}, "
                 f"n0 = {c['n0']}, n = {c['n']}, alpha = {c['alpha']:g}, batch {c['batch_size']}"
                 + (", inputs clipped to [0, 1]" if c.get("clip") else "") + ".")
        if c.get("srs_steps"):
            start = ("every noise sample from the clean input's fixed point" if c.get("srs_start") == "clean"
                     else "each batch from the previous batch's fixed points")
            checks = (f"{c['check_samples']} to {c['check_max']} random estimation samples (per input, from the "
                      f"warm-started count)" if c.get("check_max") else
                      f"{c['check_samples']} random estimation samples")
            L.append(f"Serialized randomized smoothing (Gao, Hou, Xu, Liu 2024): warm-started solves with "
                     f"{c['srs_steps']} solver steps, {start}; {checks} re-solved "
                     f"from scratch; failure probability split {c['check_alpha_fraction']:g} / "
                     f"{1 - c['check_alpha_fraction']:g} between the agreement and the binomial bound.")
        L += ["", "The radii certify the smoothed classifier g(x) = argmax_c P(f(x + e) = c), not the base model; "
              f"each holds with probability >= {1 - c['alpha']:g} over the noise.", "",
              "| inputs | " + " | ".join(f"{'cert acc' if 'accuracy' in self._acc_key() else 'cert frac'} L2@{r}"
                                         for r in acc) + " | abstain | time / image (s) | f evals / noise sample |",
              "|" + "---|" * (len(acc) + 4),
              f"| {s.get('n')} | " + " | ".join(_pct(v) for v in acc.values())
              + f" | {_pct(s.get('abstain_rate'))} | {s.get('time_per_image_s', 0.0):.4f} | "
              + (f"{s['f_evals_per_noise_sample']:.2f}" if s.get("f_evals_per_noise_sample") is not None else "n/a")
              + " |", ""]
        srs = s.get("srs")
        if srs:
            unc = srs.get("certified_accuracy_uncorrected") or srs.get("certified_fraction_uncorrected") or {}
            L += ["Without the correlation correction (not a valid certificate, for comparison): "
                  + ", ".join(f"L2@{r} {_pct(v)}" for r, v in unc.items())
                  + f"; disagreement rate on the checked samples {srs['disagreement_rate']:.4f}; "
                  f"warm-started share {srs['warm_fraction']:.3f}.", ""]
        if self.results:
            L += ["## Inputs", "", "| # | label | prediction | radius | p_lower | count / n | seconds |",
                  "|---|---|---|---|---|---|---|"]
            for r in self.results[:max_rows]:
                pred = "abstain" if r.abstained else str(r.prediction)
                L.append(f"| {r.index} | {r.label} | {pred} | {r.radius:.4f} | {r.p_lower:.4f} | "
                         f"{r.count} / {r.n} | {r.seconds:.3f} |")
            if len(self.results) > max_rows:
                L.append(f"| ... | {len(self.results) - max_rows} more in certificate.json | | | | | |")
            L.append("")
        return "\n".join(L)

    def plot(self, path) -> str:
        """Certified accuracy against the L2 radius (PNG, matplotlib's Agg canvas)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        radii = [r.radius for r in self.results]
        top = max(max(radii, default=0.0), max(self.radii, default=0.0), 1e-3) * 1.05
        grid = [top * i / 400 for i in range(401)]
        acc = [self.certified_accuracy(g) for g in grid]
        fig = Figure(figsize=(5, 3.5), tight_layout=True)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        label = f"sigma={self.config['sigma']:g}" + (f", SRS S={self.config['srs_steps']}"
                                                      if self.config.get("srs_steps") else "")
        ax.plot(grid, acc, lw=2, label=label)
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy" if "accuracy" in self._acc_key() else "certified fraction")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100)
        return str(p)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


# ============================================================================= the algorithms
def _derive_seed(seed: int, tag: str, index: int) -> int:
    h = hashlib.sha256(f"robustdeq.smoothing:{seed}:{tag}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _check_x(model: nn.Module, x: Any) -> Tensor:
    from ..data import validate_inputs
    return validate_inputs(x, expected_shape=getattr(model, "input_shape", None)).detach()


def _check_y(y: Optional[Tensor], n: int) -> Optional[Tensor]:
    if y is None:
        return None
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != n:
        raise InputError(f"y must be a 1-D tensor of {n} labels, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"y must hold integer class labels, got dtype {y.dtype}")
    return y


def _noise(gen: torch.Generator, b: int, x1: Tensor, sigma: float) -> Tensor:
    e = torch.randn((b,) + tuple(x1.shape[1:]), generator=gen, dtype=x1.dtype).to(x1.device)
    return x1 + sigma * e


def _batches(total: int, size: int):
    done = 0
    while done < total:
        b = min(size, total - done)
        yield done, b
        done += b


def _count(pred: Tensor, counts: Optional[Tensor]) -> Tensor:
    c = torch.bincount(pred.cpu(), minlength=1)
    if counts is None:
        return c
    m = max(c.numel(), counts.numel())
    out = torch.zeros(m, dtype=torch.long)
    out[:counts.numel()] += counts
    out[:c.numel()] += c
    return out


def _resolve_from_scratch(base: _Base, x1: Tensor, cfg: SmoothingConfig, states: list, need: Tensor,
                          out: Tensor) -> None:
    """``out[i] =`` the base classifier's prediction on the noise of position ``i`` for every
    ``need[i]``, re-drawing each batch's noise from its saved generator state; the rows are solved
    in batches of ``batch_size``."""
    g = torch.Generator()
    rows: List[Tensor] = []
    where: List[Tensor] = []
    pending = 0

    def flush() -> None:
        nonlocal rows, where, pending
        if pending:
            out[torch.cat(where)] = base.full_batched(torch.cat(rows)).cpu()
        rows, where, pending = [], [], 0
    for start, b, state in states:
        m = need[start:start + b]
        if not bool(m.any()):
            continue
        g.set_state(state)
        xn = _noise(g, b, x1, cfg.sigma)
        rows.append(xn[m.to(xn.device)])
        where.append(m.nonzero().flatten() + start)
        pending += int(m.sum())
        if pending >= cfg.batch_size:
            flush()
    flush()


def _certify_one(base: _Base, x1: Tensor, index: int, cfg: SmoothingConfig) -> Tuple[int, float, float, int, int, dict]:
    """CERTIFY (and SRS) for one input ``x1`` (1, ...)."""
    base.reset()
    gen = torch.Generator().manual_seed(_derive_seed(cfg.seed, "noise", index))
    sample = base.chain if cfg.srs else (lambda xn: (base.full(xn)[0], None))
    if cfg.srs and cfg.srs_start == "clean":
        base.set_anchor(x1)
    counts0 = None
    for _, b in _batches(cfg.n0, cfg.batch_size):
        counts0 = _count(sample(_noise(gen, b, x1, cfg.sigma))[0], counts0)
    c_hat = int(counts0.argmax())
    if not cfg.srs:
        n_a = 0
        for _, b in _batches(cfg.n, cfg.batch_size):
            n_a += int((sample(_noise(gen, b, x1, cfg.sigma))[0] == c_hat).sum())
        p_lower = clopper_pearson_lower(n_a, cfg.n, cfg.alpha)
        return (c_hat if p_lower > 0.5 else ABSTAIN), radius_from(p_lower, cfg.sigma), p_lower, n_a, c_hat, {}
    # SRS. The checked positions are the first K of a random permutation drawn independently of
    # the noise; K is cfg.check_samples, or (check_max) a function of the warm-started count only.
    # After the warm pass the noise of the checked positions is drawn again (from the generator
    # state saved before each batch) and solved from scratch in full batches: the same
    # predictions as solving it within the warm pass, in memory of one batch.
    cgen = torch.Generator().manual_seed(_derive_seed(cfg.seed, "check", index))
    perm = torch.randperm(cfg.n, generator=cgen)
    preds = torch.empty(cfg.n, dtype=torch.long)
    warms = torch.empty(cfg.n, dtype=torch.bool)
    states = []
    n_a = 0
    for start, b in _batches(cfg.n, cfg.batch_size):
        states.append((start, b, gen.get_state()))
        pred, warm = sample(_noise(gen, b, x1, cfg.sigma))
        n_a += int((pred == c_hat).sum())
        preds[start:start + b], warms[start:start + b] = pred.cpu(), warm.cpu()
    k = cfg.check_samples
    if cfg.check_max:
        k = check_count(n_a, cfg.n, cfg.alpha, cfg.check_samples, cfg.check_max,
                        cfg.check_alpha_fraction, cfg.check_slack)
    pos = perm[:k]
    srs_pred = preds[pos]
    std = preds.clone()                  # cold rows: the warm pass IS the base classifier there
    need = torch.zeros(cfg.n, dtype=torch.bool)
    need[pos] = True
    need &= warms
    _resolve_from_scratch(base, x1, cfg, states, need, std)
    std = std[pos]
    hit_srs, hit_std = srs_pred == c_hat, std == c_hat
    disagree = int((hit_srs & ~hit_std).sum())
    agree = int((hit_srs & hit_std).sum())
    gained = int((~hit_srs & hit_std).sum())
    p_unc = clopper_pearson_lower(n_a, cfg.n, cfg.alpha)
    p_lower, d_up = srs_lower_bound(n_a, cfg.n, k, disagree, agree, cfg.alpha, cfg.check_alpha_fraction,
                                    gained=gained)
    extra = {"checked": k, "disagree": disagree, "agree": agree, "gained": gained, "d_upper": d_up,
             "p_lower_uncorrected": p_unc, "radius_uncorrected": radius_from(p_unc, cfg.sigma),
             "warm_fraction": int(warms.sum()) / cfg.n}
    radius = radius_from(p_lower, cfg.sigma)
    return (c_hat if p_lower > 0.5 else ABSTAIN), radius, p_lower, n_a, c_hat, extra


def _model_info(model: nn.Module) -> dict:
    cfg = getattr(model, "robustdeq_config", None) or {}
    sc = getattr(model, "solver_config", None)
    return {"name": cfg.get("name"), "options": cfg.get("options"), "class": type(model).__name__,
            "solver": to_dict(sc) if sc is not None else None}


def certify(model: nn.Module, x: Tensor, y: Optional[Tensor] = None,
            config: Union[SmoothingConfig, Mapping[str, Any], None] = None, *,
            progress: bool = False, **options) -> SmoothingReport:
    """Certify the Gaussian-smoothed ``model`` at every input of ``x`` (CERTIFY; SRS when
    ``srs_steps > 0``). See the module docstring for the exact rule.

    Args:
        model: any ``x -> logits`` module (DEQs: their own solver; SRS needs a DEQ). Not modified.
        x: (N, ...) inputs in [0, 1]; y: (N,) labels or None.
        config: a :class:`SmoothingConfig` or mapping; ``options`` override its fields
            (``sigma=0.5, n=1000, srs_steps=3``).
        progress: tqdm progress bar over the inputs.
    Returns:
        :class:`SmoothingReport` (one :class:`SmoothingResult` per input).

    Inside a process group (``torchrun``; :mod:`robustdeq.distributed`) the inputs are shared out
    over the ranks and every rank returns the whole report, equal to the single-process one input
    for input (the noise of an input depends only on ``seed`` and its index);
    :func:`certify_checkpoint` writes it on rank 0 only.
    """
    cfg = make_config(config, **options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module mapping x -> logits, got {type(model).__name__}")
    x = _check_x(model, x)
    y = _check_y(y, x.shape[0])
    from ..attacks.base import model_mode
    from ..distributed import context as dist_context
    ctx = dist_context()
    base = _Base(model, cfg)
    results: List[SmoothingResult] = []
    t_all = time.perf_counter()
    with model_mode(model, "eval"), torch.no_grad(), base.counting():
        def one(i: int) -> SmoothingResult:
            t0 = time.perf_counter()
            pred, radius, p_lower, n_a, c_hat, extra = _certify_one(base, x[i:i + 1], i, cfg)
            seconds = time.perf_counter() - t0
            label = int(y[i]) if y is not None else None
            f_evals = base.f_evals / (cfg.n0 + cfg.n) if base.deq else None
            cell_evals = base.cell_evals / (cfg.n0 + cfg.n) if base.deq else None
            logger.debug("input %d: prediction %s radius %.4f (p_lower %.4f, %d/%d) in %.3f s", i,
                         "abstain" if pred == ABSTAIN else pred, radius, p_lower, n_a, cfg.n, seconds)
            return SmoothingResult(
                index=i, label=label, prediction=pred, radius=radius, p_lower=p_lower, count=n_a, n=cfg.n,
                selected=c_hat, correct=(pred == label) if label is not None else None, seconds=seconds,
                f_evals=f_evals, srs=extra or None, cell_evals=cell_evals)
        results = _per_input(x.shape[0], one, ctx, "certify (smoothing)" if progress else None)
    from .. import __version__
    prov = {"robustdeq": __version__, "torch": torch.__version__, "total_s": time.perf_counter() - t_all,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return SmoothingReport(config=to_dict(cfg), results=results, summary=summarize(results, cfg.radii),
                           model=_model_info(model), provenance=prov)


def predict(model: nn.Module, x: Tensor, config: Union[SmoothingConfig, Mapping[str, Any], None] = None,
            **options) -> Tensor:
    """PREDICT of Cohen et al.: (N,) classes of the smoothed classifier, ABSTAIN (-1) where the
    top two counts of ``n`` independent samples do not differ significantly at level ``alpha``.
    Uses independent solves (SRS has no correlation-corrected PREDICT: ``srs_steps`` must be 0).
    Sharded over the ranks of a process group as :func:`certify` is."""
    from scipy.stats import binomtest
    cfg = make_config(config, **options)
    if cfg.srs:
        raise ConfigError("predict has no correlation-corrected SRS variant; use srs_steps=0 "
                          "(SRS applies to certify)")
    x = _check_x(model, x)
    from ..attacks.base import model_mode
    base = _Base(model, cfg)
    from ..distributed import context as dist_context
    ctx = dist_context()
    with model_mode(model, "eval"), torch.no_grad():
        def one(i: int) -> int:
            gen = torch.Generator().manual_seed(_derive_seed(cfg.seed, "predict", i))
            counts = None
            for _, b in _batches(cfg.n, cfg.batch_size):
                counts = _count(base.full(_noise(gen, b, x[i:i + 1], cfg.sigma))[0], counts)
            if counts.numel() < 2:
                counts = torch.cat([counts, torch.zeros(2 - counts.numel(), dtype=torch.long)])
            top = torch.topk(counts, 2)
            n1, n2 = int(top.values[0]), int(top.values[1])
            p = binomtest(n1, n1 + n2, 0.5).pvalue if n1 + n2 > 0 else 1.0
            return int(top.indices[0]) if p <= cfg.alpha else ABSTAIN
        out = _per_input(x.shape[0], one, ctx, None)
    return torch.tensor(out, dtype=torch.long, device=x.device)


def _per_input(n: int, one, ctx, desc: Optional[str]) -> list:
    """``[one(i) for i in range(n)]``. Inside a process group (``torchrun``;
    :mod:`robustdeq.distributed`) the inputs are shared out over the ranks (each claims the next
    input as it becomes free) and every rank returns the whole list: the noise of input ``i`` is
    drawn from seeds derived from ``i`` alone, so the list does not depend on the sharding. A
    failure on any rank is raised on every rank."""
    from ..distributed import claim, gather_sharded
    bar = None
    if desc is not None and (ctx is None or ctx.is_main):
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=desc, unit="input")
    done: list = []
    failure: Optional[BaseException] = None
    try:
        for i in claim(range(n), ctx):
            done.append((i, one(i)))
            if bar is not None:  # in a group: the inputs claimed so far by all ranks
                bar.update(max(0, i + 1 - bar.n))
    except Exception as e:
        if ctx is None:
            raise
        failure = e  # raised on every rank by gather_sharded
    finally:
        if bar is not None:
            bar.close()
    if ctx is not None:
        logger.debug("rank %d of %d: %d of %d inputs", ctx.rank, ctx.world_size, len(done), n)
        done = gather_sharded(done, failure, ctx)
    return [v for _, v in sorted(done, key=lambda t: t[0])]


def certify_checkpoint(path, *, dataset: str = "digits", split: str = "test", root=None,
                       n_inputs: Optional[int] = None, out_dir=None, map_location="cpu",
                       progress: bool = False, **options) -> SmoothingReport:
    """Load a checkpoint, certify its smoothed version on ``n_inputs`` samples of a dataset split,
    optionally save ``certificate.json`` / ``.md`` / ``certified_accuracy.png`` into ``out_dir``.
    ``options`` are :class:`SmoothingConfig` fields. The body of
    ``robustdeq certify CHECKPOINT --smoothing SIGMA``."""
    from ..checkpoint import load_model
    from ..data import load_dataset
    if n_inputs is not None and (isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1):
        raise ConfigError(f"the number of inputs must be a positive int, got {n_inputs!r}")
    cfg = make_config(None, **options)
    model, _ = load_model(path, map_location=map_location)
    x, y = load_dataset(dataset, split, root=root)
    if n_inputs is not None:
        x, y = x[:n_inputs], y[:n_inputs]
    rep = certify(model, x.to(map_location), y.to(map_location), cfg, progress=progress)
    rep.provenance.update({"checkpoint": str(path), "dataset": dataset, "split": split})
    from ..distributed import is_main
    if out_dir is not None and is_main():  # in a process group rank 0 writes
        rep.save(out_dir)
    return rep


certify_smoothed = certify
predict_smoothed = predict

__all__ = [
    "ABSTAIN", "SmoothingConfig", "SmoothingResult", "SmoothingReport", "make_config", "certify", "predict",
    "certify_smoothed", "predict_smoothed", "certify_checkpoint", "clopper_pearson_lower",
    "clopper_pearson_upper", "hypergeom_upper", "srs_lower_bound", "check_count", "radius_from", "base_logits",
    "summarize",
]
