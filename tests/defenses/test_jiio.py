"""JIIO: the augmented fixed point (robustdeq.deq.jiio) and the JIIO attack (robustdeq.attacks.jiio).

Oracles: the backbone's own forward solve and ImplicitGrad adjoint at the same input (the KKT
conditions), a closed-form linear DEQ with a quadratic objective, the library PGD at an equal
budget of cell evaluations, and projection identities.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdeq.deq.cells import LinearCell
from robustdeq.config import SolverConfig
from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.deq.grad import ImplicitGrad
from robustdeq.deq.model import DEQClassifier
from robustdeq.deq.jiio import (Box, CostCounter, Intersection, JIIOConfig, L2Ball, LinfBall, Mask,
                                Unconstrained, cross_entropy_objective, jiio_attack, kkt_residuals,
                                optimize_inputs, threat_constraint)
from robustdeq.deq.warm import WarmStartImplicitGrad
from robustdeq.errors import ConfigError, InputError

# short forward solves of the tiny trained model may leave a sample or two above tol: not the subject
pytestmark = pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")

TIGHT = SolverConfig(name="anderson", max_iter=100, tol=1e-12, stop_mode="abs")


@pytest.fixture(scope="module")
def tiny64():
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=16).double().eval()
    x, y = load_digits("test")
    return m, x[:6].double(), y[:6]


@pytest.fixture(scope="module")
def trained(fit_minibatches):
    """An undefended mlp_deq trained for a few dozen Adam steps on digits (float32)."""
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=32)
    x, y = load_digits("train")
    fit_minibatches(m, x, y, 40, grad="phantom")  # cheap training gradient; attacks use the model's IFT
    xt, yt = load_digits("test")
    return m, xt[:96], yt[:96]


def oracle(model, x, y):
    """Fixed point, IFT adjoint of l = -CE (summed), and d l / d x, by the backbone at x."""
    est = ImplicitGrad(TIGHT)
    xr = x.clone().requires_grad_(True)
    eq = model.run(xr, grad=est, solver=TIGHT)
    l = cross_entropy_objective(y)(eq.logits, xr).sum()
    g, = torch.autograd.grad(l, xr)
    return eq.z_star, est.last_backward.z, g


# ---------------------------------------------------------------------------------------- KKT
def test_fixed_point_satisfies_kkt_against_backbone_oracle(tiny64):
    m, x, y = tiny64
    eps, alpha = 0.1, 8.0
    C = threat_constraint(x, eps, "Linf")
    r = optimize_inputs(m, cross_entropy_objective(y), C, x0=x, iters=150, step_size=alpha,
                        direction="gradient", solver="fixed_point", resolve=False)
    z_o, mu_o, g_o = oracle(m, r.x, y)
    # primal: z* = f(z*, x + delta*) (the backbone's solve at the same input)
    assert torch.allclose(r.z_joint, z_o, atol=1e-5)
    # adjoint: mu* = grad_z l + J^T mu* (the backbone's ImplicitGrad adjoint at the same input)
    assert float(mu_o.abs().max()) > 1e-2
    assert torch.allclose(r.mu, mu_o, atol=1e-6)
    # input: projected-gradient stationarity with the oracle gradient
    assert float((r.x - C.project(r.x - alpha * g_o)).abs().max()) < 1e-5
    # and the library's own diagnostic agrees
    kk = kkt_residuals(m, cross_entropy_objective(y), C, r.x, r.z_joint, r.mu, alpha=alpha)
    assert float(kk["primal"].max()) < 1e-5 and float(kk["adjoint"].max()) < 1e-5
    assert torch.allclose(kk["grad_x"], g_o, atol=1e-6)
    # feasibility
    assert float((r.x - x).abs().max()) <= eps + 1e-12
    assert float(r.x.min()) >= 0 and float(r.x.max()) <= 1


def test_frozen_input_gives_the_simultaneous_adjoint(tiny64):
    """alpha = 0: x stays put and J_x^T mu converges to the IFT input gradient (PAPERS §9.1)."""
    m, x, y = tiny64
    obj = cross_entropy_objective(y)
    r = optimize_inputs(m, obj, Box(0, 1), x0=x, iters=60, step_size=0.0, solver="anderson", resolve=False)
    assert torch.allclose(r.x, x, atol=1e-12, rtol=0)  # Anderson's affine mixing: rounding only
    _, mu_o, g_o = oracle(m, x, y)
    kk = kkt_residuals(m, obj, None, x, r.z_joint, r.mu)
    assert torch.allclose(r.mu, mu_o, atol=1e-8)
    assert torch.allclose(kk["grad_x"], g_o, atol=1e-8)


def test_l2_normalized_steps_reach_the_boundary_kkt_point():
    """L2 ball with the box inactive: at the KKT point delta* = eps * grad CE / ||grad CE||."""
    torch.manual_seed(1)
    m = zoo.build("mlp_deq", hidden=16).double().eval()
    x = (0.5 + 0.05 * torch.randn(4, 1, 8, 8, dtype=torch.float64)).clamp(0.3, 0.7)
    y = torch.tensor([0, 3, 5, 7])
    eps = 0.2
    r = jiio_attack(m, x, y, eps=eps, norm="L2", iters=300, alpha=0.02, solver="fixed_point",
                    direction="normalized", resolve=False)
    d = (r.x - x).flatten(1)
    assert torch.allclose(d.norm(dim=1), torch.full((4,), eps, dtype=torch.float64), atol=1e-9)
    assert float(r.x.min()) > 0 and float(r.x.max()) < 1  # the box is inactive
    _, _, g = oracle(m, r.x, y)  # gradient of -CE
    cos = F.cosine_similarity(d, -g.flatten(1), dim=1)
    assert float(cos.min()) > 0.999


def test_linear_deq_closed_form():
    """z = W z + U x, objective 0.5||C z - t||^2 + 0.5 gamma ||x - x0||^2: closed-form minimiser."""
    torch.manual_seed(0)
    n, d, k, b = 6, 5, 3, 4
    W = 0.4 * torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    U = torch.randn(n, d, dtype=torch.float64)
    Cm = torch.randn(k, n, dtype=torch.float64)

    inj = nn.Linear(d, n, bias=False).double()
    head = nn.Linear(n, k, bias=False).double()
    with torch.no_grad():
        inj.weight.copy_(U)
        head.weight.copy_(Cm)
    model = DEQClassifier(inj, LinearCell(W), head, solver={"max_iter": 100, "tol": 1e-12}, validate_inputs=False)
    t = torch.randn(b, k, dtype=torch.float64)
    x0 = torch.randn(b, d, dtype=torch.float64)
    gamma = 0.5

    def obj(out, x):
        return 0.5 * (out - t).pow(2).sum(1) + 0.5 * gamma * (x - x0).pow(2).sum(1)

    A = Cm @ torch.linalg.solve(torch.eye(n, dtype=torch.float64) - W, U)
    H = A.T @ A + gamma * torch.eye(d, dtype=torch.float64)
    x_star = torch.linalg.solve(H, (t @ A + gamma * x0).T).T
    alpha = 0.5 / float(torch.linalg.eigvalsh(H).max())
    for solver in ("fixed_point", "anderson"):
        r = optimize_inputs(model, obj, None, x0=x0, iters=300, step_size=alpha, solver=solver)
        assert torch.allclose(r.x, x_star, atol=1e-8), solver
        z_star = x_star @ torch.linalg.solve(torch.eye(n, dtype=torch.float64) - W, U).T
        assert torch.allclose(r.z, z_star, atol=1e-8)
        # mu = (I - W)^{-T} C^T (C z - t)
        mu_star = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - W).T, Cm.T @ (z_star @ Cm.T - t).T).T
        assert torch.allclose(r.mu, mu_star, atol=1e-7)
        assert r.history["residual"][-1] < 1e-8


def test_sign_attack_stays_in_ball_and_boundary_coords_point_outward(trained):
    m, x, y = trained
    eps = 0.1
    r = jiio_attack(m, x, y, eps=eps, norm="Linf", iters=40)
    assert float((r.x - x).abs().max()) <= eps + 1e-6
    assert float(r.x.min()) >= 0 and float(r.x.max()) <= 1
    # KKT of the box problem max CE: where grad CE > 0 the coordinate is at its upper bound, where
    # grad CE < 0 at its lower bound. Check the coordinates with a clear gradient.
    C = threat_constraint(x, eps, "Linf")
    import copy
    _, _, g = oracle(copy.deepcopy(m).double(), r.x.double(), y)
    g = -g.float()  # grad CE
    up = (C.project(r.x + 1) - r.x).abs() < 1e-6
    lo = (C.project(r.x - 1) - r.x).abs() < 1e-6
    clear = g.abs() > 1e-3 * g.abs().max()
    ok = ((g > 0) & up) | ((g < 0) & lo)
    frac = float(ok[clear].float().mean())
    assert frac > 0.9, frac


def test_jiio_attack_at_least_as_strong_as_pgd_with_the_same_budget(trained):
    from robustdeq.attacks.pgd import PGD
    m, x, y = trained
    eps = 0.1
    with torch.no_grad():
        clean = float((m(x).argmax(1) == y).float().mean())
    assert clean > 0.8
    pgd = PGD(m, eps=eps, steps=5, seed=0, method="exact")  # exact solves: the budget of plain PGD
    with CostCounter(m) as c_pgd:
        xp = pgd(x, y)
    budget = c_pgd.total
    iters = budget // 2 - 6  # each JIIO iteration = 1 f + 1 VJP; leave room for the re-solve
    with CostCounter(m) as c_j:
        r = jiio_attack(m, x, y, eps=eps, iters=iters)
    assert c_j.total <= budget
    with torch.no_grad():
        acc_pgd = float((m(xp).argmax(1) == y).float().mean())
        acc_j = float((m(r.x).argmax(1) == y).float().mean())
    assert acc_pgd < clean - 0.2  # the baseline is a real attack
    assert acc_j <= acc_pgd + 0.03, (acc_j, acc_pgd, budget)


def test_attack_class_interface(trained):
    from robustdeq.attacks.jiio import JIIO
    m, x, y = trained
    x, y = x[:16], y[:16]
    m.train()
    m.cell.eval()  # a mixed-mode model: flags must come back exactly
    modes = [mm.training for mm in m.modules()]
    atk = JIIO(m, eps=0.1, iters=10)
    xa = atk(x, y)
    assert [mm.training for mm in m.modules()] == modes
    m.eval()
    assert xa.shape == x.shape and not xa.requires_grad
    assert float((xa - x).abs().max()) <= 0.1 + 1e-6
    d = atk.describe()
    assert d["name"] == "JIIO-10" and d["implementation"] == "robustdeq"
    assert d["eps"] == 0.1 and d["norm"] == "Linf" and d["iters"] == 10 and d["direction"] == "sign"
    assert atk.last_stats["nfe"] == 10
    # L2, seeded random start: same seed -> same result, and inside the ball
    a1 = JIIO(m, eps=0.5, norm="L2", iters=8, random_start=True, seed=3)(x, y)
    a2 = JIIO(m, eps=0.5, norm="L2", iters=8, random_start=True, seed=3)(x, y)
    assert torch.equal(a1, a2)
    assert float((a1 - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    # targeted: the target's CE decreases
    tgt = (y + 1) % 10
    xt = JIIO(m, eps=0.2, iters=20, targeted=True)(x, tgt)
    with torch.no_grad():
        assert F.cross_entropy(m(xt), tgt) < F.cross_entropy(m(x), tgt)
    with pytest.raises(ConfigError):
        JIIO(zoo.build("weight_tied_mlp", hidden=8, depth=2), eps=0.1)
    with pytest.raises(ConfigError):
        JIIO(m, eps=0.1, solver="broyden")
    with pytest.raises(ConfigError):
        JIIO(m, eps=-1.0)


# ---------------------------------------------------------------------------------------- API
def test_constraints_project_correctly():
    torch.manual_seed(0)
    c = torch.rand(3, 1, 4, 4)
    x = torch.randn(3, 1, 4, 4)
    li = LinfBall(c, 0.1)
    assert float((li.project(x) - c).abs().max()) <= 0.1 + 1e-7
    l2 = L2Ball(c, 0.3)
    p = l2.project(x)
    assert torch.allclose((p - c).flatten(1).norm(dim=1), torch.full((3,), 0.3), atol=1e-6)
    inside = c + 0.01 * torch.randn_like(c)
    assert torch.allclose(l2.project(inside), inside)
    # exact intersection of boxes equals clamp to the intersected bounds
    both = Intersection(li, Box(0, 1))
    expect = torch.minimum(torch.maximum(x, (c - 0.1).clamp_min(0)), (c + 0.1).clamp_max(1))
    assert torch.allclose(both.project(x), expect)
    assert bool(both.contains(both.project(x)).all())
    assert isinstance(li & Box(0, 1), Intersection)
    # mask keeps the known coordinates
    mask = torch.rand_like(c) > 0.5
    mk = Mask(mask, c)
    assert torch.equal(mk.project(x)[mask], c[mask]) and torch.equal(mk.project(x)[~mask], x[~mask])
    # L2 ball & box: feasible for both
    pb = Intersection(L2Ball(c, 0.3), Box(0, 1)).project(x)
    assert float(pb.min()) >= 0 and float(pb.max()) <= 1
    assert float((pb - c).flatten(1).norm(dim=1).max()) <= 0.3 + 1e-6
    assert torch.equal(Unconstrained().project(x), x)
    with pytest.raises(InputError):
        Intersection(Box(0, 0.2), Box(0.5, 1)).project(x)
    with pytest.raises(ConfigError):
        Box(1, 0)
    with pytest.raises(ConfigError):
        LinfBall(c, -1)


def test_optimize_inputs_inpainting_with_mask_keeps_known_pixels(tiny64):
    m, x, y = tiny64
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., :4, :] = True  # top half known
    C = Intersection(Mask(mask, x), Box(0, 1))
    obj = lambda logits, xx: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    r = optimize_inputs(m, obj, C, iters=30, step_size=0.5, direction="gradient")
    assert torch.equal(r.x[mask], x[mask])
    with torch.no_grad():
        assert float(r.objective.mean()) < float(obj(m(x), x).mean())
    assert len(r.history["objective"]) == 30 and len(r.history["residual"]) == 30


def test_step_switch_resets_and_uses_alpha_final(tiny64):
    m, x, y = tiny64
    cfg = JIIOConfig(iters=8, alpha=0.0, alpha_final=0.05, switch_at=4, direction="sign", solver="fixed_point")
    r = optimize_inputs(m, cross_entropy_objective(y), threat_constraint(x, 0.5), x0=x, config=cfg)
    # 4 iterations with alpha 0 then 4 with alpha_final: at most 4 * 0.05 away from x
    assert 0 < float((r.x - x).abs().max()) <= 4 * 0.05 + 1e-12
    assert JIIOConfig(iters=80).switch == 50


def test_bad_options_are_config_errors(tiny64):
    m, x, y = tiny64
    obj = cross_entropy_objective(y)
    with pytest.raises(ConfigError):
        optimize_inputs(m, obj, Box(0, 1))  # no x0 and no center
    with pytest.raises(ConfigError):
        optimize_inputs(m, obj, Box(0, 1), x0=x, direction="newton")
    with pytest.raises(ConfigError):
        optimize_inputs(m, obj, Box(0, 1), x0=x, solver="broyden")
    with pytest.raises(ConfigError):
        optimize_inputs(m, obj, Box(0, 1), x0=x, unknown_option=1)
    with pytest.raises(ConfigError):
        optimize_inputs(m, obj, Box(0, 1), x0=x, config=JIIOConfig(), iters=3)
    with pytest.raises(ConfigError):
        optimize_inputs(m, lambda o, xx: o.sum(), Box(0, 1), x0=x, iters=2)  # not per sample
    with pytest.raises(ConfigError):
        optimize_inputs(m, obj, "box", x0=x)
    with pytest.raises(ConfigError):
        optimize_inputs(zoo.build("weight_tied_mlp", hidden=8, depth=2), obj, Box(0, 1), x0=x.float())
    with pytest.raises(InputError):
        optimize_inputs(m, obj, Box(0, 1), x0=torch.full_like(x, float("nan")))
    with pytest.raises(ConfigError):
        JIIOConfig(beta_z=0.0)
    with pytest.raises(ConfigError):
        jiio_attack(m, x, y, eps=0.1, norm="L1")


def test_warm_start_implicit_grad_matches_implicit_grad(tiny64):
    """Same parameter gradient as ImplicitGrad (the adjoint's fixed point does not depend on the
    start), and a good start saves iterations."""
    m, x, y = tiny64
    cfg = SolverConfig(max_iter=100, tol=1e-10)
    est = ImplicitGrad(cfg)
    m.zero_grad()
    F.cross_entropy(m.run(x, grad=est, solver=TIGHT).logits, y).backward()
    ref = [p.grad.clone() for p in m.parameters()]
    # start from a perturbed copy of the converged adjoint
    a0 = est.last_backward.z * 1.01
    west = WarmStartImplicitGrad(a0, solver=cfg)
    m.zero_grad()
    F.cross_entropy(m.run(x, grad=west, solver=TIGHT).logits, y).backward()
    for g0, p in zip(ref, m.parameters()):
        assert torch.allclose(g0, p.grad, atol=1e-9)
    assert west.last_backward.nfe < est.last_backward.nfe
    # a None or mismatched start falls back to the upstream gradient (= ImplicitGrad exactly)
    for start in (None, a0[:2]):
        w2 = WarmStartImplicitGrad(start, solver=cfg)
        m.zero_grad()
        F.cross_entropy(m.run(x, grad=w2, solver=TIGHT).logits, y).backward()
        assert w2.last_backward.nfe == est.last_backward.nfe
    m.zero_grad()


def test_warm_start_implicit_grad_starts_only_the_ok_samples_from_a0(tiny64):
    m, x, y = tiny64
    grad = torch.randn(x.shape[0], 16, dtype=x.dtype)
    a0 = torch.randn_like(grad)
    ok = torch.zeros(x.shape[0], dtype=torch.bool)
    ok[::2] = True
    start = WarmStartImplicitGrad(a0, ok=ok).initial_adjoint(grad)
    torch.testing.assert_close(start[ok], a0[ok])
    torch.testing.assert_close(start[~ok], grad[~ok])
    none_ok = WarmStartImplicitGrad(a0, ok=torch.zeros_like(ok)).initial_adjoint(grad)
    torch.testing.assert_close(none_ok, grad)
    with pytest.raises(ConfigError, match="ok must be"):
        WarmStartImplicitGrad(a0, ok=ok[:-1])
    with pytest.raises(ConfigError, match="ok must be"):
        WarmStartImplicitGrad(a0, ok=ok.long())
