"""One weight per objective evaluation (robustdeq.deq.model.one_weight / shared_weights).

In train mode every computation of a spectrally normalised weight takes a power-iteration step.
The train-time paths that evaluate the map outside ``DEQClassifier.run`` (random intermediate
states, the Jacobian penalty, the Lyapunov penalty, the entropy defense) compute each weight once
per evaluation: the power iteration advances exactly one step, and the loss and its parameter
gradients equal those of an eval-mode evaluation at the advanced vectors (the same weight).
"""
import copy

import pytest
import torch
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from robustdeq.config import SolverConfig
from robustdeq.deq.cells import LinearHead, MLPCell, MLPInjection
from robustdeq.deq.grad import ImplicitGrad
from robustdeq.deq.model import DEQClassifier
from robustdeq.defenses.entropy import EntropyDefense
from robustdeq.defenses.lyapunov import LyapunovStability, lyadeq
from robustdeq.defenses.objectives import PGDAT, TRADES, CrossEntropy, ris_forward

pytestmark = pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")

SOLVER = dict(name="anderson", max_iter=40, tol=1e-10, stop_mode="abs")


def _spectral_norms(model):
    return [p for mod in model.modules() if parametrize.is_parametrized(mod)
            for plist in mod.parametrizations.values() for p in plist if isinstance(p, _SpectralNorm)]


def _randomise(model, seed):
    """Random power-iteration vectors, so that each step changes the weight visibly."""
    sns = _spectral_norms(model)
    assert sns
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sn in sns:
            for buf in (sn._u, sn._v):
                buf.copy_(torch.nn.functional.normalize(torch.randn(buf.shape, generator=g, dtype=buf.dtype), dim=0))
    return model


def _deq(seed=0):
    torch.manual_seed(seed)
    model = DEQClassifier(MLPInjection(64, 6), MLPCell(6, norm="spectral", scale=0.8), LinearHead(6, 3),
                          solver=SOLVER, grad=ImplicitGrad(SOLVER), input_shape=(1, 8, 8))
    return _randomise(model.double().train(), seed + 1)


def _lyadeq(seed=0):
    torch.manual_seed(seed)
    model = lyadeq(in_shape=(1, 8, 8), num_classes=3, hidden=6, norm="spectral", scale=0.8,
                   icnn_hidden=(8,), alpha=0.9, solver=SOLVER, grad="ift", grad_options={"solver": SOLVER})
    return _randomise(model.double().train(), seed + 1)


def _original(model, sn):
    for mod in model.modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is not None:
            for plist_ in plist.values():
                if any(p is sn for p in plist_):
                    return plist_.original
    raise AssertionError("not found")


def _one_step(model):
    """Copies of the spectral norms advanced by one plain train-mode computation."""
    refs = []
    for sn in _spectral_norms(model):
        ref = copy.deepcopy(sn)
        ref(_original(model, sn).detach())
        refs.append(ref)
    return refs


def _check_one_step(model, evaluate):
    """``evaluate()`` (train mode) computes each spectral norm once in train mode (eval-mode
    computations, an attack's, take no step) and advances it one step; returns its result."""
    refs = _one_step(model)
    calls = []
    handles = [sn.register_forward_hook(lambda mod, *a: calls.append(1) if mod.training else None)
               for sn in _spectral_norms(model)]
    try:
        out = evaluate()
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(refs), f"{len(calls)} computations of {len(refs)} spectral weights"
    for ref, sn in zip(refs, _spectral_norms(model)):
        assert torch.equal(ref._u, sn._u) and torch.equal(ref._v, sn._v)
    return out


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _train_equals_eval(model, make_objective, x, y):
    """An objective's loss and gradients in train mode (one power-iteration step) equal an
    eval-mode evaluation at the advanced vectors, with a gradient to the spectral weight."""
    loss_t, _ = _check_one_step(model, lambda: make_objective()(model, x, y))
    loss_t.backward()
    g_t = _grads(model)
    model.eval()
    model.zero_grad()
    loss_e, _ = make_objective()(model, x, y)
    loss_e.backward()
    g_e = _grads(model)
    torch.testing.assert_close(loss_t.detach(), loss_e.detach(), rtol=1e-9, atol=1e-12)
    for a, b in zip(g_t, g_e):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    v = _original(model, _spectral_norms(model)[0])
    assert float(v.grad.abs().sum()) > 0


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(n) % 3


def test_iterates_use_one_weight():
    model = _deq()
    x, _ = _batch()
    u = model.inject(x).detach()
    zn = _check_one_step(model, lambda: model.iterates(u, torch.tensor([1, 5, 9, 12])))
    model.eval()  # the same weight: z_n by hand with the advanced vectors
    with torch.no_grad():
        for i, n in enumerate([1, 5, 9, 12]):
            ref = model.iterates(u[i:i + 1], torch.tensor([n]))
            torch.testing.assert_close(zn[i:i + 1], ref, rtol=0, atol=1e-12)


def test_ris_forward_uses_one_weight():
    model = _deq()
    x, y = _batch()
    gen = torch.Generator().manual_seed(0)
    logits, *_ = _check_one_step(model, lambda: ris_forward(model, x, max_state=8, sampling="sample",
                                                            generator=gen))
    assert logits.requires_grad


@pytest.mark.parametrize("options", [dict(state="random", state_sampling="sample", max_state=8),
                                     dict(jac_reg=1.0), dict(state="random", max_state=6, jac_reg=0.5)])
def test_cross_entropy_objective_uses_one_weight(options):
    model = _deq()
    x, y = _batch()
    _train_equals_eval(model, lambda: CrossEntropy(seed=3, **options), x, y)


@pytest.mark.parametrize("cls", [PGDAT, TRADES])
@pytest.mark.parametrize("state", [None, "random"])
def test_adversarial_objectives_take_one_step_per_evaluation(cls, state):
    # the attack runs in eval mode (no step); the loss's forwards and penalty share one weight
    model = _deq()
    x, y = _batch()
    obj = cls(eps=0.05, steps=2, state=state, max_state=5, jac_reg=0.1, seed=0)
    loss, _ = _check_one_step(model, lambda: obj(model, x, y))
    loss.backward()
    assert float(_original(model, _spectral_norms(model)[0]).grad.abs().sum()) > 0


def test_outer_loss_on_a_given_example_is_that_of_one_weight():
    model = _deq()
    x, y = _batch()
    x_adv = (x + 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)).clamp(0, 1)
    for cls in (PGDAT, TRADES):
        m = copy.deepcopy(model)

        class Outer:
            def __call__(self, mm, xx, yy):
                o = cls(eps=0.05, steps=1, state="random", max_state=6, jac_reg=0.3, seed=2)
                return o.loss_at(mm, x_adv, yy) if cls is PGDAT else o.loss_at(mm, xx, x_adv, yy)
        _train_equals_eval(m, Outer, x, y)


@pytest.mark.parametrize("condition", ["flow", "map"])
def test_lyapunov_penalty_uses_one_weight(condition):
    model = _lyadeq()
    x, y = _batch()
    _train_equals_eval(model, lambda: LyapunovStability(weight=1.0, samples=2, steps=2, condition=condition,
                                                        floor=0.0, seed=4), x, y)


def test_lyapunov_with_an_adversarial_base_takes_one_step():
    # the base's loss and the penalty share the weight; the base's attack computes its own (eval)
    model = _lyadeq()
    x, y = _batch()
    obj = LyapunovStability(PGDAT(eps=0.05, steps=2, seed=0), samples=1, steps=2, condition="map",
                            floor=0.0, seed=1)
    loss, scalars = _check_one_step(model, lambda: obj(model, x, y))
    assert scalars["lyap_penalty"] > 0
    loss.backward()
    assert float(_original(model, _spectral_norms(model)[0]).grad.abs().sum()) > 0
    assert float(model.lyapunov_fn.icnn.W[0].weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("exact", [False, True])
def test_entropy_defense_uses_one_weight(exact):
    model = _deq()
    x, _ = _batch()
    defense = EntropyDefense(model, rounds=2, solver_steps=2, inner_steps=2, readout="last", sign=not exact,
                             solver=SolverConfig(name="fixed_point", max_iter=10))
    res = _check_one_step(model, lambda: defense.run(x, exact=exact))
    res.logits.sum().backward()
    g_t = _grads(model)
    model.eval()
    model.zero_grad()
    ref = defense.run(x, exact=exact)
    ref.logits.sum().backward()
    torch.testing.assert_close(res.logits.detach(), ref.logits.detach(), rtol=0, atol=1e-12)
    for a, b in zip(g_t, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_one_weight_leaves_the_masked_layers_of_a_weight_tied_model_apart():
    # a weight-tied model substitutes each layer's masked parameters: a cache across its layers
    # would reuse the first layer's weight in all of them; one_weight (an objective's loss block)
    # does not cache it, and a training objective's loss is the model's own forward
    from robustdeq.deq.model import one_weight, parametrized_once, shared_weights
    from robustdeq.deq.weight_tied import WeightTied
    torch.manual_seed(0)
    wt = WeightTied(MLPInjection(64, 6), MLPCell(6, norm="spectral", scale=0.8), LinearHead(6, 3), depth=3,
                    sparsity=0.5, seed=0, input_shape=(1, 8, 8)).double().eval()
    x, y = _batch()
    with torch.no_grad():
        ref = wt(x)
        with shared_weights(), one_weight(wt, join=True):
            torch.testing.assert_close(wt(x), ref, rtol=0, atol=0)
        with parametrized_once(wt):  # what a cache across the layers would compute
            assert not torch.allclose(wt(x), ref)
        loss, _ = CrossEntropy()(wt, x, y)
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(ref, y), rtol=0, atol=0)
