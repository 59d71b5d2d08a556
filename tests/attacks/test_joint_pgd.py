"""The joint (fast) PGD and AutoAttack's per-sample warm-start memory."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers.attacks import check_ball
from robustdeq.attacks import PGD, AutoAttack
from robustdeq.attacks.base import logits_of
from robustdeq.deq.memory import WarmMemory
from robustdeq.errors import ConfigError

EPS = 0.1


@pytest.fixture(scope="module")
def deq(trained_model):
    return trained_model("mlp_deq", steps=60, hidden=32)


def _robust(model, x_adv, y):
    return logits_of(model, x_adv).argmax(1) == y


# -- the joint PGD ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # a few unconverged solves
@pytest.mark.parametrize("norm,eps", [("Linf", EPS), ("L2", 1.0)])
def test_joint_pgd_stays_in_ball_and_box(deq, norm, eps, digits_test):
    x, y = digits_test(32)
    x_adv = PGD(deq, eps=eps, steps=6, norm=norm, method="joint", seed=0)(x, y)
    check_ball(x, x_adv, eps, norm)
    # and it attacks: as hard as PGD with exact solves at every step (within 2 samples in 32),
    # well below the clean accuracy
    exact = PGD(deq, eps=eps, steps=6, norm=norm, method="exact", seed=0)(x, y)
    joint_acc, exact_acc = float(_robust(deq, x_adv, y).float().mean()), float(_robust(deq, exact, y).float().mean())
    assert joint_acc <= exact_acc + 2 / 32, (joint_acc, exact_acc)
    assert joint_acc <= float(_robust(deq, x, y).float().mean()) - 0.25, joint_acc


def test_joint_pgd_deterministic_under_seed(deq, digits_test):
    x, y = digits_test(32)
    a = PGD(deq, eps=EPS, steps=6, method="joint", seed=3)(x, y)
    b = PGD(deq, eps=EPS, steps=6, method="joint", seed=3)(x, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize("restarts", [1, 2])
def test_joint_pgd_judged_by_model_inference(deq, restarts, digits_test):
    """The robust flags the attack reports are a cold re-evaluation of its examples."""
    x, y = digits_test(48)
    atk = PGD(deq, eps=EPS, steps=8, method="joint", seed=0, restarts=restarts)
    x_adv = atk(x, y)
    assert atk.last_robust is not None
    assert torch.equal(atk.last_robust, _robust(deq, x_adv, y))


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # the reference's own solves
def test_joint_pgd_as_strong_as_ift(deq, digits_test):
    """On 64 samples, the joint PGD-20 breaks at most one sample fewer than exact PGD-IFT-20."""
    x, y = digits_test(64)
    common = dict(eps=EPS, alpha=0.01, steps=20, random_start=False)
    ref = _robust(deq, PGD(deq, grad="ift", **common)(x, y), y).sum()
    fast = _robust(deq, PGD(deq, method="joint", **common)(x, y), y).sum()
    assert int(fast) <= int(ref) + 1


def test_joint_pgd_refuses_non_deq_and_early_stop(deq):
    ff = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ConfigError):
        PGD(ff, eps=EPS, method="joint")
    with pytest.raises(ConfigError):
        PGD(deq, eps=EPS, method="joint", early_stop=True)
    with pytest.raises(ConfigError):
        PGD(deq, eps=EPS, grad="ift", method="exact", joint_options={"fwd_iters": 2})
    with pytest.raises(ConfigError):
        PGD(deq, eps=EPS, grad="unrolled", joint_options={"fwd_iters": 2})  # never joint
    with pytest.raises(ConfigError):
        PGD(deq, eps=EPS, method="fast")
    with pytest.raises(ConfigError, match="unknown"):  # "joint" is a method, not an estimator
        PGD(deq, eps=EPS, grad="joint")
    with pytest.raises(ConfigError):
        PGD(deq, eps=EPS, method="joint", joint_options={"fwd_iters": 0})


# -- the default method ("auto"): the joint iteration where the solves converge ------------------
@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # the exact loop's
def test_default_pgd_runs_joint_on_a_converging_deq(deq, digits_test):
    """The batch's first solves converge here, so the default PGD is the joint iteration: the
    same examples as method="joint" under the same seed, judged by the model's inference."""
    x, y = digits_test(32)
    assert bool(deq.run(x).stats.converged.all())  # the premise
    auto = PGD(deq, eps=EPS, steps=6, seed=1)
    a = auto(x, y)
    assert auto.method == "auto" and auto.last_methods == ["joint"]
    assert auto.last_stats["method"] == "joint"
    assert torch.equal(a, PGD(deq, eps=EPS, steps=6, seed=1, method="joint")(x, y))
    assert torch.equal(auto.last_robust, _robust(deq, a, y))
    # grad="ift" by name is also joint under "auto"; method="exact" is the exact loop
    ift = PGD(deq, eps=EPS, steps=6, seed=1, grad="ift")
    assert torch.equal(ift(x, y), a) and ift.last_methods == ["joint"]
    exact = PGD(deq, eps=EPS, steps=6, seed=1, method="exact")
    exact(x, y)
    assert exact.last_methods == ["exact"] and exact.joint_oracle is None


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # the premise
def test_default_pgd_falls_back_to_exact_where_solves_do_not_converge(deq, digits_test):
    """With a solver budget too small to converge, "auto" runs the exact loop, from the same random
    start: bit for bit method="exact" (restarts included)."""
    x, y = digits_test(32)
    deq = copy.deepcopy(deq)
    deq.solver_config = deq.solver_config.replace(max_iter=2)
    for restarts in (1, 2):
        auto = PGD(deq, eps=EPS, steps=5, seed=4, restarts=restarts)
        a = auto(x, y)
        assert set(auto.last_methods) == {"exact"}
        b = PGD(deq, eps=EPS, steps=5, seed=4, restarts=restarts, method="exact")(x, y)
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # the premise
def test_default_pgd_splits_a_batch_by_first_solve_convergence(deq, digits_test):
    """Where only some first solves converge, those samples get the joint iteration and the
    others the exact loop (the same as attacking each group on its own with that method)."""
    x, y = digits_test(32)
    deq = copy.deepcopy(deq)
    deq.solver_config = deq.solver_config.replace(max_iter=10)
    ok = deq.run(x).stats.converged
    assert 0 < int(ok.sum()) < 32  # the premise: a mixed batch
    kw = dict(eps=EPS, steps=5, random_start=False)
    auto = PGD(deq, **kw)
    a = auto(x, y)
    assert auto.last_methods == ["mixed"]
    assert auto.last_stats["joint_samples"] == int(ok.sum())
    assert auto.last_stats["exact_samples"] == int((~ok).sum())
    assert torch.equal(auto.last_robust, _robust(deq, a, y))
    joint = PGD(deq, method="joint", **kw)(x[ok], y[ok])
    exact = PGD(deq, method="exact", **kw)(x[~ok], y[~ok])
    torch.testing.assert_close(a[ok], joint, rtol=0, atol=1e-6)
    torch.testing.assert_close(a[~ok], exact, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # the exact loop's
def test_auto_is_exact_for_other_estimators_and_feed_forward(deq, digits_test):
    x, y = digits_test(16)
    for kw in (dict(grad="unrolled"), dict(grad="phantom"), dict(warm_start=False)):
        atk = PGD(deq, eps=EPS, steps=3, seed=0, **kw)
        atk(x, y)
        assert atk.joint_oracle is None and atk.last_methods == ["exact"], kw
    ff = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    atk = PGD(ff, eps=EPS, steps=3, seed=0)
    atk(x, y)
    assert atk.last_methods == ["exact"]


def test_harness_ift_units_are_joint_and_exact_unit_by_name(deq, digits_test):
    from robustdeq.eval import evaluate
    x, y = digits_test(24)
    rep = evaluate(deq, x, y, eps=EPS, suite=["pgd-ift", "pgd-exact"], steps=4, checks=False)
    desc = {a.key: a.describe for a in rep.results[0].attacks}
    assert desc["pgd-ift"]["method"] == "auto" and desc["pgd-exact"]["method"] == "exact"


# -- the warm-start memory ----------------------------------------------------------------------
def test_memory_only_records_converged_solves(deq, digits_test):
    x, y = digits_test(32)
    mem = WarmMemory(deq)
    mem.begin(x, EPS)
    # a solver budget too small to converge: nothing may be recorded, nothing warm-starts
    saved = deq.solver_config
    deq.solver_config = saved.replace(max_iter=1)
    try:
        mem(x)
        mem((x + 0.05).clamp(0, 1))
    finally:
        deq.solver_config = saved
    assert mem.stats["recorded"] == 0 and mem.stats["warm"] == 0
    assert not bool(mem.ok.any())
    # converged solves are recorded and then warm-start the next call at a perturbed point
    mem(x)
    assert bool(mem.ok.any())
    out = mem((x + 0.05).clamp(0, 1))
    assert mem.stats["warm"] > 0
    cold = logits_of(deq, (x + 0.05).clamp(0, 1))
    assert torch.equal(out.argmax(1), cold.argmax(1))
    mem.end()


def test_memory_unconverged_warm_solve_is_redone_cold(deq, digits_test):
    """A warm-started solve that does not converge returns the model's cold result exactly."""
    x, _ = digits_test(16)
    mem = WarmMemory(deq)
    mem.begin(x, EPS)
    mem(x)
    assert bool(mem.ok.all())
    saved = deq.solver_config
    deq.solver_config = saved.replace(max_iter=2, tol=1e-12)
    try:
        xp = (x + 0.08).clamp(0, 1)
        out = mem(xp)
        cold = deq(xp)
    finally:
        deq.solver_config = saved
    assert mem.stats["redone"] == 16
    assert torch.equal(out, cold)


def test_memory_invalidated_when_batch_changes(deq, digits_test):
    """States of one batch never warm-start another: a new begin() forgets, and rows matching
    no clean sample of the current batch start cold."""
    x, _ = digits_test(64)
    a, b = x[:32], x[32:]
    mem = WarmMemory(deq)
    mem.begin(a, EPS)
    mem(a)
    assert bool(mem.ok.all())
    mem.begin(b, EPS)  # a new batch: everything forgotten
    assert mem.z is None and not bool(mem.ok.any())
    out = mem(b)
    assert mem.stats["warm"] == 0
    assert torch.equal(out, deq(b))
    # queries from another batch while b's memory is live are unmatched and cold
    mem((b + 0.02).clamp(0, 1))
    warm_before = mem.stats["warm"]
    out_a = mem(a)
    assert mem.stats["warm"] == warm_before and mem.stats["unmatched"] == 32
    assert torch.equal(out_a, deq(a))
    mem.end()
    assert not mem.active and torch.equal(mem(a), deq(a))


def test_memory_identical_inputs_give_identical_outputs(deq, digits_test):
    x, _ = digits_test(16)
    mem = WarmMemory(deq)
    mem.begin(x, EPS)
    assert torch.equal(mem(x), mem(x))


def test_autoattack_with_memory_matches_without(digits_test, trained_model):
    """On a contractive DEQ (a unique fixed point) the memory leaves AutoAttack's result within
    1 sample in 100. (On a non-contractive one a warm start can follow another equilibrium
    than the cold solve reaches: benchmarks/RESULTS.md.)"""
    pytest.importorskip("pyautoattack")
    deq = trained_model("mlp_deq", steps=60, hidden=32, norm="spectral", scale=0.9)
    x, y = digits_test(128)
    common = dict(eps=EPS, version="custom", attacks=["apgd-ce", "square"], seed=0,
                  settings={"apgd.n_iter": 10, "square.n_queries": 50})
    plain = AutoAttack(deq, **common)
    mem = AutoAttack(deq, warm_memory=True, **common)
    assert mem.memory is not None and plain.memory is None
    r_plain = _robust(deq, plain(x, y), y)
    r_mem = _robust(deq, mem(x, y), y)
    assert abs(int(r_plain.sum()) - int(r_mem.sum())) <= max(1, x.shape[0] // 100)
    assert not mem.memory.active  # forgotten after the run
    assert mem.last_memory_stats["warm"] > 0


def test_joint_forward_iterations_stop_at_the_solver_tolerance(deq, digits_test):
    """``fwd_iters`` is a cap: the plain forward iterations stop once every sample's residual is
    within the model's tolerance (the carried state of a converged point needs one)."""
    import torch.nn.functional as F
    from robustdeq.deq.joint import JointInputGradient
    x, y = digits_test(16)
    loss = lambda logits, t: F.cross_entropy(logits, t)  # noqa: E731
    j = JointInputGradient(deq, fwd_iters=60)
    j(x, y, loss)
    assert j._picard  # every first solve converged: plain iterations from here on
    n0 = j.stats["forward_nfe"]
    j(x, y, loss)  # the same point: already within tolerance
    assert j.stats["forward_nfe"] - n0 == 1
    n1 = j.stats["forward_nfe"]
    x2 = (x + 0.1).clamp(0, 1)
    j(x2, y, loss)
    used = j.stats["forward_nfe"] - n1
    assert 1 < used < 60
    # the carried state is then the fixed point at x2 to within the solver's tolerance
    u = deq.inject(x2)
    with torch.no_grad():
        fz = deq.f(j.z, u)
    res = (fz - j.z).reshape(16, -1).norm(dim=1) / fz.reshape(16, -1).norm(dim=1)
    assert float(res.max()) <= deq.solver_config.tol


def test_joint_sweeps_use_the_cells_closed_form_vjp_with_autograds_values(deq, digits_test):
    # the adjoint sweeps before the last take the cell's closed-form J^T mu (no autograd pass);
    # the same iteration through autograd (a subclass whose map is the cell's, so without the
    # closed form) gives the same gradients up to float rounding, call after call
    from robustdeq.deq.cells import MLPCell
    from robustdeq.deq.joint import JointInputGradient
    x, y = digits_test(16)
    plain = copy.deepcopy(deq).double()

    class SameMap(MLPCell):
        def forward(self, z, u):
            return super().forward(z, u)
    other = copy.deepcopy(plain)
    other.cell.__class__ = SameMap
    assert plain.closed_form_vjp and not other.closed_form_vjp
    counts = []
    h = plain.cell.register_vjp_hook(counts.append)
    try:
        grads = []
        for m in (plain, other):
            jig = JointInputGradient(m)
            xs = x.double()
            out = []
            for _ in range(4):
                g = jig(xs, y, lambda logits, yy: torch.nn.functional.cross_entropy(logits, yy, reduction="sum"))
                out.append(g)
                xs = (xs + 0.02 * g.sign()).clamp(0, 1)
            grads.append(torch.stack(out))
    finally:
        h.remove()
    assert counts.count("vjp_at") == 4 and counts.count("vjp") == 7 + 3 * 2   # first call: 8 sweeps
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_f_bound_is_the_models_map(deq):
    # the bound map equals f; a model that changes f gets its own f
    u = torch.randn(3, deq.cell.hidden)
    z = torch.randn(3, deq.cell.hidden)
    with torch.no_grad():
        assert torch.equal(deq.f_bound(u)(z), deq.f(z, u))
    shifted = copy.deepcopy(deq)

    class Shifted(type(deq)):
        def f(self, z, u):
            return super().f(z, u) + 1.0
    shifted.__class__ = Shifted
    with torch.no_grad():
        assert torch.equal(shifted.f_bound(u)(z), deq.f(z, u) + 1.0)
    assert not shifted.closed_form_vjp


def test_joint_gradient_at_a_fixed_input_converges_to_the_ift_gradient(digits_test):
    """Oracle: on a contraction (float64, ||W||_2 <= 0.6) repeated calls at the same input carry
    the state and adjoint to the fixed point and to the solution of mu = J^T mu + g, so the joint
    gradient converges to the model's IFT input gradient (autograd through a tight solve)."""
    import torch.nn.functional as F
    from robustdeq.deq import zoo
    from robustdeq.deq.grad import ImplicitGrad
    from robustdeq.deq.joint import JointInputGradient
    tight = {"name": "anderson", "max_iter": 300, "tol": 1e-13, "stop_mode": "abs"}
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=16, norm="spectral", scale=0.6, init_gain=0.9,
                      solver=tight).double().eval()
    model.grad = ImplicitGrad(tight)
    x, y = digits_test(6)
    x = x.double()
    loss = lambda logits, t: F.cross_entropy(logits, t, reduction="sum")  # noqa: E731
    xr = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(loss(model(xr), y), xr)[0]
    j = JointInputGradient(model)
    errs = []
    for _ in range(25):
        errs.append(float((j(x, y, loss) - ref).norm() / ref.norm()))
    assert errs[0] > 1e-5                      # the first call's 8 sweeps: not yet the IFT gradient
    assert errs[-1] < 1e-9, errs
    torch.testing.assert_close(j(x, y, loss), ref, rtol=1e-8, atol=1e-12)
