"""PGD's early stopping (freeze a sample once the attack has succeeded) and per-sample step
budgets, against the plain loop as the oracle; the cells' closed-form vector-Jacobian products
against autograd."""

import pytest
import torch
import torch.nn.functional as F

import robustdeq.attacks as A
from robustdeq.attacks import pgd as P
from robustdeq.deq.cells import MLPCell
from robustdeq.errors import ConfigError

from helpers.attacks import check_ball


def broken(model, x_adv, y):
    return A.predict(model, x_adv) != y


def same_as(a, b, tol=1e-5):
    return (a - b).flatten(1).abs().amax(1) <= tol


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_early_stop_breaks_every_sample_the_plain_loop_breaks(norm, digits_test, trained_model):
    # a feed-forward model: deterministic logits, so the samples never frozen follow the plain
    # loop bit for bit, and the frozen ones are misclassified where they were frozen
    model = trained_model("ff_mlp", hidden=32)
    x, y = digits_test(64)
    eps, alpha = (0.1, 0.01) if norm == "Linf" else (1.0, 0.1)
    kw = dict(eps=eps, alpha=alpha, steps=15, random_start=False, norm=norm)
    plain = A.PGD(model, **kw)(x, y)
    atk = A.PGD(model, early_stop=True, **kw)
    es = atk(x, y)
    check_ball(x, es, eps, norm)
    b_plain, b_es = broken(model, plain, y), broken(model, es, y)
    assert bool(b_es[b_plain].all()), "early stopping lost a sample the plain loop breaks"
    assert atk.last_unconfirmed == 0 and atk.last_stats["unconfirmed"] == 0
    assert atk.last_stats["frozen"] == int((~same_as(es, plain)).sum()) > 0
    assert atk.last_stats["calls"] == 15 and atk.describe()["early_stop"] is True
    # never frozen: the plain loop's final iterate (up to rounding: the loss is a batch mean)
    same = same_as(es, plain)
    assert bool(same[~b_es].all())
    assert 0 < int((~same).sum()) <= int(b_es.sum())  # frozen ones are all broken


# the trained helper DEQ's 30-iteration solves leave a sample or two above tol: not the subject here
@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_early_stop_on_a_deq_is_no_weaker_and_cheaper(digits_test, trained_model):
    model = trained_model("mlp_deq", hidden=32)
    x, y = digits_test(64)
    kw = dict(eps=0.1, alpha=0.01, steps=10, random_start=False, method="exact")
    plain_atk, es_atk = A.PGD(model, **kw), A.PGD(model, early_stop=True, **kw)
    plain, es = plain_atk(x, y), es_atk(x, y)
    assert A.accuracy(model, es, y) <= A.accuracy(model, plain, y)
    assert es_atk.last_stats["forward_work"] < plain_atk.last_stats["forward_work"]
    assert es_atk.last_stats["backward_work"] < plain_atk.last_stats["backward_work"]


def test_unconfirmed_samples_resume_the_plain_loop(monkeypatch, digits_test, trained_model):
    # the confirmation by the model's own inference is forced to reject every frozen sample:
    # each must then end exactly where the plain loop ends
    model = trained_model("ff_mlp", hidden=32)
    x, y = digits_test(32)
    kw = dict(eps=0.1, alpha=0.01, steps=12, random_start=False)
    plain = A.PGD(model, **kw)(x, y)

    def rejecting_logits_of(m, xs):  # predicts each point's own (clean) label: "not broken"
        nearest = (xs.flatten(1)[:, None] - x.flatten(1)[None]).abs().amax(-1).argmin(1)
        return 10 * F.one_hot(y[nearest], 10).float()
    monkeypatch.setattr(P, "logits_of", rejecting_logits_of)
    atk = A.PGD(model, early_stop=True, **kw)
    es = atk(x, y)
    assert atk.last_unconfirmed > 0
    torch.testing.assert_close(es, plain, rtol=0, atol=1e-6)


def test_per_sample_budgets_equal_plain_loops_of_those_lengths(digits_test, trained_model):
    model = trained_model("ff_mlp", hidden=32)
    x, y = digits_test(12)
    budget = torch.tensor([0, 1, 2, 3, 5, 8] * 2)
    grad_fn = P.InputGradient(model, None)
    loss = F.cross_entropy

    def run(xs, ys, **kw):
        return P.pgd_loop(xs, ys, lambda a, b: grad_fn(a, b, loss), eps=0.1, alpha=0.02,
                          norm="Linf", random_start=False, gen=None, **kw)
    out = run(x, y, steps=8, budget=budget)
    for k in budget.unique().tolist():
        rows = (budget == k).nonzero()[:, 0]
        torch.testing.assert_close(out[rows], run(x[rows], y[rows], steps=k), rtol=0, atol=0)


def test_early_stop_option_is_checked(trained_model):
    with pytest.raises(ConfigError, match="early_stop"):
        A.PGD(trained_model("ff_mlp", hidden=32), eps=0.1, early_stop="yes")


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("norm,scale", [("none", 1.0), ("spectral", 0.8)])
def test_closed_form_vjp_matches_autograd(act, norm, scale):
    torch.manual_seed(0)
    cell = MLPCell(7, act=act, norm=norm, scale=scale, init_gain=0.9).double().eval()
    z, u = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    a, c = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    ref = torch.autograd.grad(cell(zr, u), zr, a)[0]
    vjp = cell.vjp_at(z, u)
    torch.testing.assert_close(vjp(a), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vjp(a, c), ref + c, rtol=1e-12, atol=1e-12)
    assert cell.has_vjp

    class Shifted(MLPCell):  # a subclass that changes the map must not reuse the closed form
        def forward(self, z, u):
            return super().forward(z, u) + 1
    assert not Shifted(3).has_vjp
