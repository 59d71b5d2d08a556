"""Anytime-valid sequential smoothing, radius mode and proven warm starts against closed forms,
simulated Bernoulli streams and from-scratch solves."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import betaincinv
from scipy.stats import norm

from robustdeq.certify import smoothing as S
from robustdeq.certify.oracles import linear_deq
from robustdeq.certify.smoothing.proof import EquilibriumClassProof
from robustdeq.certify.smoothing.sequential import SequentialDecision
from robustdeq.certify.smoothing.statistics import cs_log_evidence, cs_lower, cs_upper
from robustdeq.deq import zoo
from robustdeq.errors import ConfigError


# ------------------------------------------------------------------------------- the sequence
@pytest.mark.parametrize("s,f,p0", [(10, 2, 0.6), (300, 0, 0.977), (950, 50, 0.9), (0, 5, 0.3), (40, 60, 0.5)])
def test_evidence_is_the_uniform_mixture_of_likelihood_ratios(s, f, p0):
    mixture = quad(lambda q: (q / p0) ** s * ((1 - q) / (1 - p0)) ** f, p0, 1, epsabs=0, limit=200)[0] / (1 - p0)
    assert math.exp(cs_log_evidence(s, f, p0)) == pytest.approx(mixture, rel=1e-8)


def test_evidence_decreases_in_the_threshold_and_bounds_bracket_the_frequency():
    grid = np.linspace(0.01, 0.99, 99)
    for s, f in [(5, 5), (90, 10), (1000, 3), (0, 20)]:
        ev = cs_log_evidence(s, f, grid)
        assert np.all(np.diff(ev) <= 1e-12)
        lo, up = cs_lower(s, f, 0.01), cs_upper(s, f, 0.01)
        assert lo <= s / (s + f) <= up
        if lo > 0:   # the bound is a rejected threshold, and just above it nothing is rejected
            assert cs_log_evidence(s, f, lo) >= math.log(100) > cs_log_evidence(s, f, min(lo + 1e-6, 0.999999))
    # all successes: closed form (1 - p^(t+1)) / ((t + 1)(1 - p) p^t)
    t, p = 400, 0.97
    assert math.exp(cs_log_evidence(t, 0, p)) == pytest.approx((1 - p ** (t + 1)) / ((t + 1) * (1 - p) * p ** t),
                                                                rel=1e-9)


def test_scalar_bounds_are_rejected_thresholds_within_tolerance_of_the_bisection():
    """The scalar root search of cs_lower / cs_upper against the vectorised 64-step bisection
    (an independent computation of the same supremum): never above it by more than rounding,
    never more than ROOT_TOL below, and always a threshold the evidence rejects."""
    from robustdeq.certify.smoothing.statistics import ROOT_TOL
    rng = np.random.default_rng(5)
    n = (10 ** rng.uniform(0, 5.2, 150)).astype(int)
    s = rng.binomial(n, rng.uniform(0, 1, 150))
    cases = [(0, 0), (0, 7), (1, 0), (3, 0), (100000, 0), (99990, 10), (2, 99998), (12.5, 3.25)] + \
        list(zip(s.tolist(), (n - s).tolist()))
    ss = np.array([c[0] for c in cases], dtype=float)
    ff = np.array([c[1] for c in cases], dtype=float)
    for alpha in (0.001, 0.01, 0.3):
        ref_lo, ref_up = cs_lower(ss, ff, alpha), cs_upper(ss, ff, alpha)
        for (a, b), rl, ru in zip(cases, ref_lo, ref_up):
            lo, up = cs_lower(a, b, alpha), cs_upper(a, b, alpha)
            assert isinstance(lo, float) and rl - ROOT_TOL - 1e-15 <= lo <= rl + 1e-14
            assert ru - 1e-14 <= up <= ru + ROOT_TOL + 1e-15
            if lo > 0:   # rejected (the array formula agrees up to the rounding of large counts)
                assert cs_log_evidence(a, b, lo) >= math.log(1 / alpha)
                assert cs_log_evidence(np.array([a]), np.array([b]), lo)[0] >= math.log(1 / alpha) - 1e-9
            assert up == 1.0 - cs_lower(b, a, alpha)
    # the scalar evidence is the array formula
    for a, b, p0 in [(10, 2, 0.6), (0, 5, 0.3), (99990, 10, 0.9772), (5e5, 1, 0.999)]:
        assert cs_log_evidence(a, b, p0) == pytest.approx(float(cs_log_evidence(np.array([a]), np.array([b]), p0)[0]),
                                                          rel=1e-12, abs=1e-12)
    with pytest.raises(Exception, match="p0"):
        cs_log_evidence(3, 1, 1.0)
    with pytest.raises(Exception, match="successes"):
        cs_lower(-1, 3, 0.01)


def test_final_test_reach_is_the_clopper_pearson_comparison():
    """The futility rule's question 'could the final test certify p0 with k successes of n' is
    answered with the Beta CDF; the oracle is the Clopper-Pearson bound itself (Beta quantile)."""
    from scipy.stats import beta
    d = SequentialDecision(0.5, (0.25,), 0.001, 0.01, budget=10000, final_alpha_fraction=0.25)
    rng = np.random.default_rng(2)
    for k, p0 in zip(rng.uniform(0, 10500, 400), rng.uniform(0.5, 0.9999, 400)):
        kk = min(k, 10000.0)
        want = kk > 0 and beta.ppf(0.00025, kk, 10000 - kk + 1) > p0
        assert d._final_reaches(k, p0) == want


def _streams(p, n_streams, looks, seed):
    """Successes at each look of ``n_streams`` i.i.d. Bernoulli(p) streams (exactly: binomial
    increments between the looks)."""
    rng = np.random.default_rng(seed)
    steps = np.diff(np.concatenate([[0], looks]))
    return np.cumsum(rng.binomial(steps[None, :], p, size=(n_streams, len(looks))), axis=1)


def test_lower_sequence_covers_under_optional_stopping_at_most_alpha():
    """10,000 Bernoulli streams, 12 looks each: a failure is a look at which the test rejects the
    true mean (the worst stopping rule stops right there). Rate <= alpha; repeated Clopper-Pearson
    at the same looks, invalid under optional stopping, fails far more often."""
    alpha, p, n_streams = 0.05, 0.9, 10000
    looks = np.unique(np.geomspace(10, 3000, 12).astype(int))
    succ = _streams(p, n_streams, looks, seed=0)
    fail = looks[None, :] - succ
    rejected = cs_log_evidence(succ, fail, p) >= math.log(1 / alpha)
    rate = rejected.any(axis=1).mean()
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_streams)
    # the oracle can fail: per-look Clopper-Pearson lower bounds exceed p much more often than alpha
    few = slice(0, 2000)
    cp = np.where(succ[few] > 0, betaincinv(np.maximum(succ[few], 1), fail[few] + 1, alpha), 0.0)
    assert (cp > p).any(axis=1).mean() > 2 * alpha
    # and the sequence is not vacuous: at a higher true mean it rejects the lower threshold
    hi = _streams(0.97, 200, np.array([3000]), 1)[:, -1]
    assert (cs_log_evidence(hi, 3000 - hi, p) >= math.log(1 / alpha)).mean() > 0.9


def test_sequential_decision_stops_when_every_radius_is_decided():
    sigma, alpha = 0.25, 0.001
    d = SequentialDecision(sigma, (0.25, 0.5, 1.0), alpha, 0.01, budget=100000)
    while not d.stopped:
        d.update(100, 0)
    d.finish()
    # 1.0 is out of reach of 100,000 samples at sigma 0.25 (all successes): decided at once
    assert d.looks[1.0] == 100 and d.decisions[1.0] == "not certified"
    assert d.decisions[0.25] == d.decisions[0.5] == "certified"
    # the first look where the all-success evidence at Phi(0.5 / sigma) reaches 1 / alpha
    p0 = norm.cdf(0.5 / sigma)
    first = next(t for t in range(100, 100000, 100) if cs_log_evidence(t, 0, p0) >= math.log(1 / alpha))
    assert d.looks[0.5] == first and d.samples == first
    assert d.radius >= 0.5
    # a coin at 0.6: nothing above 0 certifiable, futility stops long before the budget
    rng = np.random.default_rng(3)
    d = SequentialDecision(sigma, (0.25, 0.5), alpha, 0.01, budget=100000)
    while not d.stopped:
        k = int((rng.random(100) < 0.6).sum())
        d.update(k, 100 - k)
    d.finish()
    assert set(d.decisions.values()) == {"not certified"} and d.samples < 2000


def _run(p, radii, futility, seed, sigma=0.5, budget=100000):
    rng = np.random.default_rng(seed)
    d = SequentialDecision(sigma, radii, 0.001, 0.01, budget=budget, futility=futility)
    while not d.stopped:
        b = min(400, budget - d.samples)
        k = int((rng.random(b) < p).sum())
        d.update(k, b - k)
    d.finish()
    return d


def test_projected_futility_gives_up_borderline_radii_early_and_only_withholds():
    # p_A just below Phi(2) = 0.9772 (radius 1.0 at sigma 0.5): the sequence rule spends many
    # samples; the projected rule stops much sooner with the same (negative) decision
    p = 0.975
    for seed in range(3):
        seq, proj = _run(p, (1.0,), "sequence", seed), _run(p, (1.0,), "projected", seed)
        assert seq.decisions[1.0] == proj.decisions[1.0] == "not certified"
        assert proj.samples < seq.samples / 2
    # clearly certifiable radii: the same certificates, at the same look (the certify test runs first)
    for seed in range(3):
        seq, proj = _run(0.995, (0.25, 1.0), "sequence", seed), _run(0.995, (0.25, 1.0), "projected", seed)
        assert seq.decisions == proj.decisions and seq.looks == proj.looks
        assert set(proj.decisions.values()) == {"certified"}
    # the rule only withholds: over many streams at a mean below the threshold it never certifies,
    # and wherever it certifies, the sequence rule on the same stream certifies too
    for seed in range(20):
        for p in (0.975, 0.985):
            seq, proj = _run(p, (1.0,), "sequence", seed, budget=20000), _run(p, (1.0,), "projected", seed, budget=20000)
            assert not (proj.decisions[1.0] == "certified" and seq.decisions[1.0] != "certified")
            if p < norm.cdf(2.0):
                assert proj.decisions[1.0] != "certified"
    with pytest.raises(ConfigError, match="futility"):
        S.make_config(mode="radius", futility="projected")
    # left unset, the rule follows the mode (projected where it applies), and a config changes mode freely
    seq = S.make_config(mode="sequential")
    assert (seq.futility, seq.futility_rule) == (None, "projected")
    assert seq.replace(mode="radius").futility_rule == "sequence"
    assert S.make_config(mode="sequential", futility="sequence").futility_rule == "sequence"
    with pytest.raises(ConfigError, match="futility"):
        S.make_config(mode="sequential", futility="hopeful")


# ------------------------------------------------------------------------------- linear oracle
def _linear_at(radius_over_sigma, sigma, d=6, seed=3):
    """A two-class linear DEQ and an input whose smoothed class-1 probability is
    Phi(radius_over_sigma): the exact certified radius is radius_over_sigma * sigma."""
    torch.manual_seed(seed)
    A = 0.3 * torch.randn(5, 5, dtype=torch.float64) / math.sqrt(5)
    model = linear_deq(A, in_shape=(1, 1, d), num_classes=2, seed=4).double()
    with torch.no_grad():
        eye = torch.eye(d, dtype=torch.float64).reshape(d, 1, 1, d)
        zero = torch.zeros(1, 1, 1, d, dtype=torch.float64)
        c = S.base_logits(model, zero)[0]
        M = (S.base_logits(model, eye) - c).T
    w, b = M[1] - M[0], float(c[1] - c[0])
    x = torch.full((1, 1, 1, d), 0.5, dtype=torch.float64)
    t = float(w @ x.flatten() + b)
    x = x + ((radius_over_sigma * sigma * w.norm() - t) / w.norm() ** 2 * w).reshape(1, 1, 1, d)
    margin = float(w @ x.flatten() + b)
    return model, x, margin / float(w.norm())


@pytest.mark.parametrize("warm", [{}, {"srs_steps": 3, "srs_check": "proof", "srs_start": "clean"}])
def test_sequential_decisions_on_a_linear_classifier_match_the_closed_form(warm):
    sigma = 0.25
    model, x, exact = _linear_at(1.6, sigma)          # p_A = Phi(1.6): exact radius 0.4
    assert exact == pytest.approx(0.4, rel=1e-9)
    radii = (0.1, 0.2, 0.6)                             # thresholds Phi(0.4), Phi(0.8) < p_A < Phi(2.4)
    rep = S.certify(model, x, torch.tensor([1]), sigma=sigma, n0=50, n=20000, mode="sequential",
                    radii=radii, batch_size=500, **warm)
    r = rep.results[0]
    assert r.decisions == {"0.1": "certified", "0.2": "certified", "0.6": "not certified"}
    assert r.prediction == 1 and r.correct and 0.2 <= r.radius <= exact
    assert r.n < 20000 and r.samples == 50 + r.n
    assert rep.summary["certified_accuracy"] == {"0.1": 1.0, "0.2": 1.0, "0.6": 0.0}
    assert rep.summary["samples_per_image"] == r.samples
    # the count is binomial with the closed-form mean
    p_a = norm.cdf(1.6)
    assert abs(r.count - r.n * p_a) < 5 * math.sqrt(r.n * p_a * (1 - p_a))
    if warm:
        assert r.proof["proven_warm"] > 0 and r.proof["unproven"] == 0


def test_radius_mode_on_a_linear_classifier_stays_below_the_exact_radius_and_stops_early():
    sigma = 0.25
    model, x, exact = _linear_at(1.6, sigma)
    rep = S.certify(model, x, sigma=sigma, n0=50, n=50000, mode="radius", tolerance=0.02, batch_size=2000)
    r = rep.results[0]
    assert r.prediction == 1 and exact - 0.06 < r.radius <= exact
    assert r.p_lower == pytest.approx(cs_lower(r.count, r.n, 0.001), abs=0) or r.p_lower >= cs_lower(r.count, r.n, 0.001)
    assert r.n < 50000                                   # stopped before the budget
    # on the decision hyperplane (p_A = 1/2): abstain quickly
    model, x, _ = _linear_at(0.0, sigma)
    r = S.certify(model, x, sigma=sigma, n0=50, n=50000, mode="radius", batch_size=2000).results[0]
    assert r.abstained and r.radius == 0.0 and r.n <= 4000


# ------------------------------------------------------------------------------- proven warm starts
def _contractive(seed=0, **kw):
    torch.manual_seed(seed)
    opts = {"hidden": 16, "norm": "spectral", "scale": 0.6, "in_shape": (1, 4, 4), "num_classes": 3,
            "init_gain": 1.5}
    opts.update(kw)
    return zoo.build("mlp_deq", **opts).eval()


def _noisy_copies(seed, n):
    """A contractive DEQ, its proof, a generator, one input, ``n`` noisy copies of it and a
    solver config that solves them to 1e-12 (the cold-solve oracle)."""
    model = _contractive()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, 4, 4, generator=gen)
    xn = x + 0.4 * torch.randn((n, 1, 4, 4), generator=gen)
    tight = model.solver_config.replace(tol=1e-12, stop_mode="abs", max_iter=300)
    return model, EquilibriumClassProof(model), gen, x, xn, tight


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_proven_classes_are_the_classes_of_cold_solves():
    model, proof, gen, x, xn, tight = _noisy_copies(0, 600)
    with torch.no_grad():
        cold = model.run(xn, in_range=False, solver=tight)
        anchor = model.run(x).z_star.expand(600, -1).contiguous()
        for steps in (1, 2, 3, 30):
            eq = model.run(xn, in_range=False, z0=anchor, solver=model.solver_config.replace(max_iter=steps))
            cls, ok = proof.classes(xn, eq.z_star)
            assert bool((cls[ok] == cold.logits.argmax(1)[ok]).all()), steps
        assert ok.float().mean() > 0.95                       # a converged solve is proven
        # states far from the equilibrium: whatever is proven still has the cold class, and
        # some far states' classes differ from it (the check has something to catch)
        far = anchor + 2.0 * torch.randn(anchor.shape, generator=gen)
        cls, ok = proof.classes(xn, far)
        assert bool((cls[ok] == cold.logits.argmax(1)[ok]).all())
        assert bool((cls != cold.logits.argmax(1)).any()) and not bool(ok.all())


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_iteration_with_a_proof_after_every_step_proves_only_cold_classes():
    model, proof, gen, x, xn, tight = _noisy_copies(1, 500)
    with torch.no_grad():
        cold = model.run(xn, in_range=False, solver=tight).logits.argmax(1)
        anchor = model.run(x).z_star.expand(500, -1).contiguous()
        far = anchor + 2.0 * torch.randn(anchor.shape, generator=gen)
        for start in (anchor, far, torch.zeros_like(anchor)):
            for k in (1, 2, 4, 60):
                cls, ok, steps, z = proof.iterate(xn, start, k)
                assert bool((cls[ok] == cold[ok]).all()), k
                assert int(steps.max()) <= k and bool((steps >= 1).all())
                # a row stops at its first proof: the classes checked one step earlier were not proven
                if k > 1:
                    _, ok_before, steps_before, _ = proof.iterate(xn, start, k - 1)
                    assert bool((steps[ok_before] == steps_before[ok_before]).all())
            assert ok.float().mean() > 0.99                   # 60 contraction steps prove (almost) all
        # from a far start some first reads differ from the cold class: the proof has work to do
        cls1, ok1, _, _ = proof.iterate(xn, far, 1)
        assert bool((cls1 != cold).any()) and not bool(ok1.all())


def test_proven_warm_starts_count_the_same_classes_as_cold_solves_in_certify():
    model = _contractive(solver={"tol": 1e-8, "stop_mode": "abs", "max_iter": 100})
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    kw = dict(sigma=0.3, n0=40, n=200, batch_size=100, seed=2)
    cold = S.certify(model, x, **kw)
    for start in ("clean", "chain"):
        warm = S.certify(model, x, srs_steps=2, srs_check="proof", srs_start=start, **kw)
        for a, b in zip(cold.results, warm.results):
            # every counted sample is the cold class: counts can only drop by the unproven rows
            assert b.selected == a.selected or b.proof["unproven"] > 0
            assert a.count - b.proof["unproven"] <= b.count <= a.count
            assert b.proof["proven_warm"] + b.proof["proven_cold"] + b.proof["unproven"] == 240
            assert b.srs is None and b.p_lower == S.clopper_pearson_lower(b.count, 200, 0.001)
        assert sum(r.proof["proven_warm"] for r in warm.results) > 0


def test_proof_needs_a_contraction_and_auto_falls_back_to_the_sampled_check():
    model = _contractive(norm="none", scale=1.0, init_gain=3.0)
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(ConfigError, match="contractive"):
        S.certify(model, x, n=50, srs_steps=2, srs_check="proof")
    rep = S.certify(model, x, n0=10, n=50, srs_steps=2, srs_check="auto", check_samples=10)
    assert rep.results[0].srs["checked"] == 10 and rep.results[0].proof is None
    with pytest.raises(ConfigError, match="srs_check"):
        S.certify(model, x, n=50, srs_steps=2, mode="sequential")
    with pytest.raises(ConfigError, match="mode"):
        S.certify(model, x, n=50, mode="adaptive")
    with pytest.raises(ConfigError, match="futility_alpha"):
        S.certify(model, x, n=50, mode="sequential", futility_alpha=1.0)


def test_selection_solved_with_the_first_estimation_batch_counts_as_separate_solves():
    """Sequential mode solves the last selection batch together with the first estimation batch.
    Oracle: the procedure re-run by hand from the same per-input noise stream with every batch
    solved on its own (selection, then estimation batches doubling from first_batch), decided by
    SequentialDecision: the same class, counts, samples and decisions; and the model saw one
    merged batch of n0 + first_batch rows per input."""
    from robustdeq.certify.smoothing.engine import _derive_seed
    model = _contractive(seed=2, scale=0.8, init_gain=3.0)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = []
    try:
        orig = model.run

        def run(xb, **kw):
            seen.append(xb.shape[0])
            return orig(xb, **kw)
        model.run = run
        # futility left at its default: the sequential mode's default rule is "projected"
        cfg = dict(sigma=0.5, n0=30, n=3000, alpha=0.001, batch_size=200, first_batch=50, radii=(0.1, 0.3),
                   mode="sequential", seed=4)
        rep = S.certify(model, x, **cfg)
    finally:
        del model.run
    assert seen.count(80) == 3                       # n0 + first_batch, once per input
    with torch.no_grad():
        for i, r in enumerate(rep.results):
            gen = torch.Generator().manual_seed(_derive_seed(4, "noise", i))

            def draw(b):
                e = torch.randn((b, 1, 4, 4), generator=gen)
                return S.base_logits(model, x[i:i + 1] + 0.5 * e).argmax(1)
            c_hat = int(torch.bincount(draw(30), minlength=3).argmax())
            d = SequentialDecision(0.5, (0.1, 0.3), 0.001, 0.01, budget=3000, futility="projected",
                                   final_alpha_fraction=0.25)
            size = 50
            while not d.stopped:
                b = min(size, 3000 - d.samples)
                k = int((draw(b) == c_hat).sum())
                d.update(k, b - k)
                size = min(2 * size, 200)
            d.finish()
            assert (r.selected, r.count, r.n) == (c_hat, d.successes, d.samples)
            assert r.decisions == d.decision_dict()
    assert len({r.n for r in rep.results}) > 1      # inputs stopped at different looks


def test_sequential_report_round_trip(tmp_path):
    model = _contractive()
    rep = S.certify(model, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), sigma=0.25, n0=20, n=300,
                    mode="sequential", radii=(0.1, 0.2), srs_steps=2, srs_check="proof")
    rep.save(tmp_path, plot=False)
    back = S.SmoothingReport.load(tmp_path)
    assert [r.decisions for r in back.results] == [r.decisions for r in rep.results]
    assert [r.proof for r in back.results] == [r.proof for r in rep.results]
    assert back.certified_accuracy(0.1) == rep.certified_accuracy(0.1)
    md = (tmp_path / "certificate.md").read_text()
    assert "sequential" in md and "samples / image" in md
    assert back.config["futility"] == "projected" and "(rule: projected)" in md   # the rule in force
    # the inputs' decisions are listed by radius, whatever order they were decided in
    back.results[0].decisions = {"0.2": "certified", "0.1": "not certified"}
    assert "| 0.1: not certified, 0.2: certified |" in back.to_markdown()


def test_rows_the_models_loose_solver_cannot_prove_are_solved_on_and_count_as_the_exact_class():
    loose = _contractive(solver={"max_iter": 2, "tol": 0.5})
    exact = _contractive(solver={"tol": 1e-10, "stop_mode": "abs", "max_iter": 200})   # same weights
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    kw = dict(sigma=0.3, n0=20, n=100, batch_size=60, seed=4)
    warm = S.certify(loose, x, srs_steps=1, srs_check="proof", srs_start="clean", **kw).results[0]
    cold = S.certify(exact, x, **kw).results[0]
    assert warm.proof["tightened"] > 0 and warm.proof["unproven"] == 0
    assert (warm.selected, warm.count) == (cold.selected, cold.count)


# ------------------------------------------------------------- the final fixed-n test at the budget
def _final_rule(succ, looks, p0, alpha, phi, budget):
    """Vectorised over streams: the decision "certified at threshold p0" of the sequential test at
    level (1 - phi) alpha at every look, plus Clopper-Pearson at level phi alpha on exactly
    ``budget`` samples for streams not yet certified when they reach it; returns (certified,
    samples used). The streams stop at the first look that certifies (optional stopping)."""
    fail = looks[None, :] - succ
    seq = cs_log_evidence(succ, fail, p0) >= math.log(1 / ((1 - phi) * alpha))
    seq_any = seq.any(axis=1)
    k = succ[:, -1]
    cp = np.where(k > 0, betaincinv(np.maximum(k, 1), budget - k + 1, phi * alpha), 0.0) if phi > 0 else 0 * k
    cert = seq_any | (cp > p0)
    used = np.where(seq_any, looks[np.argmax(seq, axis=1)], budget)
    return cert, used


def test_final_fixed_n_test_keeps_the_false_certification_rate_at_most_alpha():
    """10,000 Bernoulli streams with p_A exactly at the threshold (the worst case for a one-sided
    test: any certificate is false) and with optional stopping at every look: the union of the
    sequence at (1 - phi) alpha and Clopper-Pearson at phi alpha on the fixed budget errs at most
    alpha. The oracle can fail: Clopper-Pearson at level alpha at each stream's stopping time
    (a data-dependent sample size) errs more often."""
    alpha, p0, budget, n_streams = 0.05, 0.9, 2000, 10000
    looks = np.unique(np.concatenate([np.geomspace(20, budget, 10).astype(int), [budget]]))
    succ = _streams(p0, n_streams, looks, seed=11)
    for phi in (0.25, 0.5, 0.75):
        cert, _ = _final_rule(succ, looks, p0, alpha, phi, budget)
        assert cert.mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_streams), phi
    # invalid construction: CP at level alpha at whichever look the data make best
    fail = looks[None, :] - succ
    cp_any = (np.where(succ > 0, betaincinv(np.maximum(succ, 1), fail + 1, alpha), 0.0) > p0).any(axis=1)
    assert cp_any.mean() > 1.5 * alpha
    # SequentialDecision makes the oracle's decisions on streams it can certify (futility rules off:
    # levels so small they never fire), one radius at threshold p0, looks as above
    r = float(norm.ppf(p0))
    hi = _streams(0.915, 100, looks, seed=12)
    want, _ = _final_rule(hi, looks, p0, alpha, 0.5, budget)
    got = []
    for row in hi:
        d = SequentialDecision(1.0, (r,), alpha, 1e-12, budget=budget, final_alpha_fraction=0.5)
        prev_t = prev_s = 0
        for t, s in zip(looks, row):
            if d.stopped:
                break
            d.update(int(s - prev_s), int((t - prev_t) - (s - prev_s)))
            prev_t, prev_s = t, s
        d.finish()
        got.append(d.decisions[r] == "certified")
    assert np.array_equal(np.array(got), want) and 0.1 < want.mean() < 0.95


def test_final_test_certifies_borderline_inputs_the_sequence_misses_and_never_below_threshold():
    """p_A just above Phi(2) (radius 1.0 at sigma 0.5), budget 10,000: with the final test more
    streams are certified than with the sequence alone, and every certificate is at a p_A above the
    threshold; at p_A below it nothing is certified. The final decision agrees with Clopper-Pearson
    at phi alpha on the budget (scipy) whenever the stream reached it."""
    from robustdeq.certify.smoothing.statistics import clopper_pearson_lower
    p0 = norm.cdf(2.0)
    wins = {0.0: 0, 0.5: 0}
    for seed in range(8):
        for phi in wins:
            rng = np.random.default_rng(seed)
            d = SequentialDecision(0.5, (1.0,), 0.001, 0.01, 10000, futility="projected", final_alpha_fraction=phi)
            while not d.stopped:
                b = min(400, 10000 - d.samples)
                k = int((rng.random(b) < 0.983).sum())
                d.update(k, b - k)
            d.finish()
            wins[phi] += d.decisions[1.0] == "certified"
            if phi and d.samples == 10000:
                cp = clopper_pearson_lower(d.successes, 10000, 0.0005)
                seq_only = cs_log_evidence(d.successes, d.failures, p0) >= math.log(1 / 0.0005)
                assert (d.decisions[1.0] == "certified") == (cp > p0 or seq_only)
                assert d.p_lower >= cp
    assert wins[0.5] > wins[0.0]
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        d = SequentialDecision(0.5, (1.0,), 0.001, 0.01, 10000, final_alpha_fraction=0.5)
        while not d.stopped:
            b = min(400, 10000 - d.samples)
            k = int((rng.random(b) < 0.975).sum())
            d.update(k, b - k)
        d.finish()
        assert d.decisions[1.0] != "certified"


def test_final_alpha_fraction_is_checked():
    with pytest.raises(ConfigError, match="final_alpha_fraction"):
        S.make_config(mode="sequential", final_alpha_fraction=1.0)
    with pytest.raises(ConfigError, match="final_alpha_fraction"):
        S.make_config(mode="sequential", final_alpha_fraction=-0.1)
    with pytest.raises(ConfigError, match="final_alpha_fraction"):
        SequentialDecision(0.5, (0.5,), 0.001, 0.01, 1000, final_alpha_fraction=1.5)
    with pytest.raises(ConfigError, match="final_alpha"):
        S.make_config(mode="sequential", final_alpha=0.5)     # unknown option: refused by name


@pytest.mark.parametrize("mode", ["sequential", "radius"])
def test_auto_without_a_proof_is_refused_in_the_sequential_modes(mode):
    """srs_check="auto" on a model without a contraction certificate fell back to no correction
    at all in the sequential modes: the warm-started counts (here started from the clean input's
    fixed point with one step, so nearly every sample read the clean class) were counted as draws
    of the base classifier and certified radii far beyond the exact one."""
    model = _contractive(norm="none", scale=1.0, init_gain=3.0)
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(ConfigError, match="admits none"):
        S.certify(model, x, n=50, srs_steps=1, srs_check="auto", srs_start="clean", check_samples=10,
                  mode=mode)
