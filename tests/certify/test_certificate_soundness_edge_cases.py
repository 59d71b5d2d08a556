"""Certificates that once claimed more than holds, each reduced to a tiny model with a known answer."""
import warnings

import pytest
import torch
from torch import nn

from robustdeq.certify import certify
from robustdeq.certify.interval import propagate_box, sequential_margins
from robustdeq.certify.lipschitz import lipschitz_bound
from robustdeq.deq.cells import LinearHead, MLPCell, MLPInjection, Normalize
from robustdeq.deq.model import DEQClassifier
from robustdeq.deq.zoo import FeedForward
from robustdeq.errors import CertificationWarning, ConfigError


def _quiet_certify(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return certify(*args, **kw)


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_ibp_follows_the_convolutions_padding_mode(mode):
    """IBP through a Conv2d with a non-zero padding mode enclosed the zero-padded network, and
    certified a sample that a perturbation inside eps breaks."""
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode=mode, bias=False)
    lin = nn.Linear(9, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0             # out(0, 0) reads the padding at (-1, -1)
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1, 0] = 1.0
        lin.bias[0] = 0.5                         # logit0 - logit1 = 0.5 - out(0, 0)
    model = FeedForward(nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin), (1, 3, 3))
    x = torch.zeros(1, 1, 3, 3)
    src = {"circular": (2, 2), "reflect": (1, 1), "replicate": (0, 0)}[mode]
    x[0, 0, src[0], src[1]] = 0.45                # out(0, 0) = 0.45: class 0, margin 0.05
    y = torch.tensor([0])
    assert int(model(x).argmax()) == 0
    xa = x.clone()
    xa[0, 0, src[0], src[1]] = 0.55               # Linf distance 0.1: class 1
    assert int(model(xa).argmax()) == 1
    rep = _quiet_certify(model, x, y, eps_linf=[0.1])
    assert rep.results[0].details["linf"]["0.1"]["certified"] is False


def test_ibp_box_of_padded_convolutions_contains_the_activations():
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
              nn.Conv2d(3, 2, 3, padding="same", padding_mode="circular"), nn.Tanh()]
    x = torch.rand(4, 2, 5, 5, dtype=torch.float64)
    eps = 0.05
    lo, hi = propagate_box(layers, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), rounding=True)
    net = nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            xp = (x + (2 * torch.rand(x.shape, generator=g, dtype=torch.float64) - 1) * eps).clamp(0, 1)
            h = net(xp)
            assert bool((h >= lo).all()) and bool((h <= hi).all())


def test_ibp_follows_flatten_start_and_end_dims():
    """propagate_box flattened from dimension 1 whatever nn.Flatten's start_dim / end_dim said: a
    network flattening to (C, H*W) and mixing H*W by a Linear failed on a shape mismatch (a
    RuntimeError, neither a certificate nor a ConfigError)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(start_dim=2), nn.Linear(16, 3),
                        nn.ReLU(), nn.Flatten(start_dim=-2), nn.Linear(6, 2)).double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(1)
    exact = (logits.gather(1, y[:, None]) - logits.gather(1, 1 - y[:, None])).squeeze(1)
    low = sequential_margins(net, x, y, 0.0, rounding=True).min(1).values
    assert torch.allclose(low, exact, rtol=1e-8, atol=1e-9) and bool((low <= exact).all())
    eps = 0.05
    low = sequential_margins(net, x, y, eps, rounding=True).min(1).values
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(20):
            xp = (x + (2 * torch.rand(x.shape, generator=g, dtype=torch.float64) - 1) * eps).clamp(0, 1)
            lp = net(xp)
            assert bool(((lp.gather(1, y[:, None]) - lp.gather(1, 1 - y[:, None])).squeeze(1) >= low).all())
    # flattening the batch dimension into the features, or a last Linear not on (batch, features)
    for bad, why in ((nn.Sequential(nn.Flatten(start_dim=0), nn.Linear(80, 2)), "flattens the batch dimension"),
                     (nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(16, 2)), "last nn.Linear")):
        with pytest.raises(ConfigError, match=why):
            sequential_margins(bad.double(), x, y, eps, rounding=True)


def _per_channel_model(input_shape):
    torch.manual_seed(0)
    inj = MLPInjection(3 * 4 * 4, 8)
    inj.normalize = Normalize((0.5, 0.5, 0.5), (1.0, 1.0, 0.05))   # the last channel scaled by 20
    return DEQClassifier(inj, MLPCell(8, norm="spectral", scale=0.5), LinearHead(8, 3),
                         solver={"name": "fixed_point", "max_iter": 200, "tol": 1e-10, "stop_mode": "abs"},
                         input_shape=input_shape).eval()


def test_per_channel_normalisation_without_input_shape_gets_no_radius():
    """Without input_shape the Lipschitz bound took the first channel's std for every feature
    (too small a constant here): L2 radii that a perturbation of the last channel broke."""
    model = _per_channel_model(None)
    x = torch.rand(6, 3, 4, 4)
    bound = lipschitz_bound(model)
    assert not bound.available and "per-channel" in bound.reason
    rep = _quiet_certify(model, x, None, eps_l2=[0.01], eps_linf=[0.002])
    for r in rep.results:
        assert r.radius == 0.0
        assert r.details["linf"]["0.002"]["certified"] is False


def test_ibp_is_announced_unavailable_where_it_then_does_not_apply():
    """Per-channel statistics without a (C, H, W) input_shape: IBP returns "not applicable", and
    global_certificates["available"]["ibp"] said "yes" (and no warning named it)."""
    model = _per_channel_model(None)
    x = torch.rand(2, 3, 4, 4)
    with pytest.warns(CertificationWarning, match=r"no certified radius from .*ibp \(interval bounds need"):
        rep = certify(model, x, None, eps_l2=[], eps_linf=[0.002], methods=["ibp"])
    avail = rep.global_certificates["available"]["ibp"]
    assert avail.startswith("no: ") and "per-channel statistics need the model's input_shape" in avail
    assert rep.global_certificates["ibp"].startswith("not applicable")
    # with the input shape IBP applies, and is announced so
    rep = _quiet_certify(_per_channel_model((3, 4, 4)), x, None, eps_l2=[], eps_linf=[0.002], methods=["ibp"])
    assert rep.global_certificates["available"]["ibp"] == "yes"
    assert not rep.global_certificates["ibp"].startswith("not applicable")


def test_per_channel_normalisation_with_input_shape_bounds_every_channel():
    """With input_shape (C, H, W) the per-channel std is used: the logit Lipschitz bound covers
    the gain of a perturbation of the last channel alone."""
    model = _per_channel_model((3, 4, 4))
    bound = lipschitz_bound(model)
    assert bound.available
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    work = model.double()
    d = torch.zeros_like(x)
    d[0, 2] = 1e-4 * torch.randn(4, 4, dtype=torch.float64)
    with torch.no_grad():
        ratio = (work(x + d) - work(x)).norm() / d.norm()
    assert float(ratio) <= bound.lip_logits


def test_bracket_does_not_count_ibp_verdicts_that_certify_refused():
    """The robustness bracket took the raw IBP verdict (``linf[eps]["ibp"]``) as a certificate,
    also where certify() refused it because the model's own solve does not reach the certified
    fixed point: certified <= robust then claimed a lower bound for a computation no
    certificate covers."""
    from robustdeq.deq import zoo
    from robustdeq.eval.bracket import _base_certificates
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, norm="interval", scale=0.5,
                      solver={"name": "fixed_point", "max_iter": 1, "tol": 1e-12, "stop_mode": "abs"}).eval()
    x = torch.rand(4, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = model(x).argmax(1)
        rep = certify(model, x, y, eps_linf=[1e-4], methods=["lipschitz", "ibp"])
        base = _base_certificates(model, x, y, [1e-4], "Linf", ("lipschitz", "ibp"), [])
    assert all(r.details["linf"]["0.0001"]["ibp"] for r in rep.results)          # IBP alone holds
    assert not any(r.details["linf"]["0.0001"]["certified"] for r in rep.results)  # refused
    assert base[1e-4] == [None] * 4


def test_ibp_refuses_a_layer_subclass_that_overrides_forward():
    """IBP matched layers by isinstance and read their weights: a subclass overriding forward (a
    Linear scaling its output, a ReLU shifting its input) was bounded as the plain layer, whose
    box need not enclose what the subclass computes."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return 100 * super().forward(x)

    class Shifted(nn.ReLU):
        def forward(self, x):
            return super().forward(x - 0.5)

    torch.manual_seed(0)
    x = torch.rand(3, 1, 2, 2)
    for net, name in ((nn.Sequential(nn.Flatten(), Scaled(4, 2)), "Scaled: it subclasses nn.Linear"),
                      (nn.Sequential(nn.Flatten(), nn.Linear(4, 4), Shifted(), nn.Linear(4, 2)),
                       "Shifted: it subclasses nn.ReLU")):
        with pytest.raises(ConfigError, match=name + " but overrides forward"):
            _quiet_certify(FeedForward(net, (1, 2, 2)), x, torch.zeros(3, dtype=torch.long), eps_linf=[0.01])
    # a parametrised layer keeps its class's forward: followed as before
    lin = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 2))
    rep = _quiet_certify(FeedForward(nn.Sequential(nn.Flatten(), lin), (1, 2, 2)).eval(), x, None, eps_linf=[0.0])
    assert all(r.details["linf"]["0"]["certified"] for r in rep.results)


def test_ibp_refuses_a_stem_that_is_not_a_plain_sequential():
    from robustdeq.certify import ibp_certify
    from robustdeq.deq import zoo

    class Doubled(nn.Sequential):
        def forward(self, x):
            return super().forward(2 * x)

    torch.manual_seed(0)
    model = zoo.build("stem_deq", in_shape=(1, 4, 4), num_classes=2, hidden=4, channels=2, pool=1).eval()
    x = torch.rand(2, 1, 4, 4)
    y = model(x).argmax(1)
    assert ibp_certify(model, x, y, 0.01).applicable
    model.injection.stem = Doubled(*model.injection.stem)
    r = ibp_certify(model, x, y, 0.01)
    assert not r.applicable and "plain nn.Sequential" in r.reason and "Doubled" in r.reason
