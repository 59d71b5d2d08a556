"""Certified radii must survive attacks: PGD inside a certified radius never changes a prediction.

Models are trained for a few dozen Adam steps on digits (module-scoped fixtures).
"""
import warnings

import pytest
import torch

from robustdeq.certify import certify
from robustdeq.data import load_digits
from robustdeq.deq import zoo

from robustdeq.config import SolverConfig
from robustdeq.deq.grad import ImplicitGrad

# training is fast and loose (phantom gradient); attacks then run with a strict solver and the exact
# (implicit) gradient, so that the attacked function is the equilibrium map the radius certifies
TRAIN = {"solver": {"name": "anderson", "max_iter": 30}, "grad": "phantom"}
ATTACK_SOLVER = SolverConfig(name="anderson", max_iter=60, tol=1e-5, stop_mode="abs")


@pytest.fixture(scope="module")
def digits():
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    return xtr, ytr, xte[:48], yte[:48]


@pytest.fixture(scope="module")
def train(fit_minibatches):
    """``train(model, x, y, steps=60, lr=1e-2, seed=0)``: briefly trained, set up for the attacks."""
    def _train(model, x, y, steps=60, lr=1e-2, seed=0):
        fit_minibatches(model, x, y, steps, lr=lr, seed=seed)
        model.solver_config = ATTACK_SOLVER
        model.grad = ImplicitGrad()
        return model.eval()
    return _train


@pytest.fixture(scope="module")
def lip_model(digits, train):
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits
    return train(zoo.build("mlp_deq", hidden=32, norm="spectral", scale=0.5, **TRAIN), xtr, ytr)


@pytest.fixture(scope="module")
def mon_model(digits, train):
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits
    return train(zoo.build("mon_deq", hidden=32, **TRAIN), xtr, ytr, steps=80)


def _margin_loss(logits, y):
    other = logits.clone()
    other[torch.arange(len(y)), y] = -float("inf")
    return other.max(1).values - logits.gather(1, y[:, None]).squeeze(1)   # > 0: misclassified


def pgd(model, x, y, eps, *, norm="L2", steps=20, restarts=1, seed=0):
    """Per-sample-eps PGD on the margin loss with random starts; returns (success (B,), x_adv)."""
    g = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    shape = (B,) + (1,) * (x.dim() - 1)
    e = eps.view(shape)
    alpha = 2.5 * e / steps
    success = torch.zeros(B, dtype=torch.bool)
    best = x.clone()
    for _ in range(restarts):
        d = torch.randn(x.shape, generator=g)
        if norm == "L2":
            d = d / d.flatten(1).norm(dim=1).view(shape) * e * torch.rand(shape, generator=g)
        else:
            d = (2 * torch.rand(x.shape, generator=g) - 1) * e
        xa = (x + d).clamp(0, 1)
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = _margin_loss(model(xa), y)
            grad, = torch.autograd.grad(loss.sum(), xa)
            with torch.no_grad():
                if norm == "L2":
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
                    delta = xa + alpha * step - x
                    n = delta.flatten(1).norm(dim=1).view(shape)
                    delta = delta * torch.clamp(e / n.clamp_min(1e-12), max=1.0)
                else:
                    delta = (xa + alpha * grad.sign() - x).clamp(-e, e)
                xa = (x + delta).clamp(0, 1)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            won = model(xa).argmax(1) != y
        best = torch.where((won & ~success).view(shape), xa, best)
        success |= won
    return success, best


@pytest.mark.parametrize("which", ["lip", "mon"])
def test_pgd_never_succeeds_inside_the_certified_l2_radius(which, request, digits):
    model = request.getfixturevalue("lip_model" if which == "lip" else "mon_model")
    _, _, x, y = digits
    rep = certify(model, x, y, eps_l2=(0.1,), methods=["lipschitz"])
    radius = torch.tensor([r.radius for r in rep.results], dtype=torch.float32)
    correct = torch.tensor([bool(r.details["correct"]) for r in rep.results])
    assert correct.float().mean() > 0.75
    cert = radius > 0
    # non-trivial radii: most correct samples are certified, with a useful size
    assert cert[correct].float().mean() > 0.8
    assert float(radius[cert].mean()) > 0.05
    # PGD at the certified radius (minus a tiny slack) on the certified samples finds nothing
    xs, ys, rs = x[cert], y[cert], radius[cert] * (1 - 1e-3)
    ok, x_adv = pgd(model, xs, ys, rs, norm="L2")
    assert not bool(ok.any())
    assert bool(((x_adv - xs).flatten(1).norm(dim=1) <= rs * (1 + 1e-5)).all())
    # the same attack is not toothless: far outside the certified radius it does succeed
    ok_far, _ = pgd(model, xs[:16], ys[:16], torch.full_like(rs[:16], 2.0), norm="L2", steps=10)
    assert ok_far.float().mean() > 0.3


@pytest.mark.parametrize("which", ["lip", pytest.param("mon", marks=pytest.mark.slow)])
def test_pgd_linf_never_succeeds_on_linf_certified_samples(which, request, digits):
    _, _, x, y = digits
    model = request.getfixturevalue("lip_model" if which == "lip" else "mon_model")
    eps = 0.02
    rep = certify(model, x, y, eps_l2=(), eps_linf=(eps,), methods=["lipschitz", "ibp"])
    cert = torch.tensor([r.details["linf"]["0.02"]["certified"] for r in rep.results])
    assert cert.float().mean() > 0.3
    ok, x_adv = pgd(model, x[cert], y[cert], torch.full((int(cert.sum()),), eps), norm="Linf")
    assert not bool(ok.any())
    assert float((x_adv - x[cert]).abs().max()) <= eps + 1e-6


def test_ibp_certificate_alone_survives_pgd(digits, train):
    # a tanh MLP-DEQ with ||W||_inf small: the interval map itself contracts, so IBP (not only the
    # L2 radius) certifies samples
    torch.manual_seed(1)
    xtr, ytr, x, y = digits
    model = zoo.build("mlp_deq", hidden=32, norm="spectral", scale=0.3, **TRAIN)
    model = train(model, xtr, ytr, steps=60)
    rep = certify(model, x, y, eps_l2=(), eps_linf=(0.01,), methods=["ibp"])
    ibp = torch.tensor([r.details["linf"]["0.01"]["ibp"] for r in rep.results])
    assert ibp.float().mean() > 0.2
    ok, _ = pgd(model, x[ibp], y[ibp], torch.full((int(ibp.sum()),), 0.01), norm="Linf")
    assert not bool(ok.any())


def test_certify_auto_on_trained_models_reports_consistent_summary(lip_model, mon_model, digits):
    _, _, x, y = digits
    for model in (lip_model, mon_model):
        rep = certify(model, x[:30], y[:30])
        s = rep.summary
        assert s["contraction_fraction"] == 1.0 and s["stable_fraction"] == 1.0
        acc = s["certified_accuracy_l2"]
        assert acc["0.1"] >= acc["0.25"] >= acc["0.5"]
        assert acc["0.1"] <= s["clean_accuracy"]
        assert all(r.details["local"]["exact"] and r.details["local"]["sigma"] < 1 for r in rep.results)
        # the per-pair radius is never smaller than the global-constant radius M / (sqrt(2) L)
        assert all(r.radius >= r.details["radius_global"] * (1 - 1e-12) for r in rep.results)
