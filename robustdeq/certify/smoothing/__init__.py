"""Randomized-smoothing certificates for any robustdeq model, and Serialized Randomized Smoothing.

Gaussian smoothing (Cohen, Rosenfeld, Kolter, "Certified Adversarial Robustness via Randomized
Smoothing", ICML 2019): for a base classifier ``f`` (here ``argmax`` of the model's logits) the
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
start cold and get the full solve (:func:`robustdeq.deq.warm.warm_start_rows`).

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

Sequential modes (:mod:`.sequential`): ``mode="sequential"`` decides "certified at r" for each
requested radius with an anytime-valid confidence sequence (a one-sided beta-binomial mixture,
:func:`cs_log_evidence`), stopping per input as soon as every radius is decided or the budget
``n`` is spent; ``mode="radius"`` reports the largest radius, stopping when it cannot grow by more
than ``tolerance``. alpha bounds the failure probability of the whole procedure, over all looks
and radii. Proven warm starts (:mod:`.proof`, ``srs_check="proof"``): where the cell has a
contraction certificate and the read-out is affine, each sample iterates ``z <- f(z)`` from its
warm start with the proof checked after every step until its class is proven to be the exact
equilibrium's (a near tie that cannot be proven counts for no class), so the counts are binomial
and need no correction.
"""
from .config import ABSTAIN, SmoothingConfig, make_config
from .engine import base_logits, certify, predict
from .report import SmoothingReport, SmoothingResult, summarize
from .proof import EquilibriumClassProof, proof_support
from .sequential import SequentialDecision
from .statistics import (check_count, clopper_pearson_lower, clopper_pearson_upper, cs_log_evidence, cs_lower,
                         cs_upper, hypergeom_upper, radius_from, srs_lower_bound)

__all__ = [
    "ABSTAIN", "SmoothingConfig", "SmoothingResult", "SmoothingReport", "make_config", "certify", "predict",
    "clopper_pearson_lower",
    "clopper_pearson_upper", "hypergeom_upper", "srs_lower_bound", "check_count", "radius_from", "base_logits",
    "summarize", "cs_log_evidence", "cs_lower", "cs_upper", "SequentialDecision", "EquilibriumClassProof",
    "proof_support",
]
