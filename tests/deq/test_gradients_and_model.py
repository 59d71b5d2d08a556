"""Gradient estimators and DEQClassifier against closed forms, gradcheck and torchdeq."""
import pytest
import torch
from torch import nn

import robustdeq as rd
from robustdeq import (DEQClassifier, FullBackprop, ImplicitGrad, NoGrad, PhantomGrad,
                       SolverConfig, UnrolledGrad, gradient)
from robustdeq.deq.cells import LinearCell
from robustdeq.deq import zoo
from robustdeq.deq.cells import LinearHead, MLPCell, MLPInjection
from robustdeq.deq.solvers import get_solver
from robustdeq.deq.views import attack_view
from robustdeq.errors import ConfigError, InputError, NonConvergenceWarning

TIGHT = dict(name="anderson", max_iter=200, tol=1e-12, stop_mode="abs")
TIGHT_BWD = SolverConfig(**TIGHT)


def linear_deq(d_in=5, d=4, k=3, seed=0, grad=None):
    """The library's closed-form oracle cell f(z, u) = A z + u (A trainable): z* = (I - A)^{-1} u."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = 0.6 * A / torch.linalg.matrix_norm(A, ord=2)
    inj = nn.Linear(d_in, d, bias=False).double()
    head = nn.Linear(d, k, bias=False).double()
    return DEQClassifier(nn.Sequential(nn.Flatten(), inj), LinearCell(A, trainable=True), head, solver=TIGHT,
                         grad=grad or ImplicitGrad(TIGHT_BWD), input_shape=(d_in,))


def closed_form_input_grad(model, w):
    """d(sum_b w . logits_b)/dx = B^T (I - A)^{-T} H^T w."""
    A = model.cell.A.detach()
    B = model.injection[1].weight.detach()
    H = model.head.weight.detach()
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return B.T @ torch.linalg.solve((eye - A).T, H.T @ w)


def test_linear_deq_fixed_point_and_ift_gradient_match_closed_form():
    model = linear_deq()
    x = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    eq = model.run(x)
    A = model.cell.A.detach()
    u = model.injection(x).detach()
    z_exact = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - A, u.T).T
    torch.testing.assert_close(eq.z_star, z_exact, atol=1e-10, rtol=0)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (eq.logits @ w).sum().backward()
    torch.testing.assert_close(x.grad, closed_form_input_grad(model, w).expand(3, 5), atol=1e-9, rtol=0)
    # parameter gradient: dL/dA = a z*^T summed over the batch, a = (I - A)^{-T} H^T w
    H = model.head.weight.detach()
    a = torch.linalg.solve((torch.eye(4, dtype=torch.float64) - A).T, H.T @ w)
    torch.testing.assert_close(model.cell.A.grad, torch.outer(a, z_exact.sum(0)), atol=1e-9, rtol=0)


def small_mlp_deq(grad=None, act="tanh", seed=0):
    torch.manual_seed(seed)
    m = DEQClassifier(MLPInjection(6, 5), MLPCell(5, act=act, init_gain=0.7), LinearHead(5, 3),
                      solver=TIGHT, grad=grad or ImplicitGrad(TIGHT_BWD), input_shape=(6,)).double()
    return m


def test_ift_gradcheck_input_and_params():
    model = small_mlp_deq()
    x = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x), (x,), eps=1e-6, atol=1e-5)
    W = model.cell.W.linear.weight
    def f_of_w(wt):
        with torch.no_grad():
            W.copy_(wt)
        return model(x.detach())
    # parameter gradients through the hook vs finite differences
    x0 = x.detach()
    loss = model(x0).pow(2).sum()
    (gW,) = torch.autograd.grad(loss, W)
    eps = 1e-6
    fd = torch.zeros_like(W)
    base = W.detach().clone()
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            for sgn in (1, -1):
                pert = base.clone(); pert[i, j] += sgn * eps
                with torch.no_grad():
                    W.copy_(pert)
                    fd[i, j] += sgn * model(x0).pow(2).sum() / (2 * eps)
    with torch.no_grad():
        W.copy_(base)
    torch.testing.assert_close(gW, fd, atol=1e-6, rtol=1e-5)


def input_grad(model, x, est):
    x = x.clone().requires_grad_(True)
    with gradient(model, est):
        model(x).pow(2).sum().backward()
    return x.grad


def test_phantom_and_unrolled_approach_exact_gradient():
    model = small_mlp_deq()
    x = torch.rand(4, 6, dtype=torch.float64)
    exact = input_grad(model, x, ImplicitGrad(TIGHT_BWD))
    errs_u = [(input_grad(model, x, UnrolledGrad(steps=k)) - exact).norm().item() for k in (1, 3, 10, 40)]
    errs_p = [(input_grad(model, x, PhantomGrad(k=k, tau=0.5)) - exact).norm().item() for k in (1, 5, 20, 80)]
    assert all(a > b for a, b in zip(errs_u, errs_u[1:])), errs_u
    assert all(a > b for a, b in zip(errs_p, errs_p[1:])), errs_p
    assert errs_u[-1] < 1e-6 * exact.norm().item() + 1e-9
    assert errs_p[-1] < 1e-5 * exact.norm().item() + 1e-9
    full = input_grad(model, x, FullBackprop())
    torch.testing.assert_close(full, exact, atol=1e-8, rtol=1e-6)


def test_nograd_and_unknown_estimator():
    model = small_mlp_deq()
    x = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    with gradient(model, NoGrad()):
        out = model(x)
    # only the head's parameters remain in the graph
    assert not torch.autograd.grad(out.sum(), x, allow_unused=True)[0] is not None
    with pytest.raises(ConfigError, match="unknown gradient estimator"):
        with gradient(model, "magic"):
            pass
    with pytest.raises(ConfigError):
        UnrolledGrad(steps=0)


def test_gradient_override_is_scoped_and_mode_independent():
    model = small_mlp_deq()
    model.eval()
    assert isinstance(model.estimator, ImplicitGrad)
    with gradient(model, "phantom"):
        assert isinstance(model.estimator, PhantomGrad)
        with gradient(model, UnrolledGrad(3)):
            assert isinstance(model.estimator, UnrolledGrad)
        assert isinstance(model.estimator, PhantomGrad)
    assert isinstance(model.estimator, ImplicitGrad)
    assert not model.training
    # eval mode keeps the input gradient (the TorchDEQ trap)
    x = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(model(x).sum(), x)[0]
    assert g.abs().sum() > 0


def test_train_eval_flags_unchanged_by_any_call():
    model = zoo.build("mlp_deq", hidden=16)
    model.train()
    model.head.eval()  # a mixed configuration must be preserved exactly
    flags = {n: m.training for n, m in model.named_modules()}
    x = torch.rand(3, 1, 8, 8)
    model(x); model.run(x, record="all")
    with gradient(model, "unrolled"):
        model(x)
    attack_view(model, state=2)(x)
    attack_view(model, grad="phantom")(x).sum().backward()
    assert flags == {n: m.training for n, m in model.named_modules()}


def test_bad_inputs_raise_input_error():
    model = zoo.build("mlp_deq", hidden=8)
    with pytest.raises(InputError, match="shape"):
        model(torch.rand(2, 1, 9, 9))
    x = torch.rand(2, 1, 8, 8); x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="finite|NaN|nan"):
        model(x)
    with pytest.raises(InputError, match=r"\[0, 1\]|range"):
        model(torch.rand(2, 1, 8, 8) * 2)
    with pytest.raises(ConfigError, match="unknown option"):
        zoo.build("mlp_deq", hiden=8)
    with pytest.raises(ConfigError, match="unknown model"):
        zoo.build("resnet")


def test_nonconvergence_warning():
    import warnings
    model = zoo.build("mlp_deq", hidden=16, solver={"max_iter": 2, "tol": 1e-12}).eval()
    with pytest.warns(NonConvergenceWarning, match="did not reach tol"):
        model(torch.rand(4, 1, 8, 8))
    with warnings.catch_warnings():  # once per model: the next call only counts the event
        warnings.simplefilter("error")
        model(torch.rand(4, 1, 8, 8))
    assert model.nonconvergence_events == 2


def test_monotone_cell_unique_fixed_point_from_any_start():
    model = zoo.build("mon_deq", hidden=12, m=0.5, solver={"max_iter": 400, "tol": 1e-9, "stop_mode": "abs"}).double()
    # make it strongly non-symmetric / large so that a plain iteration of relu(Wz+u) would not converge
    with torch.no_grad():
        model.cell.A.mul_(3.0); model.cell.B.mul_(3.0)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    u = model.inject(x)
    assert model.cell.contraction_rate() < 1
    sols = []
    for s in range(4):
        z0 = 10 * torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
        res = model.solve(u, z0=z0)
        assert res.converged.all()
        sols.append(res.z)
    # contraction at rate r: ||z - z*|| <= residual / (1 - r), residual <= tol = 1e-9 (abs)
    err = 1e-9 / (1 - model.cell.contraction_rate())
    for z in sols[1:]:
        assert (z - sols[0]).norm(dim=1).max() <= 2 * err
    # it is a fixed point of the monotone DEQ equation z = relu(W z + u): with ||z - z*|| <= err
    # and relu 1-Lipschitz, ||z - relu(W z + u)|| <= err (1 + ||W||_2)
    z = sols[0]
    W_norm = float(torch.linalg.matrix_norm(model.cell.W().detach(), 2))
    gap = (z - torch.relu(z @ model.cell.W().T + u)).norm(dim=1).max()
    assert gap <= err * (1 + W_norm)
    # monotonicity: I - W >= m I
    W = model.cell.W().detach()
    sym = 0.5 * ((torch.eye(12, dtype=W.dtype) - W) + (torch.eye(12, dtype=W.dtype) - W).T)
    assert torch.linalg.eigvalsh(sym).min() >= 0.5 - 1e-9


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_trajectory_states_and_readout():
    model = zoo.build("mlp_deq", hidden=16, solver={"name": "fixed_point", "max_iter": 12, "tol": 0})
    x = torch.rand(3, 1, 8, 8)
    eq = model.run(x, record="all")
    assert [t.step for t in eq.trajectory] == list(range(12))
    z3 = eq.state(3).z
    view = attack_view(model, state=3, unroll=3)
    torch.testing.assert_close(view(x), model.readout(z3))
    # the straight-through gradient equals the gradient of the explicit 3-step unroll from z_0
    xr = x.clone().requires_grad_(True)
    g_view = torch.autograd.grad(view(xr).sum(), xr)[0]
    xr2 = x.clone().requires_grad_(True)
    u = model.inject(xr2)
    z = model.unroll(u, model.init_state(u), 3)
    g_ref = torch.autograd.grad(model.readout(z).sum(), xr2)[0]
    torch.testing.assert_close(g_view, g_ref)


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
@pytest.mark.parametrize("damping,tol", [(0.5, 0.0), (1.0, 1e-3), (0.5, 1e-3)])
def test_state_view_unrolls_the_solvers_own_steps(damping, tol):
    # fixed-point iteration with damping, and samples that stop (converge) before state k: the
    # straight-through unroll takes the solver's damped steps up to each sample's own stop, so
    # with unroll = k its gradient is that of the explicit iteration that gives z_k
    from robustdeq.attacks.intermediate import states_logits
    from robustdeq.deq.views import state_logits
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", in_shape=[1, 3, 3], hidden=6, num_classes=3, init_gain=0.9,
                      solver={"name": "fixed_point", "max_iter": 30, "tol": tol, "stop_mode": "abs",
                              "damping": damping}).double().eval()
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64)
    steps = model.run(x).stats.steps
    k = int(steps.min()) + 1 if tol > 0 else 12   # with tol: some sample stops before state k
    assert k < 30
    xr = x.clone().requires_grad_(True)
    u = model.inject(xr)
    z, zs = model.init_state(u), []
    for _ in range(k + 1):
        zs.append(z)
        z = (1 - damping) * z + damping * model.cell(z, u)
    z_k = torch.stack([zs[min(k, int(s) - 1)][b] for b, s in enumerate(steps)])
    g_ref = torch.autograd.grad(model.readout(z_k).pow(2).sum(), xr)[0]
    for logits_of in (lambda xx: attack_view(model, state=k, unroll=k)(xx),
                      lambda xx: state_logits(model, xx, k, unroll=k),
                      lambda xx: states_logits(model, xx, [k], unroll=k)[k]):
        xr2 = x.clone().requires_grad_(True)
        out = logits_of(xr2)
        torch.testing.assert_close(out, model.readout(z_k).detach(), atol=1e-12, rtol=0)
        g = torch.autograd.grad(out.pow(2).sum(), xr2)[0]
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8)


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # k plain steps, on purpose
def test_attack_view_solves_with_its_own_solver_and_leaves_the_model_alone():
    model = linear_deq()
    before = model.solver_config
    x = torch.rand(3, 5, dtype=torch.float64)
    k = 4
    view = attack_view(model, solver={"name": "fixed_point", "max_iter": k, "tol": 0.0, "select": "last"})
    # k evaluations of z <- A z + u from 0 return z_{k-1}; the implicit-gradient read-out applies f
    # once more (the step the backward hooks onto): logits = H z_k, z_k = sum_{i<k} A^i u
    A, u = model.cell.A.detach(), model.inject(x).detach()
    z, term = torch.zeros_like(u), u
    for _ in range(k):
        z, term = z + term, term @ A.T
    torch.testing.assert_close(view(x), model.readout(z), atol=1e-12, rtol=0)
    assert not torch.allclose(view(x), model(x))            # not the model's own (tight) solve
    assert model.solver_config is before and view.describe()["solver"]["max_iter"] == k
    # the intermediate-state view takes it too (state 2 of the same iteration)
    torch.testing.assert_close(attack_view(model, state=2, solver=view.solver)(x), model.readout(u + u @ A.T))
    with pytest.raises(ConfigError, match="unknown solver"):
        attack_view(model, solver={"name": "newton"})
    with pytest.raises(ConfigError, match="solver"):
        attack_view(zoo.build("weight_tied_mlp", hidden=8), solver={"name": "anderson"})


def test_weight_tied_masks_and_interface():
    m = zoo.build("weight_tied_mlp", hidden=16, depth=4, sparsity=0.5, seed=1)
    name = m.masked_names[0]
    masks = [m.mask(l, name) for l in range(4)]
    for a in masks:
        assert 0.4 < float(a.mean()) < 0.6
    assert not torch.equal(masks[0], masks[1])
    x = torch.rand(2, 1, 8, 8)
    eq = m.run(x, record="all")
    assert [t.step for t in eq.trajectory] == [0, 1, 2, 3, 4]
    # layer l uses W * M_l: check against an explicit computation
    u = m.inject(x)
    z = torch.zeros(2, 16)
    W = m.cell.W.weight
    for l in range(4):
        z = torch.tanh(z @ (W * m.mask(l, "W.linear.weight")).T + u)
    torch.testing.assert_close(eq.z, z)
    torch.testing.assert_close(eq.logits, m.readout(z))
    with pytest.raises(ConfigError, match="weight-tied"):
        with gradient(m, "ift"):
            pass
    # attack view of an intermediate layer: value and gradient of the explicit network
    v = attack_view(m, state=2, unroll=2)
    torch.testing.assert_close(v(x), m.readout(eq.state(2).z))


def test_weight_tied_masks_of_a_weight_normalised_cell_cover_the_direction_not_the_magnitude():
    # w = g v / ||v|| (weight norm): masking g would switch off whole rows of W at a layer
    from robustdeq.deq import MLPCell, WeightTied
    from robustdeq.deq.cells import ConvCell, LinearHead, MLPInjection
    torch.manual_seed(0)
    cell = MLPCell(16, norm="weight")
    m = WeightTied(MLPInjection(64, 16), cell, LinearHead(16, 10), depth=3, sparsity=0.5, seed=1)
    assert m.masked_names == ["W.linear.parametrizations.weight.original1"]
    x = torch.rand(2, 1, 8, 8)
    u, z = m.inject(x), torch.zeros(2, 16)
    g = cell.W.linear.parametrizations.weight.original0
    v = cell.W.linear.parametrizations.weight.original1
    for l in range(3):
        vm = v * m.mask(l, m.masked_names[0])
        W = g * vm / vm.norm(dim=1, keepdim=True)
        assert bool((W.abs().sum(1) > 0).all())       # no row switched off
        z = torch.tanh(z @ W.T + u)
    torch.testing.assert_close(m.run(x).z, z)
    assert ConvCell(8, norm="weight").maskable() == ["conv1.parametrizations.weight.original1",
                                                     "conv2.parametrizations.weight.original1"]
    assert MLPCell(8, norm="spectral").maskable() == ["W.linear.parametrizations.weight.original"]
    from robustdeq.deq import zoo
    names = zoo.build("mdeq").cell.maskable()
    assert names and not any(n.endswith("original0") for n in names)


@pytest.mark.integration
def test_fixed_point_and_ift_gradient_agree_with_torchdeq():
    torchdeq = pytest.importorskip("torchdeq")
    model = small_mlp_deq()
    x = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    ours = model.run(x)
    g_ours = torch.autograd.grad(ours.logits.pow(2).sum(), x)[0]
    deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=200, f_tol=1e-12, f_stop_mode="abs",
                           b_solver="anderson", b_max_iter=200, b_tol=1e-12, b_stop_mode="abs", ift=True)
    deq.train()  # torchdeq's eval mode has no gradient path to the input
    x2 = x.detach().clone().requires_grad_(True)
    u = model.inject(x2)
    zs, _ = deq(lambda z: model.cell(z, u), torch.zeros(3, 5, dtype=torch.float64))
    torch.testing.assert_close(ours.z_star, zs[-1].detach(), atol=1e-9, rtol=0)
    g_ref = torch.autograd.grad(model.readout(zs[-1]).pow(2).sum(), x2)[0]
    torch.testing.assert_close(g_ours, g_ref, atol=1e-8, rtol=1e-6)


def test_parametrised_weights_are_computed_once_per_solve():
    # spectral normalisation: the weight W / sigma is a function of the parameters; a solve
    # evaluates f up to max_iter times but computes the weight once, with the same result
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=16, norm="spectral", scale=0.9,
                      solver={"max_iter": 12, "tol": 0.0}).eval()
    x = torch.rand(4, 1, 8, 8)
    u = model.inject(x)
    param = model.cell.W.linear.parametrizations.weight[0]
    calls = []
    handle = param.register_forward_hook(lambda *a: calls.append(1))
    try:
        res = model.solve(u)
        assert res.nfe == 12 and len(calls) == 1
        calls.clear()
        W = model.cell.W.weight.detach()
        ref = get_solver(model.solver_config).solve(
            lambda z: torch.tanh(z @ W.t() + u.detach()), torch.zeros(4, 16))
        torch.testing.assert_close(res.z, ref.z)
        calls.clear()
        with parametrize.cached():   # inside a caller's cache: one computation for both solves
            model.solve(u)
            model.solve(u)
        assert len(calls) == 1
    finally:
        handle.remove()


def test_parameter_gradients_of_a_spectral_cell_flow_through_the_cached_solve():
    # the solve computes the normalised weight once without autograd; the equilibrium's
    # gradient path (f(z*, u) and the adjoint) still reaches the weight's parameters: the
    # implicit gradient equals backpropagation through a tight solve
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, norm="spectral", scale=0.8, solver=TIGHT).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    grads = []
    for est in (ImplicitGrad(TIGHT_BWD), FullBackprop()):
        model.zero_grad()
        with gradient(model, est):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append(model.cell.W.linear.parametrizations.weight.original.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


def _spectral_deq_in_train_mode(hidden=6, seed=0, cell="mlp"):
    """A float64 DEQ with a spectrally normalised cell in train mode whose power-iteration vectors
    are reset to random ones, so that each power-iteration step changes the weight visibly.
    ``cell="autograd"``: a subclass of the cell without its closed-form VJP (the adjoint's VJPs
    go through autograd)."""
    torch.manual_seed(seed)

    class AutogradMLPCell(MLPCell):
        def forward(self, z, u):
            return super().forward(z, u)
    cls = MLPCell if cell == "mlp" else AutogradMLPCell
    model = DEQClassifier(MLPInjection(64, hidden), cls(hidden, norm="spectral", scale=0.8), LinearHead(hidden, 3),
                          solver=TIGHT, grad=ImplicitGrad(TIGHT_BWD), input_shape=(1, 8, 8)).double().train()
    assert model.cell.has_vjp == (cell == "mlp")
    sns = [model.cell.W.linear.parametrizations.weight[0]]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for sn in sns:
            sn._u.copy_(torch.nn.functional.normalize(torch.randn(sn._u.shape, generator=g, dtype=sn._u.dtype), dim=0))
            sn._v.copy_(torch.nn.functional.normalize(torch.randn(sn._v.shape, generator=g, dtype=sn._v.dtype), dim=0))
    return model, sns


@pytest.mark.parametrize("est", ["ift", "phantom", "full"])
@pytest.mark.parametrize("cell", ["mlp", "autograd"])
def test_a_train_mode_call_of_a_spectral_cell_uses_one_weight(est, cell):
    # in train mode every computation of a spectrally normalised weight takes a power-iteration
    # step: one call (forward and backward) computes it once, as a plain module's forward does,
    # and z* is the fixed point of the weight the logits are read with
    import copy
    model, sns = _spectral_deq_in_train_mode(cell=cell)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    one_step = [copy.deepcopy(sn) for sn in sns]
    for ref, sn in zip(one_step, sns):   # one plain train-mode computation of the weight
        ref(model.get_parameter(_original_name(model, sn)).detach())
    calls = []
    handles = [sn.register_forward_hook(lambda *a: calls.append(1)) for sn in sns]
    try:
        est_ = {"ift": ImplicitGrad(TIGHT_BWD), "phantom": PhantomGrad(k=3), "full": FullBackprop()}[est]
        eq = model.run(x, grad=est_)
        torch.nn.functional.cross_entropy(eq.logits, torch.tensor([0, 1, 2])).backward()
        assert len(calls) == len(sns)
    finally:
        for h in handles:
            h.remove()
    for ref, sn in zip(one_step, sns):  # the power iteration advanced exactly one step
        assert torch.equal(ref._u, sn._u) and torch.equal(ref._v, sn._v)
    # the weight of the call is the one computed from the advanced vectors (eval mode: no step)
    model.eval()
    with torch.no_grad():
        u = model.inject(x)
        fz = model.cell(eq.z_star, u)
        res = (fz - eq.z_star).flatten(1).norm(dim=1)
        assert float(res.max()) <= TIGHT["tol"], res
        torch.testing.assert_close(eq.stats.residual, res, atol=1e-13, rtol=0)
        if est == "ift":
            torch.testing.assert_close(model.readout(fz), eq.logits.detach(), atol=1e-12, rtol=0)


def _original_name(model, sn):
    for name, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is not None and any(p is sn for p in plist["weight"]):
            return f"{name}.parametrizations.weight.original"
    raise AssertionError("not found")


def test_train_mode_parameter_gradients_of_a_spectral_cell_are_those_of_its_single_weight():
    # the implicit gradient of a train-mode call is the gradient of the function computed with
    # the call's one weight (the power-iteration vectors after its step): equal to an eval-mode
    # call with those vectors, and to finite differences of it
    model, (sn,) = _spectral_deq_in_train_mode(hidden=4)
    V = model.cell.W.linear.parametrizations.weight.original
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])

    def loss():
        return torch.nn.functional.cross_entropy(model(x), y)
    loss().backward()
    g_train = V.grad.clone()
    assert g_train.abs().sum() > 0
    model.eval()                  # the same weight: the vectors after the train-mode step
    model.zero_grad()
    loss().backward()
    g_eval = V.grad.clone()
    torch.testing.assert_close(g_train, g_eval, atol=1e-10, rtol=1e-8)
    eps, fd = 1e-6, torch.zeros_like(V)
    base = V.detach().clone()
    with torch.no_grad():
        for i in range(V.shape[0]):
            for j in range(V.shape[1]):
                for sgn in (1, -1):
                    V.copy_(base)
                    V[i, j] += sgn * eps
                    fd[i, j] += sgn * loss() / (2 * eps)
        V.copy_(base)
    torch.testing.assert_close(g_eval, fd, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_bound_cell_map_equals_the_module_call_and_yields_to_hooks_and_subclasses(act):
    # the solve's map z -> f(z, u) skips the module call per evaluation: the same values, bit for
    # bit (so a solve is unchanged); a forward hook or a subclass that changes the map gets the
    # module call (the hook runs at every evaluation)
    torch.manual_seed(0)
    cell = MLPCell(6, act=act, norm="spectral", scale=0.9).eval()
    u, z = torch.randn(3, 6), torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(cell.bind_input(u)(z), cell(z, u))
        z3 = torch.randn(3, 6, 1)[..., 0]
        assert torch.equal(cell.bind_input(u[:1])(z3), cell(z3, u[:1]))   # broadcast u: the F.linear path
    calls = []
    h = cell.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            assert torch.equal(cell.bind_input(u)(z), cell(z, u))
        assert len(calls) == 2
    finally:
        h.remove()

    class Shifted(MLPCell):
        def forward(self, z, u):
            return super().forward(z, u) + 1.0
    sc = Shifted(6, act=act)
    with torch.no_grad():
        assert torch.equal(sc.bind_input(u)(z), sc(z, u))
    # cell_map: the bound map where the cell has one, else the module call
    from robustdeq.deq.cells import cell_map
    lin = LinearCell(torch.eye(6) * 0.5)
    with torch.no_grad():
        assert torch.equal(cell_map(cell, u)(z), cell(z, u))
        assert torch.equal(cell_map(lin, u)(z), lin(z, u))
    # the model's solve counts each evaluation through a hook: the fast map is not used then
    model = zoo.build("mlp_deq", hidden=6, solver={"max_iter": 7, "tol": 0.0}).eval()
    n = []
    h = model.cell.register_forward_hook(lambda *a: n.append(1))
    try:
        res = model.solve(model.inject(torch.rand(2, 1, 8, 8)))
        assert res.nfe == 7 and len(n) == 7
    finally:
        h.remove()
