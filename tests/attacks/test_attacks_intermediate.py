"""Intermediate-state attacks: the simultaneous adjoint against the IFT gradient (its oracle),
states' logits against robustdeq.deq.views.state_logits, the judge rule, ensembles, weight-tied
models."""

import pytest
import torch
import torch.nn.functional as F

import robustdeq.attacks as A
from robustdeq.attacks.intermediate import simultaneous_adjoint, states_logits
from robustdeq.deq import zoo
from robustdeq.deq.grad import ImplicitGrad
from robustdeq.deq.views import attack_view, state_logits
from robustdeq.errors import ConfigError


TIGHT = {"name": "anderson", "max_iter": 300, "tol": 1e-13, "stop_mode": "abs"}


def contractive_deq(seed=0):
    """float64 MLP DEQ with ||W||_2 <= 0.6: a contraction, unique fixed point."""
    torch.manual_seed(seed)
    m = zoo.build("mlp_deq", hidden=16, norm="spectral", scale=0.6, init_gain=0.9,
                  solver=TIGHT).double().eval()
    m.grad = ImplicitGrad(TIGHT)
    return m


def ift_input_grad(model, x, y, loss_fn=F.cross_entropy):
    xr = x.clone().requires_grad_(True)
    return torch.autograd.grad(loss_fn(model(xr), y), xr)[0]


def cosines(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


# -- the simultaneous adjoint -----------------------------------------------------------------
@pytest.mark.parametrize("beta_z,beta_mu,n", [(1.0, 1.0, 60), (0.8, 0.6, 120)])
def test_simultaneous_adjoint_converges_to_the_ift_input_gradient(beta_z, beta_mu, n, digits_test):
    model = contractive_deq()
    x, y = digits_test(6)
    x = x.double()
    ref = ift_input_grad(model, x, y)
    grads = dict(simultaneous_adjoint(model, x, y, n, beta_z=beta_z, beta_mu=beta_mu))
    assert sorted(grads) == list(range(1, n + 1))
    assert float(cosines(grads[n], ref).min()) > 0.99
    torch.testing.assert_close(grads[n], ref, rtol=1e-6, atol=1e-9)
    # the error shrinks along the trajectory (at n = 2 the recursion has seen two states only)
    err = lambda k: float((grads[k] - ref).flatten(1).norm(dim=1).max())  # noqa: E731
    assert err(n) < 1e-3 * err(2)
    assert float(cosines(grads[2], ref).min()) < 0.9999


def test_simultaneous_adjoint_custom_loss_and_selected_states(digits_test):
    model = contractive_deq(1)
    x, y = digits_test(4)
    x = x.double()
    loss = lambda logits, yy: -F.cross_entropy(logits, (yy + 1) % 10)  # noqa: E731
    out = simultaneous_adjoint(model, x, y, 70, loss_fn=loss, states=[5, 70])
    assert [n for n, _ in out] == [5, 70]
    torch.testing.assert_close(out[1][1], ift_input_grad(model, x, y, loss), rtol=1e-6, atol=1e-9)


def test_simultaneous_adjoint_rejects_bad_options(digits_test):
    model = contractive_deq()
    x, y = digits_test(2)
    with pytest.raises(ConfigError):
        simultaneous_adjoint(model, x.double(), y, 0)
    with pytest.raises(ConfigError):
        simultaneous_adjoint(model, x.double(), y, 5, beta_mu=1.5)
    with pytest.raises(ConfigError):
        simultaneous_adjoint(model, x.double(), y, 5, states=[7])
    with pytest.raises(ConfigError, match="fixed-point cell"):
        simultaneous_adjoint(zoo.build("weight_tied_mlp", hidden=8), x, y, 3)


# -- states' logits ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["deq", "weight_tied"])
def test_states_logits_match_the_attack_view_state_logits(kind, digits_test):
    torch.manual_seed(0)
    model = (zoo.build("mlp_deq", hidden=16) if kind == "deq"
             else zoo.build("weight_tied_mlp", hidden=16, depth=6)).double().eval()
    x, y = digits_test(5)
    x = x.double()
    states = [1, 3, 6]
    xr = x.clone().requires_grad_(True)
    ours = states_logits(model, xr, states, unroll=2)
    for k in states:
        xr2 = x.clone().requires_grad_(True)
        ref = state_logits(model, xr2, k, unroll=2)
        torch.testing.assert_close(ours[k], ref)
        g = torch.autograd.grad(F.cross_entropy(ours[k], y), xr, retain_graph=True)[0]
        g_ref = torch.autograd.grad(F.cross_entropy(ref, y), xr2)[0]
        torch.testing.assert_close(g, g_ref)


def test_single_state_attack_equals_pgd_on_the_state_view(digits_test, trained_model):
    model = trained_model("mlp_deq", hidden=32)
    x, y = digits_test(32)
    ours = A.StateAttack(model, eps=0.1, alpha=0.02, steps=5, states=4, unroll=3,
                         random_start=False)(x, y)
    ref = A.PGD(attack_view(model, state=4, unroll=3), eps=0.1, alpha=0.02, steps=5,
                random_start=False)(x, y)
    assert torch.equal(ours, ref)
    view = attack_view(model, state=4)
    assert A.accuracy(view, ours, y) < A.accuracy(view, x, y) - 0.3


def test_ensemble_gradient_is_the_sum_of_the_states_gradients(digits_test, trained_model):
    model = trained_model("mlp_deq", hidden=32).double()
    x, y = digits_test(8)
    x = x.double()
    atk = A.StateAttack(model, eps=0.1, steps=1, states=[2, 5], ensemble=True)
    g = atk._grad_fn([2, 5])(x, y)
    torch.testing.assert_close(g, atk._grad_fn([2])(x, y) + atk._grad_fn([5])(x, y))


def test_several_states_keep_per_sample_the_first_x_adv_that_fools_the_judge(digits_test, trained_model):
    model = trained_model("mlp_deq", hidden=32).double()
    x, y = digits_test(48)
    x = x.double()
    judge = model
    kw = dict(eps=0.06, alpha=0.015, steps=5, random_start=False)
    atk = A.StateAttack(model, states=[2, 6, 10], **kw)
    out = atk(x, y)
    singles = [A.StateAttack(model, states=k, **kw)(x, y) for k in (2, 6, 10)]
    fooled = [A.predict(judge, s) != y for s in singles]
    any_fooled = fooled[0] | fooled[1] | fooled[2]
    out_fooled = A.predict(judge, out) != y
    assert torch.equal(out_fooled, any_fooled)
    for i in range(x.shape[0]):
        first = next((j for j in range(3) if fooled[j][i]), None)
        if first is not None:
            torch.testing.assert_close(out[i], singles[first][i], rtol=0, atol=1e-12)
        else:  # never fooled: one of the states' outputs
            assert any(torch.allclose(out[i], s[i], rtol=0, atol=1e-12) for s in singles)
    assert atk.last_stats["fooled_by_state"][2] == int(fooled[0].sum())


def test_state_attack_with_an_early_exit_judge(digits_test, trained_model):
    model = trained_model("mlp_deq", hidden=32)
    x, y = digits_test(32)
    judge = attack_view(model, state=3)
    xa = A.StateAttack(model, eps=0.1, steps=5, states=[3, 8], judge=judge, seed=0)(x, y)
    assert A.accuracy(judge, xa, y) < A.accuracy(judge, x, y) - 0.3


def test_adjoint_mode_attack_breaks_a_trained_deq(digits_test, trained_model):
    model = trained_model("mlp_deq", hidden=32, norm="spectral", scale=0.9)
    x, y = digits_test(32)
    atk = A.StateAttack(model, eps=0.15, steps=8, states=20, mode="adjoint", seed=0)
    xa = atk(x, y)
    assert float((xa - x).abs().max()) <= 0.15 + 1e-6
    assert A.accuracy(model, xa, y) < A.accuracy(model, x, y) - 0.3
    assert atk.describe()["mode"] == "adjoint" and "adjoint" in atk.name


def test_states_past_every_samples_stop_are_attacked_through_the_fixed_point(digits_test):
    """A state ``k`` whose unroll window starts after every sample's solve stopped (the default
    ``states="all"`` reaches up to ``max_iter - 1``): the state is the final iterate, and its
    gradient is the window's steps unrolled from it (the fixed point's unrolled gradient, as
    before the solver stopped), so the attack moves the input (with no steps in the window the
    gradient was zero: autograd's "not used in the graph" error, or an attack that never moved)."""
    from robustdeq.deq.views import state_logits
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8).eval()
    x, y = digits_test(4)
    u = model.inject(model.check_input(x))
    res = model.solve(u)
    k = model.solver_config.max_iter - 1
    assert int(res.steps.max()) + 5 < k
    xg = x.clone().requires_grad_(True)
    g = torch.autograd.grad(state_logits(model, xg, k, unroll=5).sum(), xg)[0]
    # the reference: five plain steps of f from the final iterate, with autograd through u
    xr = x.clone().requires_grad_(True)
    ur = model.inject(model.check_input(xr))
    ref = torch.autograd.grad(model.readout(model.unroll(ur, res.z.detach(), 5)).sum(), xr)[0]
    torch.testing.assert_close(g, ref)
    assert bool((g.flatten(1).abs().sum(1) > 0).all())
    xa = A.StateAttack(model, eps=0.1, steps=2, states=[k], random_start=False)(x, y)
    assert float((xa - x).abs().max()) > 0
    xa = A.StateAttack(model, eps=0.1, steps=2, seed=0)(x, y)  # states="all"
    assert float((xa - x).abs().max()) <= 0.1 + 1e-6


def test_state_attack_on_a_weight_tied_model(digits_test, trained_model):
    model = trained_model("weight_tied_mlp", hidden=32, depth=6)
    x, y = digits_test(32)
    atk = A.StateAttack(model, eps=0.1, steps=5, seed=0)  # all states 1..6
    assert atk.states == [1, 2, 3, 4, 5, 6]
    xa = atk(x, y)
    assert A.accuracy(model, xa, y) < A.accuracy(model, x, y) - 0.3
    ens = A.StateAttack(model, eps=0.1, steps=5, states=[3, 6], ensemble=True, seed=0)(x, y)
    assert A.accuracy(model, ens, y) < A.accuracy(model, x, y) - 0.3
    with pytest.raises(ConfigError, match="explicit"):
        A.StateAttack(model, eps=0.1, mode="adjoint")
    with pytest.raises(ConfigError, match="outside"):
        A.StateAttack(model, eps=0.1, states=7)


@pytest.mark.parametrize("kw,match", [
    ({"states": 0}, "outside"), ({"states": 30}, "outside"), ({"states": []}, "states"),
    ({"states": "some"}, "states"), ({"states": [1.5]}, "states"), ({"mode": "magic"}, "mode"),
    ({"unroll": 0}, "unroll"), ({"beta_z": 0}, "beta_z"), ({"judge": "model"}, "judge"),
])
def test_state_attack_rejects_bad_options(kw, match):
    model = zoo.build("mlp_deq", hidden=8)
    with pytest.raises(ConfigError, match=match):
        A.StateAttack(model, eps=0.1, **kw)


def test_all_states_of_a_deq_and_names():
    model = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 6})
    atk = A.StateAttack(model, eps=0.1)
    assert atk.states == [1, 2, 3, 4, 5]
    assert atk.name == "State-PGD-10 (all states, unroll 5)"
    assert A.StateAttack(model, eps=0.1, states=3).name == "State-PGD-10 (z_3, unroll 5)"
    d = atk.describe()
    assert d["states"] == "all" and d["implementation"] == "robustdeq"
