"""``certify`` on a feed-forward network (the explicit baseline of certified training): Linf
certificates by IBP through its layers, in the report format of the DEQ certificates."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from robustdeq.certify import certify, certify_feedforward
from robustdeq.certify.ibp import ibp_certify_feedforward
from robustdeq.deq import zoo
from robustdeq.deq.zoo import FeedForward
from robustdeq.errors import CertificationWarning, ConfigError


def _linear(seed=0):
    torch.manual_seed(seed)
    return FeedForward(nn.Sequential(nn.Flatten(), nn.Linear(9, 4)), (1, 3, 3)).eval()


def _exact_linf_certified(model, x, y, eps):
    """Closed form for a linear classifier: the minimum of (w_y - w_j) x + b_y - b_j over the box
    [x - eps, x + eps] & [0, 1] takes each coordinate at the end point its coefficient prefers."""
    W = model.net[1].weight.detach().double().numpy()
    b = model.net[1].bias.detach().double().numpy()
    xf = x.flatten(1).double().numpy()
    lo, hi = np.clip(xf - eps, 0, 1), np.clip(xf + eps, 0, 1)
    out = []
    for i in range(xf.shape[0]):
        ok = True
        for j in range(W.shape[0]):
            if j == int(y[i]):
                continue
            c = W[int(y[i])] - W[j]
            m = np.where(c > 0, c * lo[i], c * hi[i]).sum() + b[int(y[i])] - b[j]
            ok = ok and m > 1e-9
        out.append(ok)
    return out


def test_certify_routes_a_feedforward_network_to_ibp_and_matches_the_closed_form():
    model = _linear()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 3, 3, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 4  # some wrong labels: never certified
    for eps in (0.01, 0.05):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CertificationWarning)
            rep = certify(model, x, y, eps_linf=(eps,), batch_size=16)
        got = [r.details["linf"][f"{eps:g}"]["certified"] for r in rep.results]
        assert got == _exact_linf_certified(model, x, y, eps)
        assert 0 < sum(got) < 40
        acc = rep.summary["certified_accuracy_linf"][f"{eps:g}"]
        assert acc == sum(got) / 40 <= rep.summary["clean_accuracy"]
        assert rep.summary["certified_accuracy_l2"] == {"0.1": 0.0, "0.25": 0.0, "0.5": 0.0}
        assert rep.global_certificates["lipschitz"]["available"] is False
        assert "IBP" in rep.to_markdown() or "ibp" in rep.to_markdown().lower()


def test_feedforward_certificates_agree_with_ibp_and_warn_about_l2():
    torch.manual_seed(0)
    cnn = zoo.build("ff_cnn", in_shape=(1, 6, 6), channels=4, blocks=1, pool=3, norm="none", hidden=8).eval()
    x = torch.rand(8, 1, 6, 6)
    with torch.no_grad():
        y = cnn(x).argmax(1)
    with pytest.warns(CertificationWarning, match="no certified L2 radius"):
        rep = certify_feedforward(cnn, x, y, eps_linf=(0.0, 0.002))
    for e in (0.0, 0.002):
        ref = ibp_certify_feedforward(cnn, x, y, e)
        assert [r.details["linf"][f"{e:g}"]["ibp"] for r in rep.results] == ref.certified.tolist()
    assert all(r.details["linf"]["0"]["certified"] for r in rep.results)  # eps 0, own predictions
    # without labels: the predictions are certified (fractions)
    rep = certify(cnn, x, None, eps_linf=(0.002,), eps_l2=())
    assert "certified_fraction_linf" in rep.summary


def test_what_a_feedforward_network_cannot_get_is_refused_by_name():
    model = _linear()
    x = torch.rand(2, 1, 3, 3)
    with pytest.raises(ConfigError, match="eps_linf"):
        certify(model, x, eps_l2=(0.1,))
    with pytest.raises(ConfigError, match="fixed point"):
        certify(model, x, eps_linf=(0.1,), methods=["lipschitz"])
    with pytest.raises(ConfigError, match=r"\['deploy_tol'\].*fixed point"):
        certify(model, x, eps_linf=(0.1,), deploy_tol=0.1)
    gn = zoo.build("ff_cnn", in_shape=(1, 6, 6), channels=4, blocks=1, pool=3).eval()  # GroupNorm
    with pytest.raises(ConfigError, match="GroupNorm"):
        certify(gn, torch.rand(2, 1, 6, 6), eps_linf=(0.1,), eps_l2=())

    class Other(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4]
    with pytest.raises(ConfigError, match="feed-forward"):
        certify(Other(), x, eps_linf=(0.1,))


class _Normalising(nn.Module):
    """A wrapper whose forward does more than its ``.net`` (normalises first)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
        with torch.no_grad():
            self.net[1].weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.net[1].bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x):
        return self.net((x - 0.45) / 0.01)   # logit_1 - logit_0 = 100 (x - 0.45) - 0.5


class _ScaledFeedForward(FeedForward):
    def forward(self, x):
        return 100 * self.net(x)


class _DoubledSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(2 * x)


def test_a_module_that_only_has_a_sequential_net_is_refused_not_certified_through_it():
    """IBP of .net alone certified the wrapper at Linf 0.01 though x + 0.01 flips its class."""
    model = _Normalising().eval()
    x, y = torch.full((1, 1), 0.45), torch.tensor([0])
    assert model(x + 0.01).argmax(1).item() == 1              # broken inside the ball
    for call in (lambda: certify(model, x, y, eps_linf=[0.01]),
                 lambda: certify_feedforward(model, x, y, eps_linf=[0.01]),
                 lambda: ibp_certify_feedforward(model, x, y, 0.01)):
        with pytest.raises(ConfigError, match=r"_Normalising's forward is not that of nn.Sequential or "
                                              r"FeedForward.*Pass the nn.Sequential itself, or FeedForward"):
            call()
    inner = nn.Sequential(nn.Flatten(), nn.Linear(9, 2))
    x3 = torch.rand(2, 1, 3, 3)
    for bad, why in ((_ScaledFeedForward(inner, (1, 3, 3)), "_ScaledFeedForward's forward is not that of"),
                     (_DoubledSequential(nn.Flatten(), nn.Linear(9, 2)), "overrides nn.Sequential.forward"),
                     (FeedForward(_DoubledSequential(nn.Flatten(), nn.Linear(9, 2)), (1, 3, 3)),
                      "the .net of FeedForward is a _DoubledSequential"),
                     (FeedForward(nn.ModuleList([nn.Linear(9, 2)]), (1, 3, 3)),
                      "the .net of FeedForward is a ModuleList")):
        with pytest.raises(ConfigError, match=why):
            certify(bad, x3, eps_linf=[0.01], eps_l2=())
    with pytest.raises(ConfigError, match="IBP training needs a feed-forward network"):
        from robustdeq.defenses import make_objective
        objective = make_objective("ibp", eps=0.1, kappa=0.0, kappa_start=0.0)
        objective(_Normalising(), torch.rand(2, 1), torch.tensor([0, 1]))


def test_the_sequential_and_feedforward_around_it_are_certified_alike():
    from robustdeq.certify.feedforward import is_feedforward
    seq = nn.Sequential(nn.Flatten(), nn.Linear(9, 3))
    x = torch.rand(6, 1, 3, 3)
    with torch.no_grad():
        y = seq(x).argmax(1)
    assert is_feedforward(seq) and is_feedforward(FeedForward(seq, (1, 3, 3)))
    assert not is_feedforward(_Normalising()) and not is_feedforward(zoo.build("mlp_deq", hidden=4))
    a = ibp_certify_feedforward(seq, x, y, 0.01)
    b = ibp_certify_feedforward(FeedForward(seq, (1, 3, 3)), x, y, 0.01)
    assert torch.equal(a.lower_margin, b.lower_margin)
