"""robustdeq.adopt on DEQs built and trained with TorchDEQ: outputs and implicit input gradients
against TorchDEQ's own train-mode ones, the copy rule, trajectories, attacks, the missing extra."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torchdeq")

import robustdeq  # noqa: E402
from robustdeq.errors import ConfigError  # noqa: E402
from robustdeq.guard import model_snapshot, snapshot_diff  # noqa: E402
from robustdeq.interop.torchdeq import AdoptedDEQ, AdoptedDEQClassifier  # noqa: E402
from helpers.torchdeq_models import TorchDEQConv, TorchDEQMLP, train_torchdeq  # noqa: E402

TIGHT = dict(tol=1e-7, max_iter=80)
REF = dict(f_max_iter=100, f_tol=1e-7, ift=True, b_tol=1e-9, b_max_iter=150)


@pytest.fixture(scope="module")
def data(torchdeq_digits):
    x, y = torchdeq_digits(150)
    xt, yt = torchdeq_digits(40, 1000)
    return x, y, xt, yt


@pytest.fixture(scope="module")
def trained(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    mlp = train_torchdeq(TorchDEQMLP(), x, y, epochs=3, lr=1e-2)
    torch.manual_seed(1)
    conv = train_torchdeq(TorchDEQConv(), x, y, epochs=2, lr=3e-3)
    return {"mlp": mlp, "conv": conv}


def reference(model):
    """The same weights under TorchDEQ with a tight solve and its implicit (IFT) gradient, in
    train mode (where TorchDEQ keeps a gradient path to the input)."""
    ref = type(model)(**REF)
    ref.load_state_dict(model.state_dict())
    return ref.train()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_adopted_outputs_and_input_gradients_match_torchdeq_train_mode(trained, data, kind):
    model = trained[kind]
    xt, yt = data[2][:16], data[3][:16]
    ref = reference(model)
    xr = xt.clone().requires_grad_(True)
    lr_ = ref(xr)
    g_ref = torch.autograd.grad(nn.functional.cross_entropy(lr_, yt), xr)[0]
    adopted = robustdeq.adopt(model, solver=TIGHT)
    assert isinstance(adopted, AdoptedDEQClassifier)
    for mode in ("eval", "train"):  # implicit input gradients in ANY mode
        getattr(adopted, mode)()
        xa = xt.clone().requires_grad_(True)
        la = adopted(xa)
        ga = torch.autograd.grad(nn.functional.cross_entropy(la, yt), xa)[0]
        torch.testing.assert_close(la, lr_.detach(), atol=2e-5, rtol=1e-4)
        assert float((ga - g_ref).norm() / g_ref.norm()) < 1e-3, mode
    assert adopted.last_stats.converged.all()


def test_input_gradient_matches_finite_differences(trained, data):
    adopted = robustdeq.adopt(trained["mlp"], solver=TIGHT).double().eval()
    x = 0.1 + 0.8 * data[2][:2].double()  # interior points: x /pm h d stays in [0, 1]
    y = data[3][:2]
    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(nn.functional.cross_entropy(adopted(xr), y), xr)[0]
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (nn.functional.cross_entropy(adopted(x + h * d), y)
              - nn.functional.cross_entropy(adopted(x - h * d), y)) / (2 * h)
    assert abs(float((g * d).sum()) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_adopt_returns_a_copy_and_never_changes_the_model(trained, data):
    model = trained["mlp"].eval()
    before = model_snapshot(model)
    adopted = robustdeq.adopt(model)
    adopted.train()
    adopted(data[2][:4]).sum().backward()
    assert not snapshot_diff(before)
    assert type(model.deq).__module__.startswith("torchdeq")
    assert adopted.net is not model and isinstance(adopted.deq, AdoptedDEQ)
    # the TorchDEQ settings carried over: fixed-point iteration, 30 iterations, tol 1e-5, abs
    cfg = robustdeq.adopt(model).solver_config
    assert (cfg.name.value, cfg.max_iter, cfg.tol, cfg.stop_mode.value) == ("fixed_point", 30, 1e-5, "abs")


class TwoDEQs(nn.Module):
    def __init__(self, **deq_options):
        super().__init__()
        self.a, self.b = TorchDEQMLP(width=16, **deq_options), TorchDEQMLP(width=16, **deq_options)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_plain_form_keeps_the_call_signature_and_reports_statistics(data):
    torch.manual_seed(0)
    model = TwoDEQs().train()
    ref_model = TwoDEQs(**REF)
    ref_model.load_state_dict(model.state_dict())
    xt = data[2][:8]
    adopted = robustdeq.adopt(model, solver=TIGHT).eval()
    assert type(adopted) is TwoDEQs and isinstance(adopted.a.deq, AdoptedDEQ)
    xa = xt.clone().requires_grad_(True)
    out = adopted(xa)
    xr = xt.clone().requires_grad_(True)
    ref = ref_model(xr)
    torch.testing.assert_close(out, ref.detach(), atol=2e-5, rtol=1e-4)
    ga = torch.autograd.grad(out.sum(), xa)[0]
    gr = torch.autograd.grad(ref.sum(), xr)[0]
    assert float((ga - gr).norm() / gr.norm()) < 1e-3
    info = adopted.a.deq.last_info
    assert {"abs_lowest", "rel_lowest", "nstep", "sradius", "converged"} <= set(info)
    assert info["converged"].all() and float(info["abs_lowest"].max()) <= 1e-7 * 10
    # TorchDEQ's conventions: a list of states, an info dict
    z_out, info2 = adopted.a.deq(lambda z: 0.5 * z + 1.0, torch.zeros(3, 4))
    assert isinstance(z_out, list) and len(z_out) == 1
    torch.testing.assert_close(z_out[0], torch.full((3, 4), 2.0), atol=1e-5, rtol=0)
    # list states (TorchDEQ's multi-resolution convention)
    z_out, _ = adopted.a.deq(
        lambda zs: [0.5 * zs[0] + 1.0, 0.5 * zs[1] - 0.1 * zs[0][:, :1, None]],
        [torch.zeros(2, 3), torch.zeros(2, 2, 2)])
    assert [tuple(t.shape) for t in z_out[0]] == [(2, 3), (2, 2, 2)]
    torch.testing.assert_close(z_out[0][1], torch.full((2, 2, 2), -0.4), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="exactly one"):
        robustdeq.adopt(model, structured=True)


def test_nonconvergence_warns_in_eval_mode(trained, data):
    adopted = robustdeq.adopt(trained["mlp"], solver=dict(max_iter=2, tol=1e-9)).eval()
    with pytest.warns(robustdeq.NonConvergenceWarning):
        adopted(data[2][:4])
    assert adopted.nonconvergence_events >= 1


def test_trajectory_states_are_the_torchdeq_iterates(trained, data):
    """``run(record=...)`` is step-indexed; with fixed-point iteration state k is f^k(z0) built
    (z_0 the initial state) by hand from the model's own layers, and its read-out the user's head on it."""
    model = trained["mlp"]
    adopted = robustdeq.adopt(model, solver=dict(name="fixed_point", max_iter=20, tol=0.0),
                              warn_nonconvergence=False).eval()
    x = data[2][:4]
    eq = adopted.run(x, record=[3, 7])
    with torch.no_grad():
        u = model.inj(x.flatten(1))
        z = torch.zeros_like(u)
        states = {0: z}
        for k in range(1, 8):
            z = torch.tanh(model.W(z) + u)
            states[k] = z
        torch.testing.assert_close(eq.state(3).z, states[3], atol=1e-6, rtol=0)
        torch.testing.assert_close(eq.state(7).z, states[7], atol=1e-6, rtol=0)
        adopted.inject(x)
        torch.testing.assert_close(adopted.readout(eq.state(3).z), model.head(states[3]),
                                   atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_intermediate_state_and_native_attacks_run_on_an_adopted_model(trained, data):
    from robustdeq.attacks import PGD
    from robustdeq.attacks.intermediate import StateAttack
    adopted = robustdeq.adopt(trained["mlp"]).eval()
    x, y = data[2][:8], data[3][:8]
    for atk in (StateAttack(adopted, eps=0.1, steps=3, states=[2, 5], seed=0),
                PGD(adopted, eps=0.1, steps=3, seed=0)):
        x_adv = atk(x, y)
        assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
        assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
        with torch.no_grad():
            assert (adopted(x_adv).argmax(1) == y).sum() <= (adopted(x).argmax(1) == y).sum()


@pytest.mark.slow
def test_quick_suite_is_at_least_as_strong_as_torchattacks_pgd20_on_torchdeq(trained, data):
    """The quick suite on the adopted model is at most torchattacks' PGD-20 on the TorchDEQ model
    in train mode (where it has input gradients) plus one point."""
    torchattacks = pytest.importorskip("torchattacks")
    from robustdeq.eval import evaluate
    model = trained["mlp"]
    x, y = data[2][:32], data[3][:32]
    eps = 0.1
    model.train()
    atk = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 20, steps=20, random_start=True)
    atk.set_model_training_mode(model_training=True)
    torch.manual_seed(0)
    x_adv = atk(x, y)
    with torch.no_grad():
        model.train()
        ta_acc = float((model(x_adv).argmax(1) == y).float().mean())
    adopted = robustdeq.adopt(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = evaluate(adopted, x, y, eps=eps, suite="quick", steps=20, checks=False)
    print(f"quick suite on adopted: {rep.robust_accuracy(eps):.4f}; torchattacks PGD-20 (train mode): {ta_acc:.4f}")
    assert rep.robust_accuracy(eps) <= ta_acc + 0.01 + 1e-9


def test_missing_torchdeq_names_the_extra(monkeypatch, trained):
    monkeypatch.setitem(sys.modules, "torchdeq.core", None)
    with pytest.raises(ConfigError, match=r"robustdeq\[torchdeq\]"):
        robustdeq.adopt(trained["mlp"])


def test_adopt_refuses_a_model_without_torchdeq_modules():
    with pytest.raises(ConfigError, match="no TorchDEQ DEQ module"):
        robustdeq.adopt(nn.Linear(3, 2))


def test_parameter_gradients_reach_a_parametrised_layer_of_the_adopted_map():
    """A spectrally normalised layer inside the user's f: the call computes its weight once, with
    the graph to its parameters (a weight first computed inside the solve, without autograd,
    would have cut the parameter gradient), so the implicit gradient equals backpropagation
    through the solve; in train mode the call takes one power-iteration step."""
    from torch.nn.utils.parametrizations import spectral_norm
    torch.manual_seed(0)
    net = TorchDEQMLP(width=8)
    net.W = spectral_norm(net.W)
    net = net.double()
    tight = dict(tol=1e-12, max_iter=200, stop_mode="abs")
    m = robustdeq.adopt(net, solver=tight, grad=robustdeq.ImplicitGrad(tight)).eval()
    V = m.net.W.parametrizations.weight.original
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    grads = []
    for est in (m.grad, "full"):   # the model's tight ImplicitGrad, backpropagation
        m.zero_grad()
        with robustdeq.gradient(m, est):
            m(x).pow(2).sum().backward()
        grads.append(V.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)
    calls = []
    h = m.net.W.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        m.train()
        m(x).pow(2).sum().backward()
        assert len(calls) == 1
    finally:
        h.remove()
