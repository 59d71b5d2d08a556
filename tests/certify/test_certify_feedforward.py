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
