"""Randomized smoothing and SRS (robustdeq.certify.smoothing) against closed forms and scipy."""
import json
import math

import pytest
import torch
from scipy.stats import beta, binom, hypergeom, norm

from robustdeq.certify import smoothing as S
from robustdeq.certify.oracles import linear_deq
from robustdeq.deq import zoo
from robustdeq.errors import ConfigError, InputError


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    opts = {"hidden": 16, "norm": "spectral", "scale": 0.6, "in_shape": (1, 4, 4), "num_classes": 3}
    opts.update(kw)
    return zoo.build("mlp_deq", **opts)


def _inputs(n=3, seed=1, shape=(1, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + shape, generator=g)


# ------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("k,n,alpha", [(0, 10, 0.05), (1, 10, 0.05), (95, 100, 0.001), (100, 100, 0.001),
                                       (5000, 10000, 0.01), (9990, 10000, 0.0005)])
def test_clopper_pearson_matches_beta_quantiles_and_binomial_tail(k, n, alpha):
    lo = S.clopper_pearson_lower(k, n, alpha)
    if k == 0:
        assert lo == 0.0
    else:
        assert lo == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12)
        # the defining property: P(Binom(n, lo) >= k) = alpha
        assert binom.sf(k - 1, n, lo) == pytest.approx(alpha, rel=1e-6)
    up = S.clopper_pearson_upper(k, n, alpha)
    assert up == (1.0 if k == n else pytest.approx(beta.ppf(1 - alpha, k + 1, n - k), rel=1e-12))
    assert lo <= k / n <= up


def test_clopper_pearson_rejects_bad_counts():
    with pytest.raises(InputError):
        S.clopper_pearson_lower(11, 10, 0.05)
    with pytest.raises(ConfigError):
        S.clopper_pearson_lower(1, 10, 1.5)


@pytest.mark.parametrize("d,N,K,alpha", [(0, 400, 50, 0.0005), (3, 1000, 200, 0.01), (10, 60, 60, 0.05),
                                         (0, 100, 0, 0.05), (5, 50, 20, 0.001)])
def test_hypergeometric_upper_bound_is_the_largest_plausible_count(d, N, K, alpha):
    D = S.hypergeom_upper(d, N, K, alpha)
    assert d <= D <= N - (K - d)
    assert hypergeom.cdf(d, N, D, K) > alpha
    if D < N - (K - d):
        assert hypergeom.cdf(d, N, D + 1, K) <= alpha
    if K == N:
        assert D == d  # the whole population was checked


def test_srs_bound_never_exceeds_the_uncorrected_bound():
    for n in (100, 1000):
        for n_a in (0, n // 2, int(0.9 * n), n):
            for k in (1, 10, n // 4, n):
                for d in sorted({0, 1, k // 3}):
                    a = max(0, min(k - d, n_a - d)) if n_a >= d else 0
                    if d > n_a or a + d > n_a:
                        continue
                    p, d_up = S.srs_lower_bound(n_a, n, k, d, a, 0.001)
                    assert p <= S.clopper_pearson_lower(n_a, n, 0.001) + 1e-15
                    assert d_up >= d


def test_srs_bound_refuses_a_chain_that_disagrees_with_the_base_classifier():
    # the warm-started chain answers c_hat on every sample, the base classifier only on half of the
    # checked ones: the evidence is p_A ~ 1/2, so no radius; the reference code's rule
    # CP(rho n_A, rho n) would keep the point estimate 1 and certify a large radius
    n, k = 10000, 400
    p, d_up = S.srs_lower_bound(n, n, k, disagree=200, agree=200, alpha=0.001)
    assert p < 0.5 and S.radius_from(p, 0.25) == 0.0
    rho = S.clopper_pearson_lower(200, 400, 0.0005)
    assert beta.ppf(0.0005, rho * n, rho * n - rho * n + 1) > 0.99  # the unsound rule's answer


def test_srs_bound_with_every_position_checked_is_the_binomial_bound_on_the_base_counts():
    # K = n: the base classifier's count B is known exactly (agree + gained), so the corrected
    # bound is Clopper-Pearson at alpha_2 on min(B, n_A) (never above the warm-started count)
    n, alpha = 500, 0.01
    for n_a, disagree, agree, gained in [(480, 5, 475, 10), (500, 40, 460, 0), (300, 0, 300, 150),
                                         (470, 20, 450, 10)]:
        p, d_up = S.srs_lower_bound(n_a, n, n, disagree, agree, alpha, gained=gained)
        assert d_up == disagree
        k = min(agree + gained, n_a)
        assert p == pytest.approx(beta.ppf(alpha / 2, k, n - k + 1), rel=1e-12)
        assert p <= S.clopper_pearson_lower(n_a, n, alpha)
    with pytest.raises(InputError):
        S.srs_lower_bound(10, 20, 5, disagree=2, agree=2, alpha=0.01, gained=2)


@pytest.mark.parametrize("n_a,n", [(9990, 10000), (9800, 10000), (9000, 10000), (7000, 10000), (4000, 10000),
                                   (995, 1000)])
def test_adaptive_check_count_is_the_smallest_that_keeps_the_radius_within_the_slack(n_a, n):
    alpha, sigma, slack, k_min, k_max = 0.001, 0.5, 0.1, 100, n
    k = S.check_count(n_a, n, alpha, k_min, k_max, slack=slack)
    assert k_min <= k <= k_max
    r_unc = S.radius_from(S.clopper_pearson_lower(n_a, n, alpha / 2), sigma)

    def loss(kk):  # radius lost to the correction when the check finds no disagreement
        p, _ = S.srs_lower_bound(n_a, n, kk, 0, 0, alpha)       # (agree = 0: no clamp by n_a - agree)
        return r_unc - S.radius_from(p, sigma)
    if r_unc == 0:
        assert k == k_min
        return
    if k < k_max:
        assert loss(k) <= slack * sigma + 1e-12
    if k > k_min:
        assert loss(k - 1) > slack * sigma
    # larger warm-started counts need at least as many checks
    assert S.check_count(min(n_a + 50, n), n, alpha, k_min, k_max, slack=slack) >= k or r_unc == 0


@pytest.mark.parametrize("bias", ["always_c_hat", "symmetric_flips"])
def test_srs_bound_covers_the_base_probability_against_a_biased_chain(bias):
    # Monte Carlo over noise and check positions: base predictions I_i ~ Bernoulli(p_A) i.i.d.
    # (the base classifier's correctness on i.i.d. noise), warm-started predictions J_i an
    # adversarial function of the whole noise; the corrected p_lower (adaptive K, a function of
    # the warm-started count) may exceed p_A with probability at most alpha
    rng = torch.Generator().manual_seed(0)
    n, p_a, alpha, runs = 2000, 0.9, 0.05, 300
    failures = 0
    for _ in range(runs):
        I = torch.rand(n, generator=rng) < p_a
        if bias == "always_c_hat":
            J = torch.ones(n, dtype=torch.bool)
        else:  # 3 % flips each way, in a noise-dependent (here: clustered) pattern
            J = I.clone()
            J[:60] = ~J[:60]
            J[I.nonzero().flatten()[:30]] = False
        n_a = int(J.sum())
        k = S.check_count(n_a, n, alpha, 50, 1000, slack=0.1)
        pos = torch.randperm(n, generator=rng)[:k]
        d = int((J[pos] & ~I[pos]).sum())
        a = int((J[pos] & I[pos]).sum())
        g = int((~J[pos] & I[pos]).sum())
        p, _ = S.srs_lower_bound(n_a, n, k, d, a, alpha, gained=g)
        failures += p > p_a
    assert failures <= alpha * runs + 3 * math.sqrt(alpha * (1 - alpha) * runs), failures


# ------------------------------------------------------------------------------- oracles
def _affine(model, d):
    with torch.no_grad():
        eye = torch.eye(d, dtype=torch.float64).reshape(d, 1, 1, d)
        zero = torch.zeros(1, 1, 1, d, dtype=torch.float64)
        c = S.base_logits(model, zero)[0]
        M = S.base_logits(model, eye) - c
    return M.T, c  # logits = M x + c


def test_linear_classifier_matches_the_gaussian_cdf_closed_form():
    torch.manual_seed(3)
    d = 6
    A = 0.3 * torch.randn(5, 5, dtype=torch.float64) / math.sqrt(5)
    model = linear_deq(A, in_shape=(1, 1, d), num_classes=2, seed=4).double()
    M, c = _affine(model, d)
    w, b = M[1] - M[0], float(c[1] - c[0])
    sigma = 0.5
    x = torch.full((1, 1, 1, d), 0.5, dtype=torch.float64)
    # move x so that the exact radius is 1.2 sigma on the class-1 side
    t = float(w @ x.flatten() + b)
    x = x + ((1.2 * sigma * w.norm() - t) / w.norm() ** 2 * w).reshape(1, 1, 1, d)
    x = x.clamp(0, 1)
    margin = float(w @ x.flatten() + b)
    exact_radius = margin / float(w.norm())          # distance to the decision hyperplane
    p_a = norm.cdf(margin / (sigma * float(w.norm())))
    assert sigma * norm.ppf(p_a) == pytest.approx(exact_radius, rel=1e-9)
    n = 4000
    rep = S.certify(model, x, torch.tensor([1]), sigma=sigma, n0=100, n=n, alpha=0.001, batch_size=1000)
    r = rep.results[0]
    assert r.prediction == 1 and r.correct
    assert abs(r.count - n * p_a) < 5 * math.sqrt(n * p_a * (1 - p_a))   # Binomial(n, p_A)
    assert r.p_lower == pytest.approx(S.clopper_pearson_lower(r.count, n, 0.001), rel=1e-12)
    assert r.radius == pytest.approx(sigma * norm.ppf(r.p_lower), rel=1e-12)
    assert exact_radius - 0.15 < r.radius <= exact_radius
    assert int(S.predict(model, x, sigma=sigma, n=1000)[0]) == 1
    # far on the other side: class 0; on the hyperplane: abstain
    x_mid = x - (margin / w.norm() ** 2 * w).reshape(1, 1, 1, d)
    rep_mid = S.certify(model, x_mid, sigma=sigma, n0=50, n=500)
    assert rep_mid.results[0].abstained and rep_mid.results[0].radius == 0.0


def test_srs_with_enough_steps_equals_independent_smoothing_on_the_same_noise():
    model = _tiny(solver={"tol": 1e-9, "stop_mode": "abs", "max_iter": 100})
    x = _inputs(3)
    kw = dict(sigma=0.3, n0=40, n=300, batch_size=60, seed=5)
    plain = S.certify(model, x, **kw)
    for extra in ({}, {"srs_start": "clean"}, {"srs_start": "clean", "check_max": 300}):
        srs = S.certify(model, x, srs_steps=100, check_samples=50, **extra, **kw)
        for a, b in zip(plain.results, srs.results):
            assert a.selected == b.selected and a.count == b.count, extra
            assert b.srs["disagree"] == 0 and b.srs["gained"] == 0 and b.srs["warm_fraction"] == 1.0
            assert b.srs["radius_uncorrected"] == pytest.approx(a.radius, abs=0)
            assert b.radius <= a.radius
            assert 50 <= b.srs["checked"] <= extra.get("check_max", 50)


@pytest.mark.parametrize("extra", [{}, {"srs_start": "clean"}, {"check_max": 400}])
def test_srs_few_steps_is_cheaper_and_corrected_radius_is_never_larger(extra):
    model = _tiny(norm="none", scale=1.0, solver={"max_iter": 30})
    x = _inputs(4, seed=2)
    kw = dict(sigma=0.25, n0=40, n=400, batch_size=100, seed=1)
    plain = S.certify(model, x, **kw)
    srs = S.certify(model, x, srs_steps=1, check_samples=40, **extra, **kw)
    for r in srs.results:
        assert r.radius <= r.srs["radius_uncorrected"]
        assert r.p_lower <= r.srs["p_lower_uncorrected"]
    assert srs.summary["f_evals_per_noise_sample"] < plain.summary["f_evals_per_noise_sample"]
    assert srs.summary["cell_evals_per_noise_sample"] < plain.summary["cell_evals_per_noise_sample"]
    # the rows computed include frozen rows and the read-out: never fewer than the solver's steps
    assert plain.summary["cell_evals_per_noise_sample"] >= plain.summary["f_evals_per_noise_sample"]


def test_deterministic_under_a_seed_and_batch_independent():
    model = _tiny()
    x = _inputs(2)
    kw = dict(sigma=0.5, n0=20, n=100, batch_size=50, seed=7, srs_steps=2, check_samples=30)
    a = S.certify(model, x, **kw)
    b = S.certify(model, x, **kw)
    assert [(r.count, r.p_lower, r.srs["disagree"]) for r in a.results] == \
        [(r.count, r.p_lower, r.srs["disagree"]) for r in b.results]
    x2 = x.clone()
    x2[0] = 1 - x2[0]               # another first input: the second one's certificate is unchanged
    c = S.certify(model, x2, **kw)
    assert (c.results[1].count, c.results[1].p_lower) == (a.results[1].count, a.results[1].p_lower)


def test_certify_leaves_the_model_untouched():
    model = _tiny(norm="spectral")
    model.train()
    model.cell.eval()            # a mix of flags must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    S.certify(model, _inputs(2), sigma=0.25, n0=20, n=100, srs_steps=2, check_samples=20)
    S.predict(model, _inputs(2), sigma=0.25, n=50)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags


def test_config_errors_are_loud():
    model = _tiny()
    x = _inputs(1)
    with pytest.raises(ConfigError, match="unknown option"):
        S.certify(model, x, sigmaa=0.25)
    with pytest.raises(ConfigError, match="sigma"):
        S.certify(model, x, sigma=0.0)
    with pytest.raises(ConfigError, match="check_samples"):
        S.certify(model, x, n=50, srs_steps=2, check_samples=0)
    with pytest.raises(ConfigError, match="srs_start"):
        S.certify(model, x, n=50, srs_steps=2, check_samples=10, srs_start="previous")
    with pytest.raises(ConfigError, match="check_max"):
        S.certify(model, x, n=50, srs_steps=2, check_samples=10, check_max=5)
    with pytest.raises(ConfigError, match="check_max"):
        S.certify(model, x, n=50, srs_steps=2, check_samples=10, check_max=51)
    with pytest.raises(ConfigError, match="srs_steps"):
        S.predict(model, x, srs_steps=2)
    ff = zoo.build("ff_mlp", in_shape=(1, 4, 4), num_classes=3)
    with pytest.raises(ConfigError, match="SRS"):
        S.certify(ff, x, n=50, srs_steps=2, check_samples=10)
    with pytest.raises(ConfigError, match="clip=True"):   # the feed-forward model insists on [0, 1]
        S.certify(ff, x, n0=10, n=50)
    rep = S.certify(ff, x, n0=10, n=50, clip=True)
    assert rep.results[0].f_evals is None and rep.results[0].cell_evals is None
    with pytest.raises(InputError):
        S.certify(model, x, torch.tensor([0, 1]))


def test_report_round_trip_markdown_and_plot(tmp_path):
    model = _tiny()
    rep = S.certify(model, _inputs(2), torch.tensor([0, 1]), sigma=0.25, n0=20, n=100, srs_steps=2,
                    check_samples=30, radii=(0.0, 0.1))
    paths = rep.save(tmp_path)
    back = S.SmoothingReport.load(tmp_path)
    assert back.summary == json.loads(json.dumps(rep.summary))
    assert [r.radius for r in back.results] == [r.radius for r in rep.results]
    assert "smoothed classifier" in (tmp_path / "certificate.md").read_text()
    assert (tmp_path / "certified_accuracy.png").stat().st_size > 1000 and paths["plot"]
    assert set(rep.summary["certified_accuracy"]) == {"0", "0.1"}


# ------------------------------------------------------------------------------- Monte Carlo
def _smoothed_grad(model, x, c, sigma, m, gen):
    """Gradient of the Monte-Carlo soft smoothed probability of class c at x."""
    x = x.clone().requires_grad_(True)
    e = torch.randn((m,) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype)
    p = torch.softmax(S.base_logits(model, x + sigma * e), dim=1)[:, c].mean()
    g, = torch.autograd.grad(p, x)
    return g


@pytest.mark.parametrize("srs", [{}, {"srs_steps": 1, "check_samples": 100, "check_max": 1000},
                                 {"srs_steps": 2, "check_samples": 200, "srs_start": "clean"},
                                 {"mode": "radius"}, {"mode": "sequential", "radii": (0.05, 0.2, 0.5)}])
def test_no_certified_prediction_flips_at_099_of_its_radius(srs):
    # SRS certifies the same smoothed classifier g of the base model: the same oracle applies
    model = _tiny(norm="none", scale=1.0, init_gain=1.5, seed=11)
    x = _inputs(6, seed=12)
    sigma = 0.25
    rep = S.certify(model, x, sigma=sigma, n0=50, n=1000, batch_size=500, seed=2, **srs)
    certified = [r for r in rep.results if not r.abstained]
    assert certified, "the oracle needs certified inputs"
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for r in certified:
        x0 = x[r.index:r.index + 1]
        dirs = [-_smoothed_grad(model, x0, r.selected, sigma, 256, gen)]
        dirs += [torch.randn(x0.shape, generator=gen, dtype=x0.dtype) for _ in range(2)]
        for dvec in dirs:
            delta = 0.99 * r.radius * dvec / dvec.norm()
            xa = x0 + delta                            # smoothing certifies in R^d, not only [0, 1]
            with torch.no_grad():
                e = torch.randn((4000,) + tuple(x0.shape[1:]), generator=gen)
                pred = S.base_logits(model, xa + sigma * e).argmax(dim=1)
            counts = torch.bincount(pred, minlength=3)
            assert int(counts.argmax()) == r.selected, (r.index, r.radius, counts.tolist())
            checked += 1
    assert checked >= 3


# ------------------------------------------------------------------------------- CLI / training
def test_cli_trains_with_noise_and_certifies_with_smoothing(tmp_path, capsys):
    from robustdeq.cli import main
    out = tmp_path / "train"
    assert main(["train", "--defense", "gaussian-noise", "--defense-options", '{"sigma": 0.25}',
                 "--model-options", '{"hidden": 16}', "--epochs", "1", "--lr", "0.01",
                 "--out", str(out), "--no-progress"]) == 0
    cert = tmp_path / "cert"
    assert main(["certify", str(out / "checkpoint.pt"), "--smoothing", "0.25", "--n", "100", "--n0", "20",
                 "-n", "3", "--srs-steps", "2", "--out", str(cert), "--no-progress"]) == 0
    d = json.loads((cert / "certificate.json").read_text())
    assert d["config"]["sigma"] == 0.25 and d["config"]["srs_steps"] == 2 and len(d["results"]) == 3
    assert "abstain_rate" in d["summary"] and "time_per_image_s" in d["summary"]
    assert (cert / "certified_accuracy.png").is_file() and (cert / "certificate.md").is_file()
    assert "Randomized-smoothing certificate" in capsys.readouterr().out
    assert main(["certify", str(out / "checkpoint.pt"), "--smoothing", "-1", "-n", "1", "--no-progress"]) == 2
    cert2 = tmp_path / "cert2"
    assert main(["certify", str(out / "checkpoint.pt"), "--smoothing", "0.25", "--n", "100", "--n0", "20",
                 "-n", "2", "--srs-steps", "2", "--srs-start", "clean", "--check-samples", "20",
                 "--check-max", "100", "--out", str(cert2), "--no-progress"]) == 0
    d2 = json.loads((cert2 / "certificate.json").read_text())
    assert d2["config"]["srs_start"] == "clean" and d2["config"]["check_max"] == 100
    assert all(20 <= r["srs"]["checked"] <= 100 for r in d2["results"])
    cert3 = tmp_path / "cert3"
    assert main(["certify", str(out / "checkpoint.pt"), "--smoothing", "0.25", "--n", "2000", "--n0", "20",
                 "-n", "2", "--mode", "sequential", "--radii", "0.1,0.25,1.0", "--out", str(cert3),
                 "--no-progress"]) == 0
    d3 = json.loads((cert3 / "certificate.json").read_text())
    assert d3["config"]["mode"] == "sequential" and set(d3["summary"]["certified_accuracy"]) == {"0.1", "0.25", "1"}
    assert all(set(r["decisions"]) == {"0.1", "0.25", "1"} and r["n"] <= 2000 for r in d3["results"])
    # this small noise-trained cell is a certified contraction: warm starts proven per sample
    cert4 = tmp_path / "cert4"
    assert main(["certify", str(out / "checkpoint.pt"), "--smoothing", "0.25", "--n", "100", "--n0", "20",
                 "-n", "1", "--srs-steps", "3", "--srs-check", "proof", "--srs-start", "clean",
                 "--out", str(cert4), "--no-progress"]) == 0
    p = json.loads((cert4 / "certificate.json").read_text())["results"][0]["proof"]
    assert p["proven_warm"] + p["proven_cold"] + p["unproven"] == 120 and p["proven_warm"] > 0


def test_gaussian_noise_objective_options():
    from robustdeq.defenses.objectives import GaussianNoise, make_objective
    from robustdeq.defenses.recipes import recipe
    rec = recipe("gaussian-noise", sigma=0.5, seed=0)
    assert isinstance(rec.objective, GaussianNoise) and rec.objective.sigma == 0.5
    with pytest.raises(ConfigError):
        make_objective("gaussian_noise", sigma=0)
    with pytest.raises(ConfigError):
        make_objective("gaussian_noise", sigmaa=0.1)
    model = _tiny()
    x = _inputs(8)
    y = torch.zeros(8, dtype=torch.long)
    loss, scalars = rec.objective(model, x, y)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and "acc_noisy" in scalars
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    # oracle: CE(model(x + sigma e), y), e the seeded generator's N(0, I) draw; the unclipped noisy
    # input through the DEQ's own pieces (inject, solve, readout), the clipped one through model(.)
    for clip in (False, True):
        obj = make_objective("gaussian_noise", sigma=0.5, clip=clip, seed=3)
        loss, scalars = obj(model, x, y)
        xn = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            if clip:
                logits = model(xn.clamp(0, 1))
            else:
                logits = model.readout(model.solve(model.inject(xn)).z)
        ref = torch.nn.functional.cross_entropy(logits, y)
        # (rel 1e-3: the two solves stop at different points within the solver tolerance)
        assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-3), clip
        assert scalars["acc_noisy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
        with torch.no_grad():   # the noise matters: the clean loss is another number
            clean = torch.nn.functional.cross_entropy(model(x), y)
        assert abs(float(clean) - float(ref)) > 1e-3
