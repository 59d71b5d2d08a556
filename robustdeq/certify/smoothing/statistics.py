"""Statistics of randomized smoothing: Clopper-Pearson bounds (Cohen et al. 2019), the
hypergeometric bound and the correlation-eliminated lower bound of serialized smoothing (SRS), the
adaptive SRS check count, and the radius ``sigma * Phi^-1(p_lower)``."""
from __future__ import annotations

import math
from typing import Tuple

from ...errors import ConfigError, InputError


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


# ----------------------------------------------------------------------------- confidence sequence
def cs_log_evidence(successes, failures, p0):
    """``log M_t(p0)``, the evidence against ``H0: p <= p0`` after ``successes`` and ``failures``
    Bernoulli(p) observations (numpy-vectorised over all three arguments; counts may be real).

    ``M_t(p0) = E_{q ~ U[p0, 1]} prod_i (q / p0)^{X_i} ((1 - q) / (1 - p0))^{1 - X_i}``, the
    likelihood ratio of Bernoulli(q) to Bernoulli(p0) mixed over a uniform prior on the
    alternatives ``q in [p0, 1]`` (Robbins 1970's method of mixtures; the one-sided beta-binomial
    mixture of Howard, Ramdas, McAuliffe, Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic
    confidence sequences"). In closed form, with ``S`` successes and ``F`` failures,

        M_t(p0) = B(S + 1, F + 1) * I^c_{p0}(S + 1, F + 1) / (p0^S (1 - p0)^(F + 1)),

    ``I^c`` the upper regularized incomplete beta function. Under ``p = p0`` every mixed ratio is a
    martingale of mean 1, so ``M_t(p0)`` is a nonnegative martingale with ``M_0 = 1`` and Ville's
    inequality gives ``P(exists t: M_t(p0) >= 1 / alpha) <= alpha`` -- at every time at once, so
    under any data-dependent stopping rule. ``M_t(p0)`` is nonincreasing in ``p0`` (write
    ``q = p0 + (1 - p0) u``, ``u ~ U[0, 1]``: the integrand ``(1 + (1 - p0) u / p0)^S (1 - u)^F``
    decreases in ``p0`` for every ``u``), so for any true ``p <= p0`` evidence at ``p0`` is at
    most the evidence at ``p``: one test bounds every threshold at or above the true ``p``.
    Underflow of ``I^c`` (far beyond any rejection) gives ``-inf``: never a false rejection.
    """
    if _is_scalar(successes) and _is_scalar(failures) and _is_scalar(p0):
        if successes < 0 or failures < 0:
            raise InputError("cs_log_evidence needs successes >= 0 and failures >= 0")
        if not 0 < p0 < 1:
            raise InputError("cs_log_evidence needs thresholds p0 in (0, 1)")
        return _log_evidence(float(successes), float(failures), float(p0))
    import numpy as np
    from scipy.special import betaincc, betaln
    s = np.asarray(successes, dtype=np.float64)
    f = np.asarray(failures, dtype=np.float64)
    p0 = np.asarray(p0, dtype=np.float64)
    if np.any(s < 0) or np.any(f < 0):
        raise InputError("cs_log_evidence needs successes >= 0 and failures >= 0")
    if np.any(~((p0 > 0) & (p0 < 1))):
        raise InputError("cs_log_evidence needs thresholds p0 in (0, 1)")
    with np.errstate(divide="ignore"):
        tail = np.log(betaincc(s + 1.0, f + 1.0, p0))
    return betaln(s + 1.0, f + 1.0) + tail - s * np.log(p0) - (f + 1.0) * np.log1p(-p0)


def cs_lower(successes, failures, alpha: float, iters: int = 64):
    """Anytime-valid (1 - alpha) lower confidence sequence for a Bernoulli mean:
    ``sup {p0 : M_t(p0) >= 1 / alpha}`` (see :func:`cs_log_evidence`; 0 when no threshold is
    rejected). With probability at least ``1 - alpha`` the true mean is at least this bound at
    every time simultaneously (the bound at time t exceeds p only if ``M_t(p) >= 1 / alpha``).
    The returned value is always a rejected threshold (or 0), so it never exceeds the exact
    supremum. Scalar counts: a bracketing root search on the monotone evidence
    (:func:`_sup_rejected`, within ``ROOT_TOL`` below the supremum, about a dozen evaluations);
    arrays: ``iters`` bisection steps, numpy-vectorised over the counts."""
    import numpy as np
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    c = math.log(1.0 / alpha)
    if _is_scalar(successes) and _is_scalar(failures):
        if successes < 0 or failures < 0:
            raise InputError("cs_lower needs successes >= 0 and failures >= 0")
        return _sup_rejected(float(successes), float(failures), c)
    s = np.asarray(successes, dtype=np.float64)
    f = np.asarray(failures, dtype=np.float64)
    s, f = np.broadcast_arrays(s, f)
    lo = np.zeros(s.shape)
    hi = np.ones(s.shape)
    for _ in range(int(iters)):
        mid = 0.5 * (lo + hi)
        ok = cs_log_evidence(s, f, mid) >= c
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return float(lo) if lo.ndim == 0 else lo


# absolute precision of the scalar confidence bounds (far below any radius that matters:
# sigma * dPhi^-1/dp * 1e-13 < 1e-6 sigma for p up to 1 - 1e-12)
ROOT_TOL = 1e-13


def _is_scalar(v) -> bool:
    import numpy as np
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _log_evidence(s: float, f: float, p0: float) -> float:
    """:func:`cs_log_evidence` for one (valid) triple, without numpy's array machinery: the same
    closed form, the same special functions."""
    from scipy.special import betaincc, betaln
    tail = float(betaincc(s + 1.0, f + 1.0, p0))
    if not tail > 0.0:
        return -math.inf
    return float(betaln(s + 1.0, f + 1.0)) + math.log(tail) - s * math.log(p0) - (f + 1.0) * math.log1p(-p0)


def _sup_rejected(s: float, f: float, c: float, tol: float = ROOT_TOL) -> float:
    """The largest threshold ``p0`` found with ``log M(p0) >= c`` (0 when there is none), at most
    ``tol`` below ``sup {p0 : log M(p0) >= c}``.

    ``g(p0) = log M(p0) - c`` is nonincreasing in ``p0`` (:func:`cs_log_evidence`), so the
    rejected thresholds form an interval ``(0, p*]``. The search keeps a bracket ``lo < hi`` with
    ``lo`` rejected (or 0) and ``hi`` not rejected (or 1); no threshold at or above the empirical
    frequency ``s / (s + f)`` is rejected (every likelihood ratio in the mixture is then at most
    1), so that is the first ``hi``. New points come from the Illinois variant of regula falsi
    (Dowell & Jarratt 1971) with a bisection step whenever an end is infinite, the point would
    fall outside the bracket, or the bracket did not halve over two steps; the search stops when
    ``hi - lo <= tol``. Only evaluated points enter the bracket, so the answer is a rejected
    threshold whatever the rounding of the interpolation."""
    lo, glo, hi, ghi = 0.0, math.inf, 1.0, -math.inf
    if s + f > 0:
        freq = s / (s + f)
        if freq <= 0.0:
            return 0.0
        if freq < 1.0:
            hi, ghi = freq, _log_evidence(s, f, freq) - c
            if ghi >= 0.0:           # cannot happen in exact arithmetic; never trust rounding
                hi, ghi = 1.0, -math.inf
    last = 0          # which end the previous step moved: -1 lo, +1 hi
    width = hi - lo
    for step in range(400):
        if hi - lo <= tol:
            break
        x = math.nan
        if math.isfinite(glo) and math.isfinite(ghi) and glo > ghi and (step % 3 != 2 or hi - lo < 0.5 * width):
            x = hi - ghi * (hi - lo) / (ghi - glo)
        if step % 3 == 2:
            width = hi - lo
        if not lo < x < hi:
            x = 0.5 * (lo + hi)
        x = min(max(x, lo + 0.25 * tol), hi - 0.25 * tol)
        if not 0.0 < x < 1.0:
            break
        gx = _log_evidence(s, f, x) - c
        if gx >= 0.0:
            lo, glo = x, gx
            if last == -1 and math.isfinite(ghi):
                ghi *= 0.5           # Illinois: the end kept twice weighs half
            last = -1
        else:
            hi, ghi = x, gx
            if last == 1 and math.isfinite(glo):
                glo *= 0.5
            last = 1
    return lo


def cs_upper(successes, failures, alpha: float, iters: int = 64):
    """The mirror image of :func:`cs_lower`: an anytime-valid (1 - alpha) upper confidence
    sequence, ``1 - cs_lower(failures, successes, alpha)``."""
    lo = cs_lower(failures, successes, alpha, iters)
    return 1.0 - lo
