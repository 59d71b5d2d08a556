"""The native Square attack: the same examples as pyautoattack's SquareAttack on a plain model
(same seed and budget), gradient masking does not blind it, warm-started DEQ queries decide as
cold ones with fewer solver iterations, and the attack contract (ball, [0, 1], model untouched,
seed)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers.attacks import check_ball
from robustdeq.attacks import PGD, Square, build
import robustdeq.attacks.square as square_mod
from robustdeq.attacks.square import p_selection
from robustdeq.deq.model import DEQClassifier
from robustdeq.deq.warm import plain_deq_classifier
from robustdeq.errors import ConfigError


class Quantised(nn.Module):
    """``net(round(levels * x) / levels)``: a step function of the input, so every input
    gradient is zero (gradient masking by construction), while the decision boundary stays
    within a small perturbation of most inputs."""

    def __init__(self, net: nn.Module, levels: int = 4):
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x):
        return self.net(torch.round(x * self.levels) / self.levels)


def _pyautoattack_square(model, x, y, **kw):
    from pyautoattack.square import SquareAttack
    ref = SquareAttack(model, p_init=0.8, **kw)
    with torch.no_grad():
        return ref.perturb(x, y)


@pytest.mark.parametrize("norm,eps,targeted,rescale,speculate",
                         [("Linf", 0.1, False, True, 1), ("Linf", 0.1, True, False, 1),
                          ("L2", 0.6, False, False, 1), ("Linf", 0.1, False, True, 8),
                          ("Linf", 0.1, True, False, 3)])
def test_same_examples_as_pyautoattack(norm, eps, targeted, rescale, speculate, digits_test,
                                       trained_model):
    """On a model without a fixed-point solve the native attack is pyautoattack's algorithm with
    its draws in the same order: the same examples (so robust accuracy within 1 in 200), though
    it does not query the proposals equal to a sample's best point (which pyautoattack does),
    and with ``speculate`` queries several of a sample's next proposals at once."""
    model = trained_model("ff_mlp")
    x, y = digits_test(48)
    yt = (y + 3) % 10 if targeted else y
    atk = Square(model, eps=eps, norm=norm, n_queries=60, seed=7, targeted=targeted,
                 rescale_schedule=rescale, speculate=speculate)
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        xa = atk(x, yt)
    finally:
        hook.remove()
    st = atk.last_stats
    with torch.no_grad():
        clean = model(x).argmax(1)
    n_live = int((clean != yt).sum() if targeted else (clean == y).sum())
    # the model saw: the clean pass, the queries (start and iterations), the final judgement
    assert sum(rows) == x.shape[0] + st["queries"] + n_live
    if norm == "Linf":
        assert st["unchanged"] > 0   # the digits' blank border: many windows change nothing
    assert (st["speculative"] > 0) == (speculate > 1)
    xr = _pyautoattack_square(model, x, yt, norm=norm, eps=eps, n_queries=60, seed=7,
                              targeted=targeted, resc_schedule=rescale)
    assert torch.equal(xa, xr)
    with torch.no_grad():
        pred = model(xa).argmax(1)
    broken = (pred == yt) if targeted else (pred != y)
    assert atk.last_stats["broken"] == int(broken.sum()) > 0


def _margins(model, x, y):
    with torch.no_grad():
        z = model(x)
    other = z.scatter(1, y[:, None], float("-inf")).max(1).values
    return z.gather(1, y[:, None])[:, 0] - other


def test_restarts_go_to_near_misses_with_restart_fraction(digits_test, trained_model):
    """Without ``restart_fraction`` the runs after the first are pyautoattack's restarts (same
    examples); with it, the second run attacks exactly the samples left whose margin at the
    first run's best point (recomputed here from the model) is below that fraction of their
    clean margin."""
    model = trained_model("ff_mlp")
    x, y = digits_test(48)
    kw = dict(eps=0.05, n_queries=30, seed=3)
    xa = Square(model, n_restarts=2, **kw)(x, y)
    assert torch.equal(xa, _pyautoattack_square(model, x, y, norm="Linf", n_restarts=2, **kw))
    # the speculative search undoes the draws made beyond the last iteration it reaches: the
    # second run draws as pyautoattack's
    assert torch.equal(xa, Square(model, n_restarts=2, speculate=16, **kw)(x, y))
    one = Square(model, **kw)
    runs = []
    orig = one._single_run

    def spy(xs, *a, **k):
        out = orig(xs, *a, **k)
        runs.append((xs.clone(), out[0].clone()))
        return out
    one._single_run = spy
    one(x, y)
    clean = _margins(model, x, y)
    rows = (clean > 0).nonzero()[:, 0]           # the first run's samples
    assert torch.equal(runs[0][0], x[rows])
    best = torch.full_like(clean, float("inf"))
    best[rows] = _margins(model, runs[0][1], y[rows])
    left = (clean > 0) & (best > 0)              # not broken by the first run
    ratio = best[left] / clean[left]
    frac = float(ratio.median())
    want = left & (best < frac * clean)
    assert 0 < int(want.sum()) < int(left.sum())
    gated = Square(model, n_restarts=2, restart_fraction=frac, **kw)
    seen = []
    orig_g = gated._single_run

    def spy_g(xs, *a, **k):
        seen.append(xs.clone())
        return orig_g(xs, *a, **k)
    gated._single_run = spy_g
    gated(x, y)
    assert len(seen) == 2 and torch.equal(seen[1], x[want])
    assert gated.last_stats["restarted"] == int(want.sum())
    assert gated.params()["restart_fraction"] == frac
    # with full_runs=2 the second run attacks every sample left: pyautoattack's restarts again
    two = Square(model, n_restarts=2, restart_fraction=frac, full_runs=2, **kw)
    assert torch.equal(two(x, y), xa) and two.last_stats["restarted"] == int(left.sum())


def test_speculative_search_leaves_the_draws_as_one_at_a_time(digits_test, trained_model):
    """A run whose samples are all broken before its last iteration: the speculative search
    drew windows past the iteration where the one-at-a-time search stops, and undoes those
    draws (whatever is drawn next, as by a later run, is the same)."""
    from robustdeq._tensor import make_generator
    model = trained_model("ff_mlp")
    x, y = digits_test(16)
    x4 = x.reshape(x.shape[0], 1, 1, -1)
    out = {}
    for k in (1, 16):
        atk = Square(model, eps=0.3, n_queries=200, seed=0, speculate=k)
        gen = make_generator(0)
        with torch.no_grad():
            xa, margin = atk._single_run(x4, y, gen, square_mod._Oracle(model, 16, False, False), x.shape)
        out[k] = (xa, margin, gen.get_state())
        if k > 1:
            assert atk._lookahead(torch.tensor([40]))[0] == 16 and bool((margin <= 0).all())
    assert torch.equal(out[1][0], out[16][0]) and torch.equal(out[1][2], out[16][2])


def test_restarts_continue_only_while_the_run_before_broke_a_sample(digits_test, trained_model):
    """With ``restart_while_breaking`` the runs are exactly the first runs of the same attack
    without it (same draws, same samples, same examples), cut after the first run that breaks
    nothing."""
    model = trained_model("ff_mlp")
    x, y = digits_test(48)
    kw = dict(eps=0.08, n_queries=10, seed=3, n_restarts=6, restart_fraction=1.0)

    def runs_of(attack):
        seen = []
        orig = attack._single_run

        def spy(xs, yy, *a, **k):
            out = orig(xs, yy, *a, **k)
            with torch.no_grad():
                broke = int((model(out[0]).argmax(1) != yy).sum())
            seen.append((xs.clone(), out[0].clone(), broke))
            return out
        attack._single_run = spy
        xa = attack(x, y)
        return seen, xa
    free, _ = runs_of(Square(model, **kw))
    gated_attack = Square(model, restart_while_breaking=True, **kw)
    gated, xa = runs_of(gated_attack)
    broke = [b for _, _, b in free]
    stop = next(i for i, b in enumerate(broke) if b == 0)
    assert 0 < stop < len(broke) - 1 and any(broke[stop + 1:])   # a later run would break more
    assert len(gated) == stop + 1 == gated_attack.last_stats["runs"]
    for (xs_g, out_g, _), (xs_f, out_f, _) in zip(gated, free):
        assert torch.equal(xs_g, xs_f) and torch.equal(out_g, out_f)
    assert gated_attack.params()["restart_while_breaking"] is True
    check_ball(x, xa, 0.08, "Linf")


def test_p_schedule():
    """The schedule halves p_init at 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 iterations
    (of 10,000; rescaled to n_queries when asked), as pyautoattack's ``p_selection``."""
    from pyautoattack.square import SquareAttack
    assert p_selection(0.8, 10, 5000, False) == 0.8
    assert p_selection(0.8, 11, 5000, False) == 0.4
    assert p_selection(0.8, 4500, 5000, False) == 0.8 / 128
    assert p_selection(0.8, 50, 100, True) == 0.8 / 128    # 5000 of 10,000
    for n, resc in ((5000, False), (300, True), (10000, True)):
        ref = SquareAttack(None, p_init=0.8, n_queries=n, eps=0.1, resc_schedule=resc)
        assert all(p_selection(0.8, it, n, resc) == ref.p_selection(it) for it in range(0, n, 7))


def test_gradient_masking_does_not_blind_square(digits_test, trained_model):
    """A model whose input gradient is zero everywhere: PGD (fed only that gradient) breaks few
    samples, Square (scores only) many more."""
    model = Quantised(trained_model("ff_mlp"))
    x, y = digits_test(48)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    xg = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(xg), y).backward()
    assert float(xg.grad.abs().max()) == 0.0   # the gradient is masked
    eps = 0.15
    x_pgd = PGD(model, eps=eps, steps=10, seed=0)(x, y)
    sq = Square(model, eps=eps, n_queries=150, seed=0)
    x_sq = sq(x, y)
    with torch.no_grad():
        pgd_broken = int((model(x_pgd).argmax(1) != y).sum())
        sq_broken = int((model(x_sq).argmax(1) != y).sum())
    assert sq_broken == sq.last_stats["broken"]
    assert sq_broken >= max(2 * pgd_broken, pgd_broken + 5), (sq_broken, pgd_broken)


class _OwnMap(DEQClassifier):
    """A DEQClassifier whose ``f`` is its own (the same map): warm queries go through the
    model's solver, not the fixed-point iteration of the cell's map."""

    def f(self, z, u):
        return self.cell(z, u)


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # a sample or two of the tiny model
@pytest.mark.parametrize("path", ["fixed-point", "fixed-point, one step", "model solver"])
def test_warm_started_queries_decide_as_cold_ones(path, monkeypatch, digits_test, trained_model):
    """On a converging DEQ solved to a tight tolerance, each query warm-started from the best
    point's fixed point gives the same accept/reject decisions as a cold query, hence the same
    examples; every example is judged by cold inference. The warm solve is the fixed-point
    iteration of the cell's map (with a single step, the samples not yet converged finish with
    the model's solver), or for a model with a map of its own the model's solver warm-started."""
    monkeypatch.setattr(square_mod, "FIXED_POINT_STEPS", 1 if "one step" in path else 10)
    model = trained_model("mlp_deq")
    if path == "model solver":
        model.__class__ = _OwnMap
    assert plain_deq_classifier(model) == (path != "model solver")
    model.solver_config = model.solver_config.replace(tol=1e-6, max_iter=200)
    x, y = digits_test(12)
    kw = dict(eps=0.12, n_queries=25, seed=1)
    warm, cold = Square(model, warm_start=True, **kw), Square(model, warm_start=False, **kw)
    xw, xc = warm(x, y), cold(x, y)
    assert torch.equal(xw, xc)
    sw, sc = warm.last_stats, cold.last_stats
    assert sw["warm_started"] > 0 and sc["warm_started"] == 0
    with torch.no_grad():
        assert sw["broken"] == int((model(xw).argmax(1) != y).sum()) > 0
    assert warm.describe()["warm_start"] is True
    default = Square(model, **kw)            # the default queries the model's own (cold) inference
    assert default.describe()["warm_start"] is False and torch.equal(default(x, y), xc)
    assert default.last_stats["warm_started"] == 0


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # a sample or two of the tiny model
def test_speculative_queries_decide_as_one_at_a_time_on_a_deq(digits_test, trained_model):
    """On a DEQ solved to a tight tolerance (a batch's solves then do not change its rows'
    answers beyond that tolerance), querying up to 8 of each sample's next proposals together
    gives the examples of the one-proposal-per-query search, judged by cold inference."""
    model = trained_model("mlp_deq")
    model.solver_config = model.solver_config.replace(tol=1e-6, max_iter=200)
    x, y = digits_test(12)
    kw = dict(eps=0.12, n_queries=100, seed=1)
    one, many = Square(model, **kw), Square(model, speculate=8, **kw)
    calls, run = [], model.run

    def counted(*a, **k):
        calls.append(1)
        return run(*a, **k)
    model.run = counted                  # the queries are the model's runs
    xo = one(x, y)
    n_one = len(calls)
    xm = many(x, y)
    del model.run
    assert torch.equal(xo, xm)
    assert len(calls) - n_one < n_one      # fewer, larger query batches
    assert many.last_stats["speculative"] > 0 and many.describe()["speculate"] == 8
    with torch.no_grad():
        assert many.last_stats["broken"] == int((model(xm).argmax(1) != y).sum()) > 0


def test_unconverged_solves_warm_start_nothing(digits_test, trained_model):
    """Where every solve stops at max_iter (its iterate depends on where it started), no query
    is warm-started: the attack is the cold one, and reports what cold inference judges."""
    model = trained_model("mlp_deq")
    model.solver_config = model.solver_config.replace(tol=1e-9, max_iter=4)
    model.warn_nonconvergence = False
    x, y = digits_test(16)
    warm = Square(model, eps=0.1, n_queries=20, seed=2, warm_start=True)
    xa = warm(x, y)
    assert warm.last_stats["warm_started"] == 0
    assert torch.equal(xa, Square(model, eps=0.1, n_queries=20, seed=2, warm_start=False)(x, y))
    with torch.no_grad():
        assert warm.last_stats["broken"] == int((model(xa).argmax(1) != y).sum())


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # a sample or two of the tiny model
@pytest.mark.parametrize("norm,eps", [("Linf", 0.15), ("L2", 1.0)])
def test_contract_ball_range_model_untouched_seed(norm, eps, digits_test, trained_model):
    model = trained_model("mlp_deq")
    model.train()
    model.head.eval()
    before = copy.deepcopy(model.state_dict())
    x, y = digits_test(16)
    a = build("square", model, eps=eps, norm=norm, n_queries=25, seed=5)
    xa = a(x, y)
    assert a.last_stats["broken"] > 0
    check_ball(x, xa, eps, norm)
    assert model.training and not model.head.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(xa, Square(model, eps=eps, norm=norm, n_queries=25, seed=5)(x, y))
    assert not torch.equal(xa, Square(model, eps=eps, norm=norm, n_queries=25, seed=6)(x, y))
    d = a.describe()
    assert d["name"] == "Square" and d["n_queries"] == 25 and d["norm"] == norm


def test_bad_options_are_config_errors(trained_model):
    model = trained_model("ff_mlp")
    for kw in ({"loss": "dlr"}, {"p_init": 1.5}, {"p_init": 0.0}, {"n_queries": 0},
               {"n_restarts": 0}, {"warm_start": 1}, {"warm_start": "auto"}, {"norm": "L1"}, {"restart_fraction": 0.0},
               {"restart_fraction": 1.5}, {"restart_fraction": "x"}, {"restart_while_breaking": 1},
               {"speculate": 0}, {"speculate": 4, "norm": "L2"}, {"full_runs": 0}, {"full_runs": 2}, {"speculate": 4, "warm_start": True}):
        with pytest.raises(ConfigError):
            Square(model, eps=0.1, **kw)


def test_warm_claims_are_confirmed_by_cold_inference(monkeypatch, digits_test, trained_model):
    """If warm-started solves lied (their logits negated: every query claims a
    misclassification), each claim is checked by the model's own inference and the search goes
    on with the cold values: the attack returns exactly the cold attack's examples."""
    model = trained_model("mlp_deq")
    x, y = digits_test(12)
    kw = dict(eps=0.1, n_queries=15, seed=4)
    cold = Square(model, warm_start=False, **kw)(x, y)
    real = square_mod._Oracle.warm_answer

    def lying(self, xq, idx):
        logits, z, ok, started = real(self, xq, idx)
        return -logits, z, ok, started
    monkeypatch.setattr(square_mod._Oracle, "warm_answer", lying)
    atk = Square(model, warm_start=True, **kw)
    xa = atk(x, y)
    st = atk.last_stats
    assert st["warm_started"] > 0 and st["rejected_by_cold"] > 0
    assert st["confirmed_cold"] == st["warm_started"] - st["redone_cold"]
    assert torch.equal(xa, cold)


class _TieAtBest(nn.Module):
    """Two classes: logits ``[1, min(6 mean(x), 1)]``. From inputs of mean 0.1 a Linf attack of
    radius 0.1 can raise the second logit only up to a tie with the first (the true class 0),
    never above it."""

    def forward(self, x):
        z1 = torch.clamp(6 * x.flatten(1).mean(1), max=1.0)
        return torch.stack([torch.ones_like(z1), z1], 1)


def test_a_search_that_reaches_a_tie_keeps_its_example():
    """A tie is wrong (the evaluation's rule, and the search's own success test: margin <= 0):
    a sample whose search stops at a tie keeps that example and counts as broken (it was
    discarded, the clean input returned, because argmax on the tie picks the true class)."""
    model = _TieAtBest().eval()
    x = torch.full((3, 1, 8, 8), 0.1)
    y = torch.zeros(3, dtype=torch.long)
    atk = Square(model, eps=0.1, n_queries=300, seed=0)
    x_adv = atk(x, y)
    check_ball(x, x_adv, 0.1, "Linf")
    m = model(x_adv)
    assert torch.equal(m[:, 1], m[:, 0])            # the best the threat model allows: a tie
    assert atk.last_stats["broken"] == 3
