"""Anytime-valid sequential decisions for randomized smoothing: certify at requested radii, or the
largest radius, with a per-input number of noise samples.

The estimation samples ``X_i = 1{f(x + e_i) = c_hat}`` (the class ``c_hat`` chosen on ``n0``
separate selection samples, as in Cohen et al.'s CERTIFY) are i.i.d. Bernoulli(``p_A``) given
``c_hat``. After every batch the counts ``S`` (successes) and ``F`` (failures) update the
one-sided beta-binomial mixture ``M_t(p0)`` of :func:`.statistics.cs_log_evidence`, a nonnegative
martingale under ``p_A = p0`` that is nonincreasing in ``p0``. The good event

    E = { M_t(p_A) < 1 / alpha for every t }

has probability at least ``1 - alpha`` (Ville's inequality), whatever rule decides when to stop.

- **Requested radii** (``mode="sequential"``): radius ``r`` is *certified* at the first look
  where ``M_t(Phi(r / sigma)) >= 1 / alpha``. On ``E`` this implies ``Phi(r / sigma) < p_A``
  (monotonicity: ``M_t(p0) <= M_t(p_A)`` for ``p0 >= p_A``), so ``p_A > 1/2`` and, by Cohen et al.'s
  Theorem 1, the smoothed classifier is ``c_hat`` on the L2 ball of radius ``r``. One event ``E``
  covers every look and every radius, so alpha bounds the failure probability of the whole
  procedure (and, as in CERTIFY, the selection is independent of the estimation samples). A radius
  is decided *not certified* when it can no longer be reached within the budget (even if every
  remaining sample succeeded, ``M`` would stay below ``1 / alpha``) or when the mirrored upper
  confidence sequence at level ``futility_alpha`` falls below ``Phi(r / sigma)``; sampling stops
  when every radius is decided or the budget ``n`` is spent (undecided radii abstain). With
  ``futility="projected"`` a radius is also given up when it would stay uncertified at the end of
  the budget even if every remaining sample succeeded at the rate ``U_t`` of that upper confidence
  sequence (the evidence ``M(S + U_t left, F + (1 - U_t) left; Phi(r / sigma))`` stays below
  ``1 / alpha``): inputs whose ``p_A`` lies just below a threshold stop long before the budget.
  Stopping early for futility only ever withholds a certificate.
- **Radius** (``mode="radius"``): the certified radius after each look is
  ``sigma Phi^-1(L_t)`` with ``L_t`` the running maximum of the lower confidence sequence
  ``sup{p0 : M_t(p0) >= 1 / alpha}`` (valid on ``E`` at every time). Sampling stops when the
  radius cannot grow by more than ``tolerance`` within the budget: the lower bound the budget would
  give if the success rate from now on were the upper confidence limit ``U_t`` (level
  ``futility_alpha``) is at most ``tolerance`` larger in radius. Any stopping rule keeps the
  radius valid; this one only decides the cost.

**Final fixed-n test** (``final_alpha_fraction = phi > 0``): alpha is spent in two parts, the
confidence sequence above at level ``alpha_seq = (1 - phi) alpha`` and one Clopper-Pearson test
(Cohen et al. 2019) at level ``alpha_fin = phi alpha`` on the first ``n`` samples, ``n`` the
budget, fixed before sampling. An input that reaches the budget with a radius still undecided
certifies it also when ``CP_lower(S_n, n, alpha_fin) > Phi(r / sigma)``. This is valid although
whether the budget is reached depends on the same samples: let ``G`` be the event that
``CP_lower(S_n, n, alpha_fin) <= p_A`` for the (hypothetical, always defined) first ``n`` samples of
the stream; ``P(not G) <= alpha_fin`` whatever the stopping rule does, because ``S_n`` does not
depend on it. A false certificate needs ``E`` or ``G`` to fail, so the whole procedure errs with
probability at most ``alpha_seq + alpha_fin = alpha`` (union bound). A Clopper-Pearson bound at a
sample size chosen by looking at the data would not be valid; here the size is always ``n``. The
futility rules ask that neither test could still certify (so they keep only withholding), and
radius mode's lower bound at the budget is the larger of the two bounds.

References: Robbins (1970), "Statistical methods related to the law of the iterated logarithm";
Howard, Ramdas, McAuliffe, Sekhon (2021), "Time-uniform, nonparametric, nonasymptotic confidence
sequences"; Cohen, Rosenfeld, Kolter (2019); Voracek & Hein (2024) on sequential certification
for randomized smoothing.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

from .statistics import clopper_pearson_lower, cs_log_evidence, cs_lower, cs_upper

CERTIFIED, NOT_CERTIFIED, UNDECIDED = "certified", "not certified", "undecided"


def radius_key(r: float) -> str:
    """The dict key of radius ``r`` in reports (``f"{r:g}"``)."""
    return f"{float(r):g}"


class SequentialDecision:
    """The decisions of one input as its counts grow (see the module docstring).

    Args:
        sigma: the noise level. radii: radii to decide (``mode="sequential"``; ignored in
        ``"radius"`` mode). alpha: failure probability of the whole procedure.
        futility_alpha: level of the upper confidence sequence used to stop early.
        budget: the most estimation samples. mode: ``"sequential"`` or ``"radius"``.
        tolerance: radius mode's stopping tolerance (L2 radius).
        futility: ``"sequence"`` or ``"projected"`` (see the module docstring).
        final_alpha_fraction: share ``phi`` in [0, 1) of alpha spent on the final fixed-n
            Clopper-Pearson test at the budget (0: the confidence sequence alone at level alpha).
    """

    def __init__(self, sigma: float, radii: Sequence[float], alpha: float, futility_alpha: float,
                 budget: int, mode: str = "sequential", tolerance: float = 0.05, futility: str = "sequence",
                 final_alpha_fraction: float = 0.0):
        from scipy.special import ndtr
        from ...errors import ConfigError
        phi = float(final_alpha_fraction)
        if not 0.0 <= phi < 1.0:
            raise ConfigError(f"final_alpha_fraction must be in [0, 1), got {final_alpha_fraction!r}")
        self.alpha_total = float(alpha)
        self.final_alpha = phi * self.alpha_total
        # the confidence sequence's level: what the final test does not spend
        self.sigma, self.alpha, self.beta = float(sigma), self.alpha_total - self.final_alpha, float(futility_alpha)
        self.budget, self.mode, self.tolerance = int(budget), mode, float(tolerance)
        self.futility = futility
        self.radii = sorted(float(r) for r in radii) if mode == "sequential" else []
        self.thresholds = {r: float(ndtr(r / self.sigma)) for r in self.radii}      # Phi(r / sigma)
        self.decisions: Dict[float, str] = {}
        self.looks: Dict[float, int] = {}
        self.p_lower = 0.0
        self.successes = self.failures = 0
        self._log_c = math.log(1.0 / self.alpha)
        self._log_cf = math.log(1.0 / self.beta)
        self.stopped = False

    @property
    def samples(self) -> int:
        """Estimation samples counted so far."""
        return self.successes + self.failures

    def update(self, successes: int, failures: int) -> bool:
        """Add one batch's counts; returns whether sampling should stop."""
        self.successes += int(successes)
        self.failures += int(failures)
        s, f = self.successes, self.failures
        left = self.budget - self.samples
        if self.mode == "sequential":
            new = False
            up = cs_upper(s, f, self.beta) if self.futility == "projected" and left > 0 else None
            final = self._final_lower(s) if self.final_alpha > 0 and left <= 0 else 0.0
            for r in self.radii:
                if r in self.decisions:
                    continue
                p0 = self.thresholds[r]
                if p0 >= 1.0:                      # Phi(r / sigma) rounds to 1: never certifiable
                    self.decisions[r] = NOT_CERTIFIED
                elif cs_log_evidence(s, f, p0) >= self._log_c or final > p0:
                    self.decisions[r], new = CERTIFIED, True
                elif cs_log_evidence(f, s, 1.0 - p0) >= self._log_cf:
                    self.decisions[r] = NOT_CERTIFIED
                elif cs_log_evidence(s + left, f, p0) < self._log_c and not self._final_reaches(s + left, p0):
                    self.decisions[r] = NOT_CERTIFIED
                elif up is not None and cs_log_evidence(s + up * left, f + (1.0 - up) * left, p0) < self._log_c \
                        and not self._final_reaches(s + up * left, p0):
                    self.decisions[r] = NOT_CERTIFIED
                else:
                    continue
                self.looks[r] = self.samples
            if new:
                self.p_lower = max(self.p_lower, cs_lower(s, f, self.alpha), final)
                # evidence is nonincreasing in the threshold: a certified radius certifies every
                # smaller one at this look (even one stopped earlier for futility)
                top = max(r for r, d in self.decisions.items() if d == CERTIFIED)
                for r in self.radii:
                    if r < top and self.decisions.get(r) != CERTIFIED:
                        self.decisions[r] = CERTIFIED
                        self.looks[r] = self.samples
            self.stopped = len(self.decisions) == len(self.radii) or left <= 0
        else:
            self.p_lower = max(self.p_lower, cs_lower(s, f, self.alpha))
            if self.final_alpha > 0 and left <= 0:
                self.p_lower = max(self.p_lower, self._final_lower(s))
            self.stopped = left <= 0 or self._cannot_grow(left)
        return self.stopped

    def _final_lower(self, successes: int) -> float:
        """The final test's bound: Clopper-Pearson at level ``final_alpha`` on exactly ``budget``
        samples (called only when the count has reached the budget)."""
        if self.samples != self.budget:
            from ...errors import InputError
            raise InputError(f"the final test needs exactly budget={self.budget} samples, got {self.samples}")
        return clopper_pearson_lower(successes, self.budget, self.final_alpha)

    def _final_reaches(self, successes: float, p0: float) -> bool:
        """Whether the final test could certify ``p0`` with ``successes`` (possibly fractional,
        a projection) out of the budget; False when the final test is off."""
        if self.final_alpha <= 0:
            return False
        from scipy.special import betainc
        k = min(float(successes), float(self.budget))
        if k <= 0:
            return False
        # CP_lower = Beta^-1(final_alpha; k, n - k + 1) > p0  <=>  I_p0(k, n - k + 1) < final_alpha
        # (the Beta CDF is continuous and increasing): one special-function evaluation
        return float(betainc(k, self.budget - k + 1, p0)) < self.final_alpha

    def _cannot_grow(self, left: int) -> bool:
        up = cs_upper(self.successes, self.failures, self.beta)
        proj = cs_lower(self.successes + up * left, self.failures + (1.0 - up) * left, self.alpha)
        if self.final_alpha > 0:
            from scipy.special import betaincinv
            k = self.successes + up * left
            if k > 0:
                proj = max(proj, float(betaincinv(k, self.budget - k + 1, self.final_alpha)))
        return self._radius(proj) - self._radius(self.p_lower) <= self.tolerance

    def _radius(self, p: float) -> float:
        from .statistics import radius_from
        return radius_from(p, self.sigma)

    def finish(self) -> None:
        """Mark undecided radii; the final lower bound."""
        for r in self.radii:
            self.decisions.setdefault(r, UNDECIDED)
        if self.samples:
            self.p_lower = max(self.p_lower, cs_lower(self.successes, self.failures, self.alpha))
        if self.final_alpha > 0 and self.samples == self.budget:
            self.p_lower = max(self.p_lower, self._final_lower(self.successes))

    @property
    def radius(self) -> float:
        """The certified radius ``sigma Phi^-1(L)`` (0 when ``L <= 1/2``); never below a certified
        requested radius."""
        done = [r for r, d in self.decisions.items() if d == CERTIFIED]
        return max([self._radius(self.p_lower)] + done)

    def decision_dict(self) -> Dict[str, str]:
        """The decisions keyed by :func:`radius_key`."""
        return {radius_key(r): d for r, d in self.decisions.items()}


__all__ = ["SequentialDecision", "CERTIFIED", "NOT_CERTIFIED", "UNDECIDED", "radius_key"]
