"""The interval map shared by IBP certification (float64, outward-rounded) and IBP training
(differentiable): the training fixed point against the certification enclosure, Monte-Carlo
containment of true fixed points, the implicit gradient against finite differences, the
existence/uniqueness condition, and feed-forward interval propagation."""
import itertools

import pytest
import torch

from robustdeq.certify._util import float64_copy
from robustdeq.certify.ibp import ibp_certify, ibp_certify_feedforward
from robustdeq.certify.interval import (abs_contraction, check_interval_condition, interval_fixed_point,
                                        interval_map, sequential_margins)
from robustdeq.deq import zoo
from robustdeq.deq.cells import IntervalScaling, MonotoneCell
from robustdeq.errors import ConfigError

TIGHT = {"name": "fixed_point", "max_iter": 500, "tol": 1e-6, "stop_mode": "abs"}
EXACT = {"name": "fixed_point", "max_iter": 2000, "tol": 1e-13, "stop_mode": "abs"}


def _model(act="relu", scale=0.7, hidden=12, seed=0, stem=False):
    torch.manual_seed(seed)
    if stem:  # a convolutional stem before the equilibrium layer (its box propagated layer by layer)
        return zoo.build("stem_deq", in_shape=(1, 4, 4), hidden=hidden, channels=3, blocks=1, pool=2, act=act,
                         scale=scale, mean=0.3, std=0.4, solver=TIGHT).eval()
    return zoo.build("mlp_deq", in_shape=(1, 4, 4), hidden=hidden, act=act, norm="interval", scale=scale,
                     mean=0.3, std=0.4, solver=TIGHT).eval()


def _monotone(seed=0):
    torch.manual_seed(seed)
    m = zoo.build("mon_deq", in_shape=(1, 4, 4), hidden=10, m=1.0, solver=TIGHT).eval()
    with torch.no_grad():  # small A, B: |W| small, so the splitting's |M| contracts
        m.cell.A.mul_(0.2)
        m.cell.B.mul_(0.2)
    m.prepare()
    return m


def _training_box(model, x, eps, tol=1e-7):
    imap = interval_map(model, differentiable=True)
    with torch.no_grad():
        z0 = model.run(x).z_star
    return interval_fixed_point(imap, x, eps, z0=z0, tol=tol)


@pytest.mark.parametrize("kind", ["relu", "tanh", "monotone", "stem"])
def test_training_fixed_point_equals_certification_enclosure(kind):
    model = _monotone() if kind == "monotone" else _model(stem=True) if kind == "stem" else _model(act=kind)
    x = torch.rand(6, 1, 4, 4)
    y = torch.randint(0, 10, (6,))
    eps = 0.05
    lo, hi, info = _training_box(model, x, eps)
    r = ibp_certify(model, x, y, eps, iters=3000, tol=1e-14)
    assert r.applicable, r.reason
    # the float64 enclosure (outward-rounded) and the float32 fixed point agree up to float32 rounding
    assert torch.allclose(lo.double(), r.z_lo, atol=2e-6) and torch.allclose(hi.double(), r.z_hi, atol=2e-6)
    assert float((hi - lo).detach().mean()) > 1e-3  # a box of some width, not a point
    assert info["rate"] < 1


@pytest.mark.parametrize("kind", ["relu", "tanh", "stem"])
def test_training_box_contains_the_fixed_points_of_sampled_inputs(kind):
    model = _model(act="relu" if kind == "stem" else kind, scale=0.9, seed=1, stem=kind == "stem")
    work = float64_copy(model)
    x = torch.rand(3, 1, 4, 4)
    eps = 0.08
    lo, hi, _ = _training_box(model, x, eps, tol=1e-6)
    g = torch.Generator().manual_seed(0)
    for b in range(x.shape[0]):
        xb = x[b:b + 1].double()
        # random points of the box and some of its corners (where interval bounds are tightest)
        pts = [xb + eps * (2 * torch.rand(xb.shape, generator=g, dtype=torch.float64) - 1) for _ in range(40)]
        pts += [xb + eps * (2 * torch.randint(0, 2, xb.shape, generator=g).double() - 1) for _ in range(40)]
        xs = torch.cat(pts).clamp(0, 1)
        with torch.no_grad():
            z = work.solve(work.inject(xs), solver=EXACT).z
        assert bool((z >= lo[b].double() - 1e-6).all()) and bool((z <= hi[b].double() + 1e-6).all())


def test_implicit_gradient_matches_finite_differences():
    model = _model(scale=0.6, hidden=8, seed=2).double()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    eps = 0.05
    with torch.no_grad():
        z0 = model.run(x).z_star
    c = torch.randn(2, 4, 8, dtype=torch.float64)

    def objective():
        imap = interval_map(model, differentiable=True)
        lo, hi, _ = interval_fixed_point(imap, x, eps, z0=z0, tol=1e-13, adjoint_tol=1e-13, iters=2000,
                                         adjoint_iters=2000)
        low = imap.margins(lo, hi, y, rounding=False)
        low = torch.where(torch.isinf(low), torch.zeros_like(low), low)
        return (c[0] * lo).sum() + (c[1] * hi).sum() + low.sum()
    params = [model.injection.linear.weight, model.cell.W.linear.parametrizations.weight.original]
    grads = torch.autograd.grad(objective(), params)
    g = torch.Generator().manual_seed(1)
    for p, gr in zip(params, grads):
        for _ in range(2):
            d = torch.randn(p.shape, generator=g, dtype=torch.float64)
            h = 1e-6
            with torch.no_grad():
                p.add_(h * d)
                fp = float(objective())
                p.sub_(2 * h * d)
                fm = float(objective())
                p.add_(h * d)
            fd = (fp - fm) / (2 * h)
            assert abs(fd - float((gr * d).sum())) <= 1e-5 * max(1.0, abs(fd))


def test_interval_scaling_bounds_the_absolute_weight():
    g = torch.Generator().manual_seed(0)
    for n in (3, 10, 40):
        V = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.rand(n, n, generator=g, dtype=torch.float64) ** 3
        W = IntervalScaling()(V)
        assert float(torch.linalg.matrix_norm(W.abs(), ord=2)) <= 1 + 1e-12
        rho = float(torch.linalg.eigvals(W.abs()).abs().max())
        assert rho <= abs_contraction(W).rate <= 1 + 1e-9  # Collatz-Wielandt bound is an upper bound


def test_violating_parameterisation_is_refused():
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", in_shape=(1, 4, 4), hidden=12, act="relu", init_gain=0.95).eval()
    imap = interval_map(model, differentiable=True)
    # ||W||_2 < 1 (a contraction) but |W| is not: the interval fixed point is not guaranteed
    assert float(torch.linalg.matrix_norm(imap.M.detach(), ord=2)) < 1
    with pytest.raises(ConfigError, match=r"mlp cell's interval map is not a contraction \(rho\(\|M\|\)"):
        check_interval_condition(imap)
    from robustdeq.defenses.objectives import make_objective
    with pytest.raises(ConfigError, match="norm='interval'"):
        make_objective("ibp", eps=0.1)(model, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
    # the same cell behind a convolutional stem: refused the same way
    torch.manual_seed(0)
    stem = zoo.build("stem_deq", in_shape=(1, 4, 4), hidden=32, channels=3, pool=2, norm="none", init_gain=0.95)
    assert abs_contraction(interval_map(stem).M).rate > 1
    with pytest.raises(ConfigError, match="norm='interval'"):
        make_objective("ibp", eps=0.1)(stem, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
    # a monotone cell whose |M| does not contract is refused as well
    torch.manual_seed(0)
    mon = zoo.build("mon_deq", in_shape=(1, 4, 4), hidden=10, m=0.05).eval()
    with torch.no_grad():
        mon.cell.B.mul_(6.0)
    mon.prepare()
    assert isinstance(mon.cell, MonotoneCell)
    with pytest.raises(ConfigError, match="monotone cell's interval map is not a contraction"):
        check_interval_condition(interval_map(mon, differentiable=True))


def test_feedforward_bounds_exact_for_one_layer_and_sound_for_a_cnn():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5)).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([0, 2, 4])
    eps = 0.05
    low = sequential_margins(lin, x, y, eps, rounding=True)
    W, b = lin[1].weight.detach(), lin[1].bias.detach()
    for i in range(3):
        for j in range(5):
            if j == y[i]:
                continue
            c = W[y[i]] - W[j]
            exact = float(c @ x[i].flatten() - eps * c.abs().sum() + b[y[i]] - b[j])  # box inside [0, 1]
            assert abs(float(low[i, j]) - exact) < 1e-9 and float(low[i, j]) <= exact
    cnn = zoo.build("ff_cnn", in_shape=(1, 6, 6), channels=4, blocks=1, pool=3, norm="none", hidden=8).eval()
    xs = torch.rand(2, 1, 6, 6)
    ys = torch.tensor([1, 3])
    low = sequential_margins(cnn.net, xs, ys, 0.1, rounding=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        xp = (xs + 0.1 * (2 * torch.rand(xs.shape, generator=g) - 1)).clamp(0, 1)
        with torch.no_grad():
            out = cnn(xp).double()
        marg = out.gather(1, ys[:, None]) - out
        marg[torch.arange(2), ys] = float("inf")
        assert bool((marg >= low - 1e-5).all())
    r = ibp_certify_feedforward(cnn, xs, ys, 0.0)
    pred = cnn(xs).argmax(1)
    assert r.applicable and torch.equal(r.certified, pred == ys)  # eps 0: certified iff correct
    gn = zoo.build("ff_cnn", in_shape=(1, 6, 6), channels=4, blocks=1, pool=3).eval()
    assert not ibp_certify_feedforward(gn, xs, ys, 0.1).applicable  # GroupNorm: no interval rule


def test_corners_enumerated_for_a_tiny_input_stay_inside():
    """Every vertex of a 4-pixel box (16 inputs) has its fixed point inside the training box."""
    torch.manual_seed(3)
    model = zoo.build("mlp_deq", in_shape=(1, 2, 2), hidden=6, act="relu", norm="interval", scale=0.8,
                      solver=TIGHT).eval()
    work = float64_copy(model)
    x = torch.rand(1, 1, 2, 2) * 0.6 + 0.2
    eps = 0.1
    lo, hi, _ = _training_box(model, x, eps, tol=1e-7)
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64).view(16, 1, 2, 2)
    with torch.no_grad():
        z = work.solve(work.inject(x.double() + eps * corners), solver=EXACT).z
    assert bool((z >= lo.double() - 1e-6).all()) and bool((z <= hi.double() + 1e-6).all())
    # and the box is not loose by orders of magnitude: its width is comparable to the spread of z*
    spread = (z.max(0).values - z.min(0).values).max()
    assert float((hi - lo).detach().max()) < 50 * float(spread) + 1e-6
