"""Certificates recognise a DEQ's parts by what they compute, not by isinstance alone: a subclass
of a recognised class that overrides its forward (or a method the bound reads) gets no
certificate of the base class (a certificate for another function), and forward hooks, which the
bounds do not see, are said (a CertificationWarning and a report entry)."""
import warnings

import pytest
import torch
from torch import nn

from robustdeq.certify import certify, contraction_certificate, ibp_certify, lipschitz_bound
from robustdeq.certify.interval import interval_map
from robustdeq.deq import zoo
from robustdeq.deq.cells import LinearCell, LinearHead, MLPCell, MLPInjection
from robustdeq.deq.model import DEQClassifier
from robustdeq.deq.zoo import FeedForward
from robustdeq.errors import CertificationWarning, ConfigError

TIGHT = {"name": "fixed_point", "max_iter": 400, "tol": 1e-12, "stop_mode": "abs"}


def _quiet_certify(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return certify(*args, **kw)


class LoudCell(LinearCell):
    def forward(self, z, u):
        return super().forward(z, 10 * u)


class LoudInjection(MLPInjection):
    def forward(self, x):
        return 10 * super().forward(x)


class LoudHead(LinearHead):
    def forward(self, z):
        return 10 * super().forward(z)


class LoudReadout(DEQClassifier):
    def readout(self, z):
        return 10 * super().readout(z)


_CHANGED = {"cell": ("LoudCell", "LinearCell"), "injection": ("LoudInjection", "MLPInjection"),
            "head": ("LoudHead", "LinearHead"), "model": ("LoudReadout", "DEQClassifier")}


def _linear_deq(changed=None):
    """A linear DEQ (||A||_2 = 0.5) of 4 inputs, 3 states, 2 classes; ``changed`` names the part
    that is a subclass scaling its output by 10 (a function 10 times steeper than the base's)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    inj = (LoudInjection if changed == "injection" else MLPInjection)(4, 3)
    cell = (LoudCell if changed == "cell" else LinearCell)(A)
    head = (LoudHead if changed == "head" else LinearHead)(3, 2)
    cls = LoudReadout if changed == "model" else DEQClassifier
    return cls(inj, cell, head, solver=TIGHT, input_shape=(1, 2, 2)).double().eval()


def _margin(model, x):
    xr = x.clone().requires_grad_(True)
    lg = model(xr)
    g = lg[:, 0] - lg[:, 1]
    (c,) = torch.autograd.grad(g.sum(), xr)
    return g.detach(), c


@pytest.mark.parametrize("part", list(_CHANGED))
def test_a_part_overriding_forward_gets_no_certificate_of_its_base_class(part):
    """The model is affine in x: it breaks at the L2 distance margin / ||grad||. The bounds of the
    base classes (read from the same weights) are 10 times too small, so the radius they give is
    10 times that distance: the old code certified a radius inside which the model breaks."""
    model = _linear_deq(part)
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    # a head bias that leaves class 0 a margin breaking at L2 distance 0.05
    g, c = _margin(model, x)
    with torch.no_grad():
        model.head.linear.bias[0] += 1.0
    k = float(_margin(model, x)[0] - g)          # d margin / d bias_0 (1, or 10 through a loud head)
    with torch.no_grad():
        model.head.linear.bias[0] += (0.05 * float(c.norm()) - float(g)) / k - 1.0
    g, c = _margin(model, x)
    dist = float(g / c.norm())
    assert dist == pytest.approx(0.05, rel=1e-6)
    x_adv = x - 1.01 * dist * c / c.norm()
    with torch.no_grad():
        assert int(model(x).argmax()) == 0 and int(model(x_adv).argmax()) == 1   # broken at 1.01 dist
    # what the base classes' bound certifies for this model (the old code's radius): 10 x dist
    base = _linear_deq(None)
    base.load_state_dict(model.state_dict())
    old = lipschitz_bound(base)
    assert float(g / old.pair[0, 1]) > 5 * dist
    # the certificate is unavailable, with a reason naming the class and the overridden method
    name, base_name = _CHANGED[part]
    method = "readout" if part == "model" else "forward"
    with pytest.warns(CertificationWarning, match=rf"{name} subclasses {base_name} but overrides {method}"):
        rep = certify(model, x, torch.tensor([0]), eps_l2=[0.05], eps_linf=[0.03])
    avail = rep.global_certificates["available"]
    assert avail["lipschitz"].startswith("no: ") and name in avail["lipschitz"] and method in avail["lipschitz"]
    assert avail["ibp"].startswith("no: ") and name in avail["ibp"]
    assert rep.results[0].radius == 0.0
    assert rep.summary["certified_accuracy_l2"]["0.05"] == 0.0
    assert rep.results[0].details["linf"]["0.03"]["certified"] is False
    # the base model, with the same weights, is certified (the refusal is the subclass's)
    brep = _quiet_certify(base, x, None, eps_l2=[0.01])
    assert brep.global_certificates["available"]["lipschitz"] == "yes" and brep.results[0].radius > 0


def test_certified_training_refuses_a_changed_part():
    """IBP and Lipschitz-margin training read the same bounds: their loss would bound another
    function than the model's."""
    from robustdeq.certify.lipschitz import logit_lipschitz
    from robustdeq.defenses.objectives import make_objective
    model = _linear_deq("head").float().train()
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="LoudHead subclasses LinearHead but overrides forward"):
        make_objective("ibp", eps=0.01, kappa=0.5, kappa_start=0.5)(model, x, y)
    with pytest.raises(ConfigError, match="LoudHead subclasses LinearHead but overrides forward"):
        logit_lipschitz(model)
    make_objective("ibp", eps=0.01, kappa=0.5, kappa_start=0.5)(_linear_deq(None).float().train(), x, y)


class PreShift(MLPCell):
    def _pre(self, z, u):
        return super()._pre(z, u) + 0.5


class RowSum(MLPCell):
    def weight_matrix(self):
        return 0.5 * super().weight_matrix()


class Observed(MLPCell):
    """Adds a method, overrides nothing the bounds read: still an MLPCell."""

    def describe(self):
        return "observed"


def _mlp_deq(cell_cls):
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=6, norm="interval", scale=0.5, solver=TIGHT).double().eval()
    cell = cell_cls(6, act="tanh", norm="interval", scale=0.5)
    cell.load_state_dict(model.cell.state_dict())
    model.cell = cell.double().eval()
    return model


@pytest.mark.parametrize("cell_cls, method", [(PreShift, "_pre"), (RowSum, "weight_matrix")])
def test_an_mlp_cell_changing_what_the_bound_reads_is_refused_by_every_certificate(cell_cls, method):
    model = _mlp_deq(cell_cls)
    cert = contraction_certificate(model)
    assert not cert.certified and f"{cell_cls.__name__} subclasses MLPCell but overrides {method}" in cert.reason
    bound = lipschitz_bound(model)
    assert not bound.available and method in bound.reason
    with pytest.raises(ConfigError, match=f"model.cell: {cell_cls.__name__} subclasses MLPCell but overrides {method}"):
        interval_map(model)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    r = ibp_certify(model, x, torch.zeros(2, dtype=torch.long), 0.01)
    assert not r.applicable and cell_cls.__name__ in r.reason
    # a subclass that only adds a method keeps every certificate
    plain = _mlp_deq(Observed)
    assert contraction_certificate(plain).certified and lipschitz_bound(plain).available
    assert ibp_certify(plain, x, plain(x).argmax(1), 0.01).applicable


def test_a_changed_cell_that_declares_its_lipschitz_constant_is_certified_by_it():
    class Declared(LoudCell):
        def lipschitz_z(self):
            return 0.5

    cert = contraction_certificate(Declared(0.5 * torch.eye(3, dtype=torch.float64)))
    assert cert.certified and cert.method == "declared by the cell"
    cert = contraction_certificate(LoudCell(0.5 * torch.eye(3, dtype=torch.float64)))
    assert not cert.certified and "LoudCell subclasses LinearCell but overrides forward" in cert.reason


def test_a_layer_inside_an_injection_or_head_overriding_forward_is_refused():
    class Bent(nn.Linear):
        def forward(self, x):
            return torch.tanh(super().forward(x))

    model = _linear_deq(None)
    model.head.linear = Bent(3, 2).double()
    assert not lipschitz_bound(model).available
    assert "model.head.linear: Bent subclasses nn.Linear but overrides forward" in lipschitz_bound(model).reason
    model = _linear_deq(None)
    model.injection.linear = Bent(4, 3).double()
    with pytest.raises(ConfigError, match="model.injection.linear: Bent subclasses nn.Linear"):
        interval_map(model)


def test_a_convolution_overriding_conv_forward_in_a_stem_is_refused():
    class Doubled(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return 2 * super()._conv_forward(x, w, b)

    torch.manual_seed(0)
    model = zoo.build("stem_deq", in_shape=(1, 4, 4), num_classes=2, hidden=4, channels=2, pool=1).eval()
    old = model.injection.stem[0]
    conv = Doubled(1, 2, 3, padding=1)
    conv.load_state_dict(old.state_dict())
    model.injection.stem[0] = conv
    x = torch.rand(2, 1, 4, 4)
    r = ibp_certify(model, x, torch.zeros(2, dtype=torch.long), 0.01)
    assert not r.applicable and "Doubled subclasses nn.Conv2d but overrides _conv_forward" in r.reason


def test_a_separation_head_is_affine_only_with_its_own_forward():
    """The LyaDEQ separation head was recognised by its attributes (features, separation,
    classifier): a subclass overriding forward, or any module with such attributes, was read as
    ``classifier(separation(features(z)))``."""
    from robustdeq.certify.lipschitz import head_affine
    from robustdeq.defenses.lyapunov import SeparationHead

    class Loud(SeparationHead):
        def forward(self, z):
            return 10 * super().forward(z)

    class Lookalike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.separation, self.classifier = nn.Flatten(), nn.Linear(4, 4, bias=False), nn.Linear(4, 2)

        def forward(self, z):
            return 10 * self.classifier(self.separation(self.features(z)))

    class M(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

    assert head_affine(M(SeparationHead(nn.Flatten(), 4, 2))) is not None
    assert head_affine(M(Loud(nn.Flatten(), 4, 2))) is None
    assert head_affine(M(Lookalike())) is None


# ------------------------------------------------------------------------------- forward hooks
def test_forward_hooks_are_warned_and_recorded_in_the_report():
    model = _linear_deq(None)
    x = torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64)
    seen = []
    h1 = model.head.linear.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    h2 = model.register_forward_pre_hook(lambda m, a: None)
    try:
        with pytest.warns(CertificationWarning, match=r"runs forward hooks: .*head\.linear \(forward hook\)"):
            rep = certify(model, x, None, eps_l2=[0.01])
    finally:
        h1.remove()
        h2.remove()
    hooks = rep.global_certificates["hooks"]
    assert hooks["modules"] == {"": ["forward pre-hook"], "head.linear": ["forward hook"]}
    assert hooks["global"] == [] and "without its forward hooks" in hooks["note"]
    assert "- Forward hooks (`DEQClassifier`, `head.linear`): " in rep.to_markdown()
    assert rep.global_certificates["available"]["lipschitz"] == "yes"   # observing hooks: not refused
    assert seen
    rep = _quiet_certify(model, x, None, eps_l2=[0.01])
    assert "hooks" not in rep.global_certificates
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificationWarning)
        certify(model, x, None, eps_l2=[])                            # no hook, no warning


def test_global_module_hooks_are_warned_and_recorded():
    from torch.nn.modules.module import register_module_forward_hook
    model = _linear_deq(None)
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    handle = register_module_forward_hook(lambda m, a, out: None)
    try:
        with pytest.warns(CertificationWarning, match=r"every module \(global forward hook\)"):
            rep = certify(model, x, None, eps_l2=[0.01])
    finally:
        handle.remove()
    assert rep.global_certificates["hooks"]["global"] == ["global forward hook"]


def test_forward_hooks_on_a_feedforward_network_are_warned_and_recorded():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model = FeedForward(net, (1, 2, 2))
    h = net[1].register_forward_hook(lambda m, a, out: None)
    try:
        with pytest.warns(CertificationWarning, match=r"net\.1 \(forward hook\)"):
            rep = certify(model, torch.rand(2, 1, 2, 2), None, eps_l2=[], eps_linf=[0.01])
    finally:
        h.remove()
    assert rep.global_certificates["hooks"]["modules"] == {"net.1": ["forward hook"]}


def test_the_bracket_notes_forward_hooks():
    from robustdeq.eval.bracket import _base_certificates
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model = FeedForward(net, (1, 2, 2))
    x = torch.rand(3, 1, 2, 2)
    y = model(x).argmax(1)
    h = net[1].register_forward_hook(lambda m, a, out: None)
    notes = []
    try:
        with pytest.warns(CertificationWarning, match=r"the bracket: FeedForward runs forward hooks: net\.1"):
            out = _base_certificates(model, x, y, [0.0], "Linf", ("ibp",), notes)
        deq = _linear_deq(None)
        xd = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
        h2 = deq.head.register_forward_hook(lambda m, a, out: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _base_certificates(deq, xd, deq(xd).argmax(1), [0.01], "L2", ("lipschitz",), notes)
        h2.remove()
    finally:
        h.remove()
    assert out == {0.0: ["ibp"] * 3}                   # observing hooks: certified as before
    assert notes[0].startswith("bracket: forward hooks (net.1): ") and "without its forward hooks" in notes[0]
    assert notes[1].startswith("bracket: forward hooks (head): ")
