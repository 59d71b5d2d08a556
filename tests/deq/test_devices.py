"""GPU readiness: every model of the zoo, every attack, every training recipe, the inference-time
defense and every certificate runs on the device of its inputs and agrees with the CPU.

The ``cuda`` cases are marked ``gpu`` (skipped without a CUDA device; ``benchmarks/gpu.sh`` runs
them); the same tests on the ``cpu`` device are marked ``slow``: they check the tests themselves
(and the device plumbing: results on the inputs' device, dtype kept) where no GPU is available.
"""
from __future__ import annotations

import copy

import pytest
import torch

from robustdeq.deq import zoo

DEVICES = [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)]
EPS = 0.1

# small options per model (8x8 inputs, a few channels): every name of the zoo
SMALL = {
    "conv_deq": dict(channels=4, groups=2), "ff_cnn": dict(channels=4, groups=2),
    "stem_deq": dict(hidden=16, channels=4),
    "ff_mlp": dict(hidden=16), "lyadeq": dict(hidden=16, icnn_hidden=(16, 16)),
    "mdeq": dict(in_shape=(1, 8, 8), channels=(4, 8), groups=2, stem_stride=1, pool=2),
    "mdeq_single": dict(in_shape=(1, 8, 8), channels=4, groups=2, stem_stride=1, pool=2),
    "mlp_deq": dict(hidden=16), "mon_deq": dict(hidden=16),
    "weight_tied_conv": dict(channels=4, groups=2, depth=3), "weight_tied_mlp": dict(hidden=16, depth=3),
}


def _model(name):
    torch.manual_seed(0)
    return zoo.build(name, **SMALL[name]).eval()


def _data(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def test_every_zoo_model_has_small_options():
    from robustdeq.registry import MODELS
    assert sorted(SMALL) == sorted(n for n in MODELS.names() if MODELS.is_builtin(n))


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # conv_deq: untrained
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_forward_and_backward_on_device(device, name):
    model = _model(name)
    x, y = _data()
    with torch.no_grad():
        ref = model(x)
    m = copy.deepcopy(model).to(device)
    xd, yd = x.to(device), y.to(device)
    with torch.no_grad():
        out = m(xd)
    assert out.device.type == device and out.dtype == x.dtype
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-4)
    m.train()
    torch.nn.functional.cross_entropy(m(xd), yd).backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(g.device.type == device and bool(torch.isfinite(g).all()) for g in grads)


ATTACKS = [
    ("fgsm", {}), ("pgd", dict(steps=3)), ("pgd", dict(steps=3, method="exact")),
    ("pgd", dict(steps=3, method="joint")), ("pgd", dict(steps=3, norm="L2", eps=0.5)),
    ("state", dict(steps=3, states=2)), ("jiio", dict(iters=6)),
    ("torchattack", dict(attack="PGD", steps=3)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,params", ATTACKS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(ATTACKS)])
def test_attack_on_device_stays_in_ball(device, name, params):
    from robustdeq import attacks
    model = _model("mlp_deq").to(device)
    x, y = _data(8)
    x, y = x.to(device), y.to(device)
    p = dict(eps=EPS, seed=0)
    p.update(params)
    if name == "torchattack":
        p.pop("seed")
    x_adv = attacks.build(name, model, **p)(x, y)
    assert x_adv.device.type == device and x_adv.dtype == x.dtype and x_adv.shape == x.shape
    d = (x_adv - x).flatten(1)
    bound = d.norm(dim=1) if p.get("norm") == "L2" else d.abs().amax(dim=1)
    assert float(bound.max()) <= p["eps"] * (1 + 1e-5) + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_autoattack_on_device(device):
    from robustdeq.attacks import AutoAttack
    model = _model("mlp_deq").to(device)
    x, y = _data(4)
    x_adv = AutoAttack(model, eps=EPS, version="custom", attacks=["apgd-ce"], seed=0)(
        x.to(device), y.to(device))
    assert x_adv.device.type == device
    assert float((x_adv.cpu() - x).abs().max()) <= EPS + 1e-6


RECIPES = [("none", {}), ("pgd-at", dict(eps=EPS, steps=2)), ("pgd-at-random-state", dict(eps=EPS, steps=2)),
           ("trades", dict(eps=EPS, steps=2)), ("trades-random-state", dict(eps=EPS, steps=2)),
           ("jiio-at", dict(eps=EPS)), ("lyadeq", {}), ("lyadeq-at", dict(eps=EPS, steps=2)),
           ("gaussian-noise", dict(sigma=0.25))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,opts", RECIPES, ids=[r for r, _ in RECIPES])
def test_training_objective_on_device(device, name, opts):
    from robustdeq.defenses.recipes import recipe
    model = _model("lyadeq" if name.startswith("lyadeq") else "mlp_deq").to(device).train()
    x, y = _data(8)
    loss, scalars = recipe(name, **opts).objective(model, x.to(device), y.to(device))
    assert loss.device.type == device and bool(torch.isfinite(loss))
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())
    assert all(p.grad.device.type == device for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_defense_on_device_matches_cpu(device):
    from robustdeq.defenses.entropy import EntropyDefense
    model = _model("mlp_deq")
    x, _ = _data(4)
    ref = EntropyDefense(model, rounds=2, inner_steps=3)(x)
    out = EntropyDefense(copy.deepcopy(model).to(device), rounds=2, inner_steps=3)(x.to(device))
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_certificates_on_device_match_cpu(device):
    from robustdeq.certify import certify
    torch.manual_seed(0)
    model = zoo.build("mon_deq", hidden=16).eval()
    x, y = _data(4)
    cpu = certify(model, x, y, eps_linf=(0.01,))
    dev = certify(copy.deepcopy(model).to(device), x.to(device), y.to(device), eps_linf=(0.01,))
    assert len(cpu.results) == len(dev.results)
    for a, b in zip(cpu.results, dev.results):
        assert a.stable == b.stable and a.radius == pytest.approx(b.radius, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_smoothing_certificate_on_device_matches_cpu(device):
    from robustdeq.certify.smoothing import certify as smooth_certify
    model = _model("mlp_deq")
    x, y = _data(3)
    opts = dict(sigma=0.25, n0=16, n=64, batch_size=32, seed=0)
    cpu = smooth_certify(model, x, y, **opts)
    dev = smooth_certify(copy.deepcopy(model).to(device), x.to(device), y.to(device), **opts)
    # the noise is drawn on the CPU from the seed: the same draws on every device
    assert [r.prediction for r in cpu.results] == [r.prediction for r in dev.results]
