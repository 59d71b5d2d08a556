"""AutoAttack on DEQs: the model side made cheaper (``AutoAttack(fast_deq=...)``,
:class:`robustdeq.deq.memory.WarmMemory` with the attack-grade, warm-started adjoint, forward
warm starts only on certified-contractive cells, shrinking solves and reuse of repeated points)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustdeq.attacks import AutoAttack
from robustdeq.attacks.base import logits_of
from robustdeq.deq.grad import ImplicitGrad, gradient
from robustdeq.deq.memory import FAST_OPTIONS, WarmMemory
from robustdeq.errors import ConfigError

EPS = 0.1


@pytest.fixture(scope="module")
def deq(trained_model):  # non-contractive (no spectral norm)
    return trained_model("mlp_deq", steps=60, hidden=32, init_gain=1.5)


@pytest.fixture(scope="module")
def cdeq(trained_model):  # contractive (spectral norm, scale 0.9): a unique fixed point
    return trained_model("mlp_deq", steps=60, hidden=32, norm="spectral", scale=0.9)


def _perturbed(x, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x + EPS * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)


def _input_grad(model, x, y):
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y, reduction="sum")
    return torch.autograd.grad(loss, xr)[0]


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # a few samples of deq
def test_forward_warm_only_on_certified_contractive_cells(deq, cdeq, digits_test):
    x, _ = digits_test(16)
    from robustdeq.certify import contraction_certificate
    assert not contraction_certificate(deq).certified and contraction_certificate(cdeq).certified
    for model, expected in ((deq, False), (cdeq, True)):
        mem = WarmMemory(model, **FAST_OPTIONS)
        mem.begin(x, EPS)
        assert mem.warm_forward is expected
        mem(x)
        mem(_perturbed(x))
        assert (mem.stats["warm"] > 0) is expected
        mem.end()


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # the model's own solves
@pytest.mark.parametrize("shrink", [False, True])
def test_fast_forward_is_the_models_function(deq, shrink, digits_test):
    """Without forward warm starts, the fast path's logits are the model's own cold inference
    (shrinking solves: the same per-sample iterates), on the first call and on repeats."""
    x, _ = digits_test(48)
    mem = WarmMemory(deq, forward_warm=False, adjoint_tol=1e-2, adjoint_warm=True, shrink=shrink, reuse=True)
    mem.begin(x, EPS)
    xp = _perturbed(x)
    with torch.no_grad():
        ref = deq(xp)
        first = mem(xp)
        again = mem(xp)   # restarted from the recorded converged state
        clean = mem(x)
        clean_again = mem(x)
    # up to float rounding (the shrunk batches' matrix products round differently; the samples
    # that stop unconverged at max_iter amplify it over 30 iterations, to ~2e-4 here)
    assert torch.allclose(first, ref, atol=1e-3, rtol=0)
    assert torch.allclose(clean, deq(x), atol=1e-3, rtol=0)
    if shrink:  # rows whose solve did not converge are solved again, in a batch of another size
        assert torch.allclose(first, again, atol=1e-3, rtol=0)
        assert torch.allclose(clean, clean_again, atol=1e-3, rtol=0)
    else:
        assert torch.equal(first, again) and torch.equal(clean, clean_again)
    assert mem.stats["reused"] > 0


def test_fully_repeated_call_needs_no_solve(cdeq, digits_test):
    """A call whose rows are all at recorded converged inputs returns the recorded states without
    solver iterations, and that is what a solve started there returns."""
    x, y = digits_test(32)
    mem = WarmMemory(cdeq, **FAST_OPTIONS)
    mem.begin(x, EPS)
    first = mem(x)
    assert bool(mem.ok.all())
    nfe = mem.stats["forward_nfe"]
    z_rec = mem.z.clone()
    again = mem(x)
    assert mem.stats["forward_nfe"] == nfe and torch.equal(again, first)
    assert torch.equal(cdeq.run(x, z0=z_rec).logits, again)
    # gradients flow as from a solve (the adjoint at the recorded state)
    g = _input_grad(mem, x, y)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    # another solver setting: no reuse
    saved = cdeq.solver_config
    cdeq.solver_config = saved.replace(tol=1e-4)
    try:
        mem(x)
    finally:
        cdeq.solver_config = saved
    assert mem.stats["forward_nfe"] > nfe


@pytest.mark.parametrize("tol,min_cos,min_signs", [(1e-3, 0.999, 0.99), (1e-2, 0.99, 0.97)])
def test_fast_adjoint_matches_exact_ift_gradient(deq, cdeq, tol, min_cos, min_signs, digits_test):
    """The attack-grade adjoint (relative tolerance 1e-3, the default, or 1e-2; warm-started
    from the previous call's converged adjoint) gives an input gradient within cosine
    ``min_cos`` of the exact IFT gradient (adjoint to 1e-6, 300 iterations) for every sample,
    with at least ``min_signs`` of the signs equal (what APGD-Linf steps on)."""
    x, y = digits_test(64)
    exact = ImplicitGrad({"max_iter": 300, "tol": 1e-6})
    for model in (deq, cdeq):
        mem = WarmMemory(model, **{**FAST_OPTIONS, "adjoint_tol": tol})
        mem.begin(x, EPS)
        for seed in range(3):   # later calls start their adjoint from the recorded ones
            xp = _perturbed(x, seed)
            g_fast = _input_grad(mem, xp, y)
            with gradient(model, exact):
                g_ref = _input_grad(model, xp, y)
            cos = F.cosine_similarity(g_fast.flatten(1), g_ref.flatten(1), dim=1)
            assert float(cos.min()) > min_cos
            assert float((g_fast.sign() == g_ref.sign()).float().mean()) > min_signs
        assert mem.stats["adjoint_warm"] > 0 and mem.stats["adjoint_unconverged"] == 0
        mem.end()


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # budgets too small on purpose
def test_never_reuses_unconverged_states(cdeq, digits_test):
    """Neither unconverged forward solves nor unconverged adjoints are recorded or warm-start."""
    x, y = digits_test(32)
    mem = WarmMemory(cdeq, **FAST_OPTIONS)
    mem.begin(x, EPS)
    saved = cdeq.solver_config
    cdeq.solver_config = saved.replace(max_iter=1)
    try:
        _input_grad(mem, x, y)
        mem(_perturbed(x))
    finally:
        cdeq.solver_config = saved
    assert mem.stats["recorded"] == 0 and mem.stats["warm"] == 0 and mem.stats["reused"] == 0
    assert not bool(mem.ok.any())
    # an adjoint budget too small to converge: no adjoint is recorded, none warm-starts
    with gradient(cdeq, ImplicitGrad({"max_iter": 1, "tol": 1e-12})):
        mem2 = WarmMemory(cdeq, **{**FAST_OPTIONS, "adjoint_tol": 1e-9})
        mem2.begin(x, EPS)
        _input_grad(mem2, x, y)
        _input_grad(mem2, _perturbed(x), y)
    assert mem2.stats["adjoint_recorded"] == 0 and mem2.stats["adjoint_warm"] == 0
    assert mem2.stats["adjoint_unconverged"] > 0 and not bool(mem2.a_ok.any())
    # a warm-started forward solve that does not converge is the model's cold result
    mem(x)
    assert bool(mem.ok.all())
    cdeq.solver_config = saved.replace(max_iter=2, tol=1e-12)
    try:
        xp = _perturbed(x, 1)
        out = mem(xp)
        cold = cdeq(xp)
    finally:
        cdeq.solver_config = saved
    assert mem.stats["redone"] == 32 and torch.equal(out, cold)


def test_memory_forgotten_between_batches(cdeq, digits_test):
    x, _ = digits_test(64)
    a, b = x[:32], x[32:]
    mem = WarmMemory(cdeq, **FAST_OPTIONS)
    mem.begin(a, EPS)
    mem(a)
    mem.begin(b, EPS)
    assert mem.z is None and mem.a is None and not bool(mem.ok.any())
    out = mem(b)
    assert mem.stats["warm"] == 0 and mem.stats["reused"] == 0
    assert torch.allclose(out, cdeq(b), atol=1e-6, rtol=0)
    # a backward through a graph of batch b after the memory moved on to batch a: no adjoint of
    # b is recorded into a's memory, none of a's starts it
    y = torch.zeros(32, dtype=torch.long)
    xr = b.clone().requires_grad_(True)
    loss = F.cross_entropy(mem(xr), y)
    mem.begin(a, EPS)
    recorded = mem.stats["adjoint_recorded"]
    torch.autograd.grad(loss, xr)
    assert mem.stats["adjoint_recorded"] == recorded and mem.a is None
    mem.end()
    assert not mem.active and torch.equal(mem(a), cdeq(a))


def test_bad_options_are_config_errors(deq):
    with pytest.raises(ConfigError):
        WarmMemory(deq, forward_warm="always")
    with pytest.raises(ConfigError):
        WarmMemory(deq, adjoint_tol=0.0)
    with pytest.raises(ConfigError):
        WarmMemory(deq, shrink=1)
    with pytest.raises(ConfigError):
        AutoAttack(deq, eps=EPS, fast_deq={"adjoint_tolerance": 1e-2})
    with pytest.raises(ConfigError):
        AutoAttack(deq, eps=EPS, fast_deq="yes")
    atk = AutoAttack(deq, eps=EPS, fast_deq={"adjoint_tol": 0.05})
    assert atk.fast_deq["adjoint_tol"] == 0.05 and atk.params()["fast_deq"]["reuse"] is True
    assert AutoAttack(deq, eps=EPS).memory is None   # off by default
    # not a DEQClassifier attacked as is: pyautoattack on the module itself
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert AutoAttack(mlp, eps=EPS, fast_deq=True).memory is None
    viewed = AutoAttack(deq, eps=EPS, fast_deq=True, view={"grad": "unrolled", "unroll": 5})
    assert viewed.memory is None and viewed.fast_deq is None


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # the reference's own solves
@pytest.mark.parametrize("contractive", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_autoattack_fast_within_one_sample_in_100(deq, cdeq, contractive, digits_test):
    """AutoAttack with fast_deq: robust accuracy within 1 sample in 100 of pyautoattack on the
    model itself (here: 128 samples, so within 1 sample), and identical on a repeated run."""
    pytest.importorskip("pyautoattack")
    model = cdeq if contractive else deq
    x, y = digits_test(128)
    common = dict(eps=EPS, version="custom", attacks=["apgd-ce", "apgd-t", "square"], seed=0,
                  settings={"apgd.n_iter": 10, "apgd_targeted.n_iter": 10,
                            "apgd_targeted.n_target_classes": 2, "square.n_queries": 40})
    plain = AutoAttack(model, **common)
    fast = AutoAttack(model, fast_deq=True, **common)
    r_plain = logits_of(model, plain(x, y)).argmax(1) == y
    x_fast = fast(x, y)
    r_fast = logits_of(model, x_fast).argmax(1) == y
    assert abs(int(r_plain.sum()) - int(r_fast.sum())) <= max(1, x.shape[0] // 100)
    assert torch.equal(fast(x, y), x_fast)
    assert not fast.memory.active
    stats = fast.last_memory_stats
    assert stats["adjoint_warm"] > 0 and stats["reused"] > 0
    assert (stats["warm"] > 0) is contractive
