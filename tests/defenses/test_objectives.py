"""Training objectives (robustdeq.defenses.objectives): CE, PGD-AT, TRADES, JIIO-AT, random
intermediate states and the Jacobian penalty.

Oracles: hand-computed iterates and losses, torchattacks' PGD on a feed-forward model, the exact
Jacobian, the backbone's ImplicitGrad, chi-square tests of the sampling distribution.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from robustdeq.config import SolverConfig
from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.deq.grad import ImplicitGrad
from robustdeq.deq.solvers import get_solver
from robustdeq.defenses.objectives import (JIIOAT, PGDAT, TRADES, CrossEntropy, RandomStateObjective,
                                           inner_pgd, jacobian_penalty, make_objective, ris_forward)
from robustdeq.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")

CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52}  # chi-square quantiles at p = 0.999


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits("train")
    return x, y


@pytest.fixture(scope="module")
def trained(digits, fit_minibatches):
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=24)
    x, y = digits
    return fit_minibatches(m, x, y, 30, grad="phantom")


def chi2(counts):
    n = counts.sum()
    e = n / counts.numel()
    return float(((counts - e) ** 2 / e).sum())


# ------------------------------------------------------------------------------ random states
def test_ris_batch_sampling_is_uniform_and_shared():
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8)
    x = torch.rand(5, 1, 8, 8)
    y = torch.arange(5)
    obj = CrossEntropy(state="random", max_state=4, seed=0)
    draws = []
    for _ in range(200):
        _, sc = obj(m, x, y)
        assert len(obj.sampled_states) == 1
        n = obj.sampled_states[0]
        assert n.shape == (5,) and bool((n == n[0]).all())  # one draw shared by the batch
        assert sc["state_mean"] == float(n[0])
        draws.append(int(n[0]))
    counts = torch.bincount(torch.tensor(draws), minlength=5)[1:].float()
    assert counts.sum() == 200 and bool((counts > 0).all())
    assert chi2(counts) < CHI2_999[3]
    assert set(draws) == {1, 2, 3, 4}


def test_ris_per_sample_sampling_is_uniform_and_independent():
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8)
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    obj = CrossEntropy(state="random", state_sampling="sample", max_state=5, seed=1)
    ns = []
    for _ in range(20):
        obj(m, x, y)
        n = obj.sampled_states[0]
        assert len(set(n.tolist())) > 1  # per-sample draws differ within a batch
        ns.append(n)
    allv = torch.cat(ns)
    counts = torch.bincount(allv, minlength=6)[1:].float()
    assert int(allv.min()) >= 1 and int(allv.max()) <= 5
    assert chi2(counts) < CHI2_999[4]
    # the default N is the model's forward budget; the global RNG is used without a seed
    obj2 = CrossEntropy(state="random", state_sampling="sample")
    torch.manual_seed(5)
    obj2(m, x, y)
    a = obj2.sampled_states[0]
    torch.manual_seed(5)
    obj2(m, x, y)
    assert torch.equal(a, obj2.sampled_states[0])
    assert int(a.max()) <= m.solver_config.max_iter - 1
    assert int(torch.cat([obj2.sampled_states[0]]).max()) > 5


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_ris_default_states_are_those_a_forward_solve_can_return(solver):
    # max_iter counts evaluations of f: a forward solve evaluates z_0 .. z_{max_iter-1} and never
    # returns z_{max_iter}; the default draws n ~ U{1..max_iter-1} (the paper's f_thres steps)
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8, solver={"name": solver, "max_iter": 4, "tol": 0.0,
                                               "select": "last"}).double()
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64)
    obj = CrossEntropy(state="random", state_sampling="sample", seed=0)
    obj(m, x, torch.arange(64) % 10)
    assert set(obj.sampled_states[0].tolist()) == {1, 2, 3}
    with torch.no_grad():   # the deepest drawn state is the deployed solve's output
        u = m.inject(x[:2])
        torch.testing.assert_close(m.iterates(u, torch.full((2,), 3)), m.solve(u).z, rtol=0, atol=0)
    one = zoo.build("mlp_deq", hidden=8, solver={"name": solver, "max_iter": 1})
    with pytest.raises(ConfigError, match="max_iter"):
        CrossEntropy(state="random")(one, x[:2].float(), torch.arange(2))
    CrossEntropy(state="random", max_state=1)(one, x[:2].float(), torch.arange(2))  # explicit N


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_ris_state_is_the_nth_iterate_plus_phantom_steps(solver):
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8, solver={"name": solver, "max_iter": 12}).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    logits, z, u, n = ris_forward(m, x, max_state=6, sampling="sample", phantom_steps=5,
                                  phantom_tau=0.5, generator=gen)
    with torch.no_grad():
        u0 = m.inject(x)
        for i in range(6):
            k = int(n[i])
            # oracle: the raw iterate z_k recorded by a full solve with no early stop
            res = get_solver(m.solver_config.replace(max_iter=k + 1, tol=0.0)).solve(
                lambda zz: m.f(zz, u0[i:i + 1]), m.init_state(u0[i:i + 1]), record=[k])
            zk = res.trajectory[0].z
            if solver == "fixed_point":  # and by hand: k plain steps from 0
                zh = m.init_state(u0[i:i + 1])
                for _ in range(k):
                    zh = m.f(zh, u0[i:i + 1])
                assert torch.allclose(zk, zh, atol=1e-12)
            for _ in range(5):
                zk = 0.5 * zk + 0.5 * m.f(zk, u0[i:i + 1])
            assert torch.allclose(logits[i:i + 1], m.readout(zk), atol=1e-10)
    # the loss has a gradient to the parameters through the phantom steps
    logits.sum().backward()
    assert float(m.cell.W.linear.weight.grad.abs().sum()) > 0


def test_ris_runs_in_every_forward_of_the_adversarial_objectives(digits):
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8)
    x, y = digits[0][:16], digits[1][:16]
    pgd = PGDAT(state="random", steps=3, max_state=4, seed=0)
    loss, sc = pgd(m, x, y)
    assert len(pgd.sampled_states) == 3 + 1  # 3 attack forwards + the training forward
    assert 1 <= sc["state_min"] <= sc["state_mean"] <= sc["state_max"] <= 4
    loss.backward()
    assert float(m.cell.W.linear.weight.grad.abs().sum()) > 0
    tr = TRADES(state="random", steps=2, max_state=4, seed=0)
    tr(m, x, y)
    assert len(tr.sampled_states) == 1 + 2 + 2  # clean target, 2 attack steps, clean + adversarial
    rs = RandomStateObjective("trades", steps=2, max_state=3)
    assert isinstance(rs, TRADES) and rs.state == "random" and rs.max_state == 3


# ------------------------------------------------------------------------------ PGD-AT
def test_inner_pgd_matches_torchattacks_on_a_feedforward_model():
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    net = zoo.build("ff_mlp", hidden=16).eval()
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    ours = inner_pgd(net, x, y, eps=0.1, alpha=0.02, steps=5, norm="Linf", random_start=False)
    ref = torchattacks.PGD(net, eps=0.1, alpha=0.02, steps=5, random_start=False)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)
    ours2 = inner_pgd(net, x, y, eps=0.5, alpha=0.1, steps=5, norm="L2", random_start=False)
    ref2 = torchattacks.PGDL2(net, eps=0.5, alpha=0.1, steps=5, random_start=False)(x, y)
    assert torch.allclose(ours2, ref2, atol=1e-5)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_pgdat_adversarial_loss_is_at_least_the_clean_loss(trained, digits, norm, eps):
    m = trained
    x, y = digits[0][:64], digits[1][:64]
    m.train()
    try:
        clean, _ = CrossEntropy()(m, x, y)
        obj = PGDAT(eps=eps, steps=5, norm=norm, seed=0)
        adv, sc = obj(m, x, y)
        assert float(adv.detach()) >= float(clean.detach()) + 0.1
        assert sc["ce_adv"] == pytest.approx(float(adv.detach()))
        xa = obj.generate(m, x, y)
        d = (xa - x).flatten(1)
        lim = d.abs().max(dim=1)[0] if norm == "Linf" else d.norm(dim=1)
        assert float(lim.max()) <= eps + 1e-5 and float(xa.min()) >= 0 and float(xa.max()) <= 1
        # warm-started and cold PGD inside PGD-AT find equally strong examples
        cold = PGDAT(eps=eps, steps=5, norm=norm, seed=0, warm_start=False)
        loss_cold, _ = cold(m, x, y)
        assert abs(float(loss_cold.detach()) - float(adv.detach())) < 0.05 * float(adv.detach())
    finally:
        m.eval()


def test_modes_and_requires_grad_flags_are_restored(trained, digits):
    m = copy.deepcopy(trained)
    x, y = digits[0][:8], digits[1][:8]
    m.train()
    m.head.eval()
    m.injection.linear.bias.requires_grad_(False)
    modes = [mm.training for mm in m.modules()]
    flags = [p.requires_grad for p in m.parameters()]
    for obj in (PGDAT(steps=2), TRADES(steps=2), JIIOAT(iters=3), PGDAT(steps=2, state="random", max_state=3)):
        loss, _ = obj(m, x, y)
        assert [mm.training for mm in m.modules()] == modes, type(obj).__name__
        assert [p.requires_grad for p in m.parameters()] == flags
        loss.backward()
        assert m.injection.linear.bias.grad is None


# ------------------------------------------------------------------------------ TRADES
def test_trades_loss_matches_hand_computation():
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8, solver={"tol": 1e-10, "max_iter": 100}).double()
    x = torch.rand(7, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (7,))
    x_adv = (x + 0.1 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    obj = TRADES(beta=6.0, eps=0.1)
    loss, sc = obj.loss_at(m, x, x_adv, y)
    with torch.no_grad():
        ln, la = m(x), m(x_adv)
        p = ln.softmax(1)
        ce = -ln.log_softmax(1)[torch.arange(7), y].mean()
        kl = (p * (p.log() - la.log_softmax(1))).sum() / 7
    assert float(loss.detach()) == pytest.approx(float(ce + 6.0 * kl), rel=1e-10)
    assert sc["kl"] == pytest.approx(float(kl), rel=1e-10)
    # x' is found by ascent on the KL within the ball
    xp = obj.generate(m, x, y)
    assert float((xp - x).abs().max()) <= 0.1 + 1e-12
    with torch.no_grad():
        kl_at = lambda z: float(F.kl_div(m(z).log_softmax(1), p, reduction="sum"))  # noqa: E731
        assert kl_at(xp) > 10 * kl_at((x + 0.001 * torch.randn_like(x)).clamp(0, 1))


# ------------------------------------------------------------------------------ Jacobian penalty
def test_jacobian_penalty_is_an_unbiased_frobenius_estimate():
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=6).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    u = m.inject(x)
    z = m.solve(u).z
    exact = 0.0
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda zz: m.f(zz[None], u[i:i + 1].detach())[0], z[i])
        exact += float(J.pow(2).sum()) / 6 / 3
    est = jacobian_penalty(m, z, u, probes=1500, generator=torch.Generator().manual_seed(0))
    assert float(est.detach()) == pytest.approx(exact, rel=0.1)
    est.backward()
    assert float(m.cell.W.linear.weight.grad.abs().sum()) > 0
    # added to the objective's loss with its weight
    obj = CrossEntropy(jac_reg=0.5)
    y = torch.arange(3)
    loss, sc = obj(m, x, y)
    assert float(loss.detach()) == pytest.approx(sc["ce"] + 0.5 * sc["jac"], rel=1e-9)


# ------------------------------------------------------------------------------ JIIO-AT
def test_jiioat_gradient_matches_implicit_gradient_at_the_same_adversarial_batch(digits):
    # a contractive cell (||W||_2 = 0.5 at init, tanh): every solve converges, so the warm-started
    # solves and the oracle's cold ones reach the same, unique fixed point
    torch.manual_seed(0)
    tight = SolverConfig(max_iter=100, tol=1e-10)
    m = zoo.build("mlp_deq", hidden=16).double()
    m.grad = ImplicitGrad(tight)
    m.solver_config = tight
    x, y = digits[0][:16].double(), digits[1][:16]
    obj = JIIOAT(eps=0.1, iters=15)
    m.train()
    loss, sc = obj(m, x, y)
    loss.backward()
    got = [p.grad.clone() for p in m.parameters()]
    assert obj.last_backward is not None and obj.last_backward.last_backward is not None  # warm start used
    xa = obj.generate(m, x, y).x  # deterministic: same adversarial batch
    m.zero_grad()
    ref_logits = m(xa)
    ref_loss = F.cross_entropy(ref_logits, y)
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-8)
    for g, p in zip(got, m.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-8)
    # the scalars are those of the adversarial batch: accuracy and CE at m(xa)
    assert sc["jiio_nfe"] == 15
    assert sc["acc_adv"] == float((ref_logits.argmax(dim=1) == y).float().mean())
    assert sc["ce_adv"] == pytest.approx(float(ref_loss.detach()), rel=1e-8)
    clean, _ = CrossEntropy()(m, x, y)
    assert float(loss.detach()) > float(clean.detach())
    # without the warm start (or with another estimator) it still trains
    obj2 = JIIOAT(eps=0.1, iters=5, warm_start=False, jac_reg=0.1)
    loss2, sc2 = obj2(m, x, y)
    assert "jac" in sc2 and torch.isfinite(loss2)


# ------------------------------------------------------------------------------ options
def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError):
        PGDAT(state="final")
    with pytest.raises(ConfigError):
        PGDAT(state="random", state_sampling="per_batch")
    with pytest.raises(ConfigError):
        PGDAT(eps=-0.1)
    with pytest.raises(ConfigError):
        PGDAT(norm="L1")
    with pytest.raises(ConfigError):
        PGDAT(steps=0)
    with pytest.raises(ConfigError):
        TRADES(beta=-1)
    with pytest.raises(ConfigError):
        CrossEntropy(max_state=0)
    with pytest.raises(ConfigError):
        CrossEntropy(phantom_tau=0.0)
    with pytest.raises(ConfigError):
        CrossEntropy(jac_reg=-1.0)
    with pytest.raises(ConfigError):
        JIIOAT(state="random")
    with pytest.raises(ConfigError):
        JIIOAT(solver="broyden")
    with pytest.raises(ConfigError):
        make_objective("pgd_at", epsilon=0.1)
    with pytest.raises(ConfigError):
        make_objective("mart")
    o = make_objective("trades", beta=3, eps=0.05, state="random")
    assert isinstance(o, TRADES) and o.beta == 3.0 and o.describe()["name"] == "trades"
    assert o.describe()["norm"] == "Linf"
    with pytest.raises(ConfigError):
        m = zoo.build("weight_tied_mlp", hidden=8, depth=2)
        CrossEntropy(state="random")(m, torch.rand(2, 1, 8, 8), torch.arange(2))


@pytest.mark.integration
def test_trainer_runs_checkpoints_and_resumes_with_an_objective(tmp_path, digits):
    train = pytest.importorskip("robustdeq.train")
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8)
    x, y = digits[0][:96], digits[1][:96]
    obj = PGDAT(eps=0.05, steps=2, state="random", max_state=4, seed=0)
    hist = train.Trainer(m, obj, {"epochs": 1, "batch_size": 48}, out_dir=tmp_path).fit(x, y)
    assert len(hist) == 1 and 1 <= hist[0]["state_mean"] <= 4 and "acc_adv" in hist[0]
    assert (tmp_path / "checkpoint.pt").exists()
    # a fresh objective with the same options describes itself identically: the run resumes
    m2 = zoo.build("mlp_deq", hidden=8)
    obj2 = PGDAT(eps=0.05, steps=2, state="random", max_state=4, seed=0)
    tr2 = train.Trainer(m2, obj2, {"epochs": 1, "batch_size": 48}, out_dir=tmp_path)
    hist2 = tr2.fit(x, y)
    assert tr2.start_epoch == 1 and len(hist2) == 1
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
