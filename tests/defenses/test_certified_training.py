"""Certified training objectives: IBP (Gowal et al. 2018) through the DEQ's interval fixed point
and a feed-forward network's layers, Lipschitz-margin training (Tsuzuku et al. 2018)."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustdeq.attacks import PGD
from robustdeq.certify import certify
from robustdeq.certify.ibp import ibp_certify_feedforward
from robustdeq.certify.lipschitz import lipschitz_bound, logit_lipschitz
from robustdeq.certify.oracles import linear_deq
from robustdeq.defenses.objectives import make_objective
from robustdeq.defenses.recipes import recipe
from robustdeq.deq import zoo
from robustdeq.errors import ConfigError

SOLVER = {"name": "fixed_point", "max_iter": 100, "tol": 1e-6, "stop_mode": "abs"}


def _interval_deq(seed=0, hidden=16, in_shape=(1, 8, 8), scale=0.7):
    torch.manual_seed(seed)
    return zoo.build("mlp_deq", in_shape=in_shape, hidden=hidden, act="relu", norm="interval", scale=scale,
                     mean=0.3, std=0.4, solver=SOLVER)


def _closed_form_linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, ord=2)
    model = linear_deq(A, in_shape=(1, 3, 3), num_classes=4, std=0.5, mean=0.2).double().eval()
    return model, A


def _np_ce(logits, y):
    z = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


@pytest.mark.parametrize("pairwise", [False, True])
def test_lipschitz_margin_loss_matches_its_closed_form_on_a_linear_deq(pairwise):
    model, A = _closed_form_linear()
    x = torch.rand(5, 1, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    eps = 0.3
    loss, sc = make_objective("lipschitz_margin", eps=eps, pairwise=pairwise)(model, x, y)
    # closed form in numpy: z* = (I - A)^-1 u, logits affine in x with matrix Wo K U / s
    An, U = A.numpy(), model.injection.linear.weight.detach().numpy()
    b, Wo = model.injection.linear.bias.detach().numpy(), model.head.linear.weight.detach().numpy()
    bo = model.head.linear.bias.detach().numpy()
    K = np.linalg.inv(np.eye(6) - An)
    u = ((x.flatten(1).numpy() - 0.2) / 0.5) @ U.T + b
    logits = (u @ K.T) @ Wo.T + bo
    J = Wo @ K @ U / 0.5                                  # x -> logits
    yn = y.numpy()
    if pairwise:
        shift = np.array([[np.linalg.norm(J[yi] - J[j]) for j in range(4)] for yi in yn]) * eps
    else:
        shift = math.sqrt(2) * eps * np.linalg.norm(J, 2) * (1 - np.eye(4)[yn])
    assert float(loss.detach()) == pytest.approx(_np_ce(logits + shift, yn), rel=1e-9)
    assert sc["lipschitz"] == pytest.approx(np.linalg.norm(J, 2), rel=1e-9)


@pytest.mark.parametrize("name", ["spectral", "monotone"])
def test_differentiable_lipschitz_bound_is_certifys_bound(name):
    torch.manual_seed(0)
    if name == "spectral":
        model = zoo.build("mlp_deq", in_shape=(1, 8, 8), hidden=16, norm="spectral", scale=0.9).eval()
    else:
        model = zoo.build("mon_deq", in_shape=(1, 8, 8), hidden=16, m=0.5).eval()
        model.prepare()
    lip, pair = logit_lipschitz(model)
    ref = lipschitz_bound(model)
    assert ref.available
    assert float(lip.detach()) == pytest.approx(ref.lip_logits, rel=1e-5)
    assert torch.allclose(pair.double(), ref.pair, rtol=1e-5)
    lip.backward()  # differentiable in the weights
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in
               (model.injection.linear.weight, model.head.linear.weight))


def test_lipschitz_margin_refuses_a_model_without_a_bound():
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", in_shape=(1, 8, 8), hidden=16, init_gain=1.5)
    with pytest.raises(ConfigError, match=r"\|\|W\|\|_2 = .* >= 1"):
        make_objective("lipschitz_margin", eps=0.5)(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="needs a DEQ"):
        make_objective("lipschitz_margin", eps=0.5)(zoo.build("ff_mlp"), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))


def test_certified_training_recognises_a_deq_by_certifys_own_interface(monkeypatch):
    """The objectives kept their own copy of the DEQ interface; they now ask certify's one
    (:func:`robustdeq.certify._util.has_deq_interface`), so the two cannot drift apart: a model
    certify would not take as a DEQ is not trained as one."""
    from robustdeq.certify import _util
    model, x, y = _interval_deq(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    make_objective("ibp", eps=0.01, kappa=0.5, kappa_start=0.5)(model, x, y)          # a DEQ
    monkeypatch.setattr(_util, "DEQ_INTERFACE", _util.DEQ_INTERFACE + ("not_an_attribute",))
    with pytest.raises(ConfigError, match="needs a feed-forward network"):
        make_objective("ibp", eps=0.01, kappa=0.5, kappa_start=0.5)(model, x, y)
    with pytest.raises(ConfigError, match="needs a DEQ"):
        make_objective("lipschitz_margin", eps=0.5)(model, x, y)


def test_ibp_at_radius_zero_is_the_clean_cross_entropy():
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    for model in (_interval_deq(), zoo.build("ff_cnn", channels=4, blocks=1, norm="none")):
        obj = make_objective("ibp", eps=0.0, kappa=0.0, kappa_start=0.0)
        loss, sc = obj(model, x, y)
        with torch.no_grad():
            ce = F.cross_entropy(model(x), y)
        # the worst-case logits of a point box are the logits shifted by logit_y (CE is shift-invariant)
        assert float(loss.detach()) == pytest.approx(float(ce.detach()), abs=2e-5)


def test_ibp_schedules_and_options():
    obj = make_objective("ibp", eps=0.2, warmup=2, ramp=4, kappa=0.5)
    seen = []
    for t in range(8):
        obj.set_train_step(t)
        seen.append((obj.current_eps, obj.current_kappa))
    assert seen[:2] == [(0.0, 1.0), (0.0, 1.0)]
    assert seen[2] == pytest.approx((0.05, 0.875)) and seen[5] == pytest.approx((0.2, 0.5))
    assert seen[7] == pytest.approx((0.2, 0.5))
    with pytest.raises(ConfigError, match="unknown"):
        make_objective("ibp", eps=0.1, epsilon=0.2)
    with pytest.raises(ConfigError, match="kappa"):
        make_objective("ibp", kappa=1.5)
    with pytest.raises(ConfigError, match="warmup"):
        recipe("ibp", warmup=-1)
    with pytest.raises(ConfigError, match="unknown"):
        recipe("lipschitz-margin", radius=1.0)
    assert recipe("ibp", eps=0.1).objective.describe()["name"] == "ibp"
    assert recipe("lipschitz-margin", eps=1.0, ramp=10).objective.ramp == 10


def _digits(n):
    from robustdeq.data import load_dataset
    x, y = load_dataset("digits", "train")
    return x[:n], y[:n]


def _train(model, objective, x, y, steps, lr=5e-3, batch=64):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(steps):
            objective.set_train_step(t)
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            loss, _ = objective(model, x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _pgd_flips(model, x, y, eps, norm="Linf"):
    atk = PGD(model, eps=eps, norm=norm, steps=20, restarts=2, loss="margin", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adv = atk(x, y)
        return int((model(adv).argmax(1) != y).sum())


def test_ibp_trained_deq_certificates_survive_pgd():
    x, y = _digits(400)
    eps = 0.05
    obj = make_objective("ibp", eps=eps, ramp=15, tol=1e-4, adjoint_tol=1e-4)
    model = _train(_interval_deq(hidden=16), obj, x, y, steps=30, lr=1e-2)
    xs, ys = x[:80], y[:80]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = certify(model, xs, ys, eps_linf=(eps,), eps_l2=(), methods=["ibp"])
    cert = torch.tensor([bool(r.details["linf"][f"{eps:g}"]["ibp"]) and r.details["linf"][f"{eps:g}"]["certified"]
                         for r in rep.results])
    assert int(cert.sum()) >= 15, int(cert.sum())  # training made the certificate useful
    assert _pgd_flips(model, xs[cert], ys[cert], eps) == 0


def test_ibp_trained_cnn_certificates_survive_pgd():
    x, y = _digits(400)
    eps = 0.05
    torch.manual_seed(0)
    cnn = zoo.build("ff_cnn", channels=8, blocks=1, pool=4, norm="none")
    cnn = _train(cnn, make_objective("ibp", eps=eps, ramp=15), x, y, steps=30, lr=1e-2)
    xs, ys = x[:80], y[:80]
    r = ibp_certify_feedforward(cnn, xs, ys, eps)
    assert int(r.certified.sum()) >= 15, int(r.certified.sum())
    assert _pgd_flips(cnn, xs[r.certified], ys[r.certified], eps) == 0


def test_lipschitz_margin_training_makes_radii_certifiable_and_they_survive_pgd():
    x, y = _digits(400)

    def deq():
        torch.manual_seed(0)
        return zoo.build("mlp_deq", in_shape=(1, 8, 8), hidden=32, norm="spectral", scale=0.5, mean=0.3, std=0.4)
    plain = _train(deq(), make_objective("ce"), x, y, steps=30, lr=1e-2)
    lm = _train(deq(), make_objective("lipschitz_margin", eps=0.5, ramp=15), x, y, steps=30, lr=1e-2)
    xs, ys = x[:80], y[:80]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_plain = sum(r.radius > 0.3 for r in certify(plain, xs, ys, eps_l2=(0.3,), methods=["lipschitz"]).results)
        cert = torch.tensor([r.radius > 0.3 for r in certify(lm, xs, ys, eps_l2=(0.3,), methods=["lipschitz"]).results])
    assert int(cert.sum()) >= 20 and int(cert.sum()) >= n_plain + 15, (int(cert.sum()), n_plain)
    assert _pgd_flips(lm, xs[cert], ys[cert], 0.3, norm="L2") == 0
