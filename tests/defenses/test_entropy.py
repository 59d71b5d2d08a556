"""Input-entropy reduction (robustdeq.defenses.entropy): lowers the prediction entropy, stays in the
box and the radius, deterministic, batch independent; adaptive views checked against finite
differences (through-updates) and the model's own gradient at the purified input (BPDA)."""
import pytest
import torch
from torch import nn

from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.defenses import EntropyDefense, prediction_entropy
from robustdeq.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def trained():
    """A tiny DEQ trained for a few dozen steps on digits, and a test batch."""
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=32, solver={"max_iter": 60})
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(60):
        idx = torch.randint(0, x.shape[0], (64,))
        loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return m, xt[:96], yt[:96]


def tiny64(seed=0):
    torch.manual_seed(seed)
    return zoo.build("mlp_deq", in_shape=(6,), hidden=5, num_classes=3, init_gain=0.8).double()


def test_prediction_entropy_closed_form():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]],
                          dtype=torch.float64)
    p = torch.softmax(logits[2], 0)
    expect = torch.tensor([torch.log(torch.tensor(4.0, dtype=torch.float64)), 0.0, -(p * p.log()).sum()],
                          dtype=torch.float64)
    torch.testing.assert_close(prediction_entropy(logits), expect, atol=1e-12, rtol=0)


# the briefly trained DEQ leaves a sample or two above tol in its 60-iteration solves: not the subject
@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_defense_lowers_entropy_and_respects_box_and_radius(trained):
    m, x, y = trained
    d = EntropyDefense(m)
    base = EntropyDefense(m, step_size=0.0)  # the same solver schedule without input updates
    with torch.no_grad():
        res = d.run(x, record=True)
        h_def = prediction_entropy(res.logits).mean()
        h_base = prediction_entropy(base(x)).mean()
        h_model = prediction_entropy(m(x)).mean()
        h_model_at_purified = prediction_entropy(m(res.x_hat)).mean()
    assert float(h_def) < 0.9 * float(h_base), (float(h_def), float(h_base))
    assert float(h_def) < float(h_model)
    assert float(h_model_at_purified) < float(h_model)
    for b, a in zip(res.entropy_before, res.entropy_after):  # every round lowers the mean entropy
        assert float(a.mean()) < float(b.mean())
    assert len(res.entropy_before) == d.rounds - 1  # the last round's updates are skipped
    for xh in (res.x_hat, res.x_final):
        assert float(xh.min()) >= 0.0 and float(xh.max()) <= 1.0
        assert float((xh - x).abs().max()) <= d.radius + 1e-6
    assert float((res.x_hat - x).abs().max()) > 0.5 * d.radius  # it did move
    assert len(res.states) == d.rounds * d.solver_steps
    torch.testing.assert_close(d.purify(x), res.x_hat)
    # the defense keeps the model's accuracy on clean digits (it is not a trivial output)
    acc_def = float((res.logits.argmax(1) == y).float().mean())
    acc = float((m(x).argmax(1) == y).float().mean())
    assert acc_def >= acc - 0.05


def test_declared_properties_and_determinism(trained):
    m, x, _ = trained
    d = EntropyDefense(m, rounds=2, inner_steps=3)
    assert d.randomized is False and d.dynamic is True and d.differentiable is True
    assert d.input_shape == m.input_shape
    with torch.no_grad():
        a, b = d(x[:8]), d(x[:8])
    assert torch.equal(a, b)
    assert d.describe()["rounds"] == 2


def test_batch_independence(trained):
    m, x, _ = trained
    d = EntropyDefense(m, rounds=3, inner_steps=4)
    with torch.no_grad():
        full = d(x[:6])
        single = torch.cat([d(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory,readout,solver", [("keep", "last-but-one", None),
                                                    ("reset", "last", {"name": "broyden"}),
                                                    ("reset", "last-but-one", {"name": "fixed_point"})])
def test_options_run_and_reduce_entropy(trained, memory, readout, solver):
    m, x, _ = trained
    d = EntropyDefense(m, memory=memory, readout=readout, solver=solver, rounds=3, inner_steps=5)
    base = EntropyDefense(m, memory=memory, readout=readout, solver=solver, rounds=3, inner_steps=5,
                          step_size=0.0)
    with torch.no_grad():
        assert float(prediction_entropy(d(x)).mean()) < float(prediction_entropy(base(x)).mean())


def test_views_forward_values_and_nonzero_input_gradients(trained):
    m, x, _ = trained
    d = EntropyDefense(m, rounds=2, inner_steps=3)
    views = d.adaptive_views()
    assert set(views) == {"through-updates", "bpda"}
    xb = x[:5]
    with torch.no_grad():
        ref = d(xb)
    for name, view in views.items():
        assert isinstance(view, nn.Module)
        xx = xb.clone().requires_grad_(True)
        out = view(xx)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6, msg=name)
        out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
        assert float(xx.grad.abs().sum()) > 0, name


def test_bpda_gradient_is_the_model_gradient_at_the_purified_input(trained):
    m, x, _ = trained
    d = EntropyDefense(m, rounds=2, inner_steps=3)
    xb = x[:4]
    w = torch.randn(4, 10)
    xx = xb.clone().requires_grad_(True)
    (d.adaptive_views()["bpda"](xx) * w).sum().backward()
    xh = d.purify(xb).requires_grad_(True)
    (m(xh) * w).sum().backward()
    torch.testing.assert_close(xx.grad, xh.grad, atol=1e-6, rtol=1e-5)


def _fd_grad(fn, x, w, eps=1e-6):
    g = torch.zeros_like(x)
    flat = g.view(-1)
    for i in range(x.numel()):
        xp, xm = x.clone(), x.clone()
        xp.view(-1)[i] += eps
        xm.view(-1)[i] -= eps
        with torch.no_grad():
            flat[i] = ((fn(xp) * w).sum() - (fn(xm) * w).sum()) / (2 * eps)
    return g


@pytest.mark.parametrize("rounds,readout", [(1, "last"), (2, "last-but-one"), (2, "last")])
def test_through_updates_gradient_matches_finite_differences_smooth(rounds, readout):
    """sign=False: the procedure is smooth; the through-updates view differentiates the update
    direction too (second order) and must match central differences of the defense."""
    m = tiny64()
    d = EntropyDefense(m, rounds=rounds, solver_steps=2, inner_steps=1 if rounds == 1 else 2,
                       step_size=0.5, radius=0.45, readout=readout, sign=False,
                       solver={"name": "anderson", "tol": 0.0})
    torch.manual_seed(1)
    x = 0.3 + 0.4 * torch.rand(2, 6, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64)
    xx = x.clone().requires_grad_(True)
    (d.adaptive_views()["through-updates"](xx) * w).sum().backward()
    fd = _fd_grad(d, x, w)
    torch.testing.assert_close(xx.grad, fd, atol=1e-7, rtol=1e-5)
    # the plain forward holds the direction constant: a different (partial) derivative
    x2 = x.clone().requires_grad_(True)
    (d(x2) * w).sum().backward()
    assert float((x2.grad - fd).abs().max()) > 1e-5


@pytest.mark.parametrize("radius", [0.45, 0.004])
def test_through_updates_gradient_matches_finite_differences_sign(radius):
    """sign=True (the paper): the map is piecewise smooth (the sign is locally constant); away from
    sign flips the gradient of the defense, through the view or its own forward, equals central
    differences. radius=0.004 < step makes every update end on the ball's boundary x +- r."""
    m = tiny64(seed=2)
    d = EntropyDefense(m, rounds=2, solver_steps=2, inner_steps=2, step_size=0.01, radius=radius,
                       solver={"name": "anderson", "tol": 0.0})
    torch.manual_seed(3)
    x = 0.3 + 0.4 * torch.rand(2, 6, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64)
    fd = _fd_grad(d, x, w)
    for mod in (d.adaptive_views()["through-updates"], d):
        xx = x.clone().requires_grad_(True)
        (mod(xx) * w).sum().backward()
        torch.testing.assert_close(xx.grad, fd, atol=1e-7, rtol=1e-5)
    xh = d.purify(x)
    assert float((xh - x).abs().max()) <= radius + 1e-12
    if radius < d.step_size:
        torch.testing.assert_close((xh - x).abs(), torch.full_like(x, radius))


def test_rejects_models_without_a_steppable_solver_and_bad_options(trained):
    m, x, _ = trained
    with pytest.raises(ConfigError, match="steppable"):
        EntropyDefense(zoo.build("weight_tied_mlp", hidden=8))
    with pytest.raises(ConfigError, match="steppable"):
        EntropyDefense(zoo.build("ff_mlp", hidden=8))
    for kw, msg in ((dict(rounds=0), "rounds"), (dict(inner_steps=-1), "inner_steps"),
                    (dict(solver_steps=1.5), "solver_steps"), (dict(step_size=-1.0), "step_size"),
                    (dict(radius=-0.1), "radius"), (dict(readout="first"), "readout"),
                    (dict(memory="forever"), "memory"), (dict(sign=1), "sign"),
                    (dict(rounds=1), "rounds >= 2"), (dict(solver={"nme": "anderson"}), "nme")):
        with pytest.raises(ConfigError, match=msg):
            EntropyDefense(m, **kw)
    with pytest.raises(InputError):
        EntropyDefense(m)(x[:2] * 2.0)
