"""Solvers against closed forms on linear DEQs (float64)."""
import pytest
import torch

from robustdeq.config import SolverConfig
from robustdeq.deq.solvers import get_solver, solve
from robustdeq.errors import ConfigError

SOLVERS = ["fixed_point", "anderson", "broyden"]


def linear_problem(b=4, d=6, rho=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = rho * A / torch.linalg.matrix_norm(A, ord=2)
    c = torch.randn(b, d, generator=g, dtype=torch.float64)
    f = lambda z: z @ A.T + c
    z_exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - A, c.T).T
    return f, c, z_exact


@pytest.mark.parametrize("name", SOLVERS)
def test_reaches_closed_form_fixed_point(name):
    f, c, z_exact = linear_problem()
    res = solve(f, torch.zeros_like(c), SolverConfig(name=name, max_iter=200, tol=1e-11, stop_mode="abs"))
    assert res.converged.all()
    torch.testing.assert_close(res.z, z_exact, atol=1e-9, rtol=0)
    assert (res.residual <= 1e-11).all()


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_accelerated_solvers_beat_plain_iteration(name):
    f, c, _ = linear_problem(rho=0.95)
    cfg = dict(max_iter=500, tol=1e-8, stop_mode="abs")
    plain = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", **cfg))
    fast = solve(f, torch.zeros_like(c), SolverConfig(name=name, **cfg))
    assert fast.converged.all() and plain.converged.all()
    assert fast.nfe < plain.nfe / 2


def test_per_sample_convergence_masks():
    # sample 0: contraction 0.1 (easy), sample 1: 0.99 (hard), sample 2: expansive (diverges)
    rates = torch.tensor([0.1, 0.99, 1.5], dtype=torch.float64)[:, None]
    c = torch.ones(3, 2, dtype=torch.float64)
    f = lambda z: rates * z + c
    res = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=40, tol=1e-6,
                                                     stop_mode="abs", divergence_factor=1e3))
    assert res.converged.tolist() == [True, False, False]
    assert res.diverged.tolist() == [False, False, True]
    assert res.steps[0] < 10 and res.steps[1] == 40
    # the easy sample is frozen at its converged iterate
    torch.testing.assert_close(res.z[0], c[0] / 0.9, atol=1e-6, rtol=0)


def test_nan_is_reported_not_raised():
    c = torch.ones(2, 3, dtype=torch.float64)
    def f(z):
        out = 0.5 * z + c
        out[1] = float("nan")
        return out
    for name in SOLVERS:
        res = solve(f, torch.zeros_like(c), SolverConfig(name=name, max_iter=60, tol=1e-8))
        assert res.converged.tolist() == [True, False]
        assert res.diverged.tolist() == [False, True]
        assert torch.isfinite(res.z[0]).all()


def test_select_best_vs_last():
    # oscillating map: residuals do not decrease monotonically
    c = torch.ones(1, 1, dtype=torch.float64)
    f = lambda z: -1.05 * z + c
    best = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=6, tol=0, select="best", stop_mode="abs"))
    last = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=6, tol=0, select="last", stop_mode="abs"))
    assert best.residual.item() <= last.residual.item()
    assert best.residual.item() == pytest.approx(best.residual_history.min().item())
    assert last.residual.item() == pytest.approx(last.residual_history[-1].item())
    assert best.best_step.item() == 0


def test_relative_vs_absolute_stopping():
    c = 1e3 * torch.ones(1, 4, dtype=torch.float64)
    f = lambda z: 0.5 * z + c
    rel = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=100, tol=1e-3, stop_mode="rel"))
    ab = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=100, tol=1e-3, stop_mode="abs"))
    assert rel.steps.item() < ab.steps.item()
    diff = (f(rel.z) - rel.z).norm() / f(rel.z).norm()
    assert diff <= 1e-3


def test_trajectory_records_raw_iterates_with_step_index():
    c = torch.ones(2, 3, dtype=torch.float64)
    f = lambda z: 0.5 * z + c
    res = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=10, tol=0), record="all")
    assert [t.step for t in res.trajectory] == list(range(10))
    for t in res.trajectory:  # z_k = (1 - 0.5^k) * 2c for plain iteration
        torch.testing.assert_close(t.z, (1 - 0.5 ** t.step) * 2 * c)
    sub = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=10, tol=0), record=[0, 3, 7])
    assert [t.step for t in sub.trajectory] == [0, 3, 7]
    none = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=10, tol=0))
    assert none.trajectory == []


def test_requested_states_after_early_stop_are_frozen_iterates():
    c = torch.ones(1, 2, dtype=torch.float64)
    f = lambda z: 0.1 * z + c
    res = solve(f, torch.zeros_like(c), SolverConfig(name="fixed_point", max_iter=30, tol=1e-6, stop_mode="abs"),
                record=[2, 25])
    assert [t.step for t in res.trajectory] == [2, 25]
    late = res.trajectory[1]
    assert not late.active.any() and torch.isnan(late.residual).all()
    torch.testing.assert_close(late.z, res.z)


@pytest.mark.parametrize("name", SOLVERS)
def test_stepped_solve_with_changing_f_matches_fresh_solve(name):
    f1, c, _ = linear_problem(seed=1)
    f2, c2, z2_exact = linear_problem(seed=2)
    solver = get_solver(SolverConfig(name=name, max_iter=200, tol=1e-10, stop_mode="abs"))
    state = solver.init(f1, torch.zeros_like(c))
    for _ in range(5):
        state = solver.step(f1, state)
    state = solver.reset(state)          # f changes: forget memory and flags
    while state.active.any() and state.step < 200:
        state = solver.step(f2, state)
    res = solver.finalize(state)
    fresh = solver.solve(f2, torch.zeros_like(c2))
    torch.testing.assert_close(res.z, fresh.z, atol=1e-8, rtol=0)
    torch.testing.assert_close(res.z, z2_exact, atol=1e-8, rtol=0)


def test_registry_and_config_errors():
    with pytest.raises(ConfigError, match="unknown solver"):
        get_solver("newton")
    with pytest.raises(ConfigError, match="unknown option"):
        get_solver({"name": "anderson", "stop_mod": "abs"})
    with pytest.raises(ConfigError, match="stop_mode"):
        SolverConfig(stop_mode="relative")
    with pytest.raises(ConfigError):
        SolverConfig(max_iter=0)
    with pytest.raises(ConfigError, match="record"):
        solve(lambda z: z, torch.zeros(1, 1), record="some")
    with pytest.raises(ConfigError, match="beyond max_iter"):
        solve(lambda z: z, torch.zeros(1, 1), SolverConfig(max_iter=3), record=[5])


def test_full_backprop_through_solver_matches_closed_form():
    d = 4
    g = torch.Generator().manual_seed(3)
    A = 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    c = torch.randn(2, d, generator=g, dtype=torch.float64, requires_grad=True)
    for name in SOLVERS:
        res = solve(lambda z: z @ A.T + c, torch.zeros(2, d, dtype=torch.float64),
                    SolverConfig(name=name, max_iter=100, tol=1e-12, stop_mode="abs"))
        w = torch.arange(d, dtype=torch.float64)
        (gc,) = torch.autograd.grad((res.z * w).sum(), c)
        expected = torch.linalg.solve((torch.eye(d, dtype=torch.float64) - A).T, w).expand(2, d)
        torch.testing.assert_close(gc, expected, atol=1e-7, rtol=0)


def test_sample_starting_at_its_fixed_point_leaves_the_batch_unharmed():
    # sample 0 starts exactly at its fixed point: all its Anderson residuals are exactly zero (a
    # singular Gram system), which must neither crash nor poison the other sample
    A = torch.tensor([[0.5, 0.25], [-0.25, 0.5]], dtype=torch.float64)
    c = torch.tensor([[0.75, 1.0], [0.75, 1.0]], dtype=torch.float64)  # fixed point (2, 1)
    f = lambda z: z @ A.T + c
    z_exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, c.T).T
    z0 = torch.zeros_like(c)
    z0[0] = torch.tensor([2.0, 1.0], dtype=torch.float64)  # A z + c == z exactly in float64
    assert torch.equal(f(z0)[0], z0[0])
    for tol in (0.0, 1e-12):
        res = solve(f, z0, SolverConfig(name="anderson", max_iter=60, tol=tol, stop_mode="abs"))
        assert torch.isfinite(res.z).all()
        assert bool(res.converged[0]) and int(res.steps[0]) == 1
        torch.testing.assert_close(res.z, z_exact, atol=1e-10, rtol=0)


def test_select_continues_a_solve_on_a_subset_exactly():
    # Solver.select slices every per-sample tensor and the solver memory: the kept samples then
    # iterate exactly as they would have in the whole batch
    f_all, c, _ = linear_problem(b=6, rho=0.9)
    for name in SOLVERS:
        solver = get_solver(SolverConfig(name=name, max_iter=40, tol=1e-12, stop_mode="abs"))
        ref = solver.init(f_all, torch.zeros_like(c))
        for _ in range(4):
            ref = solver.step(f_all, ref)
        keep = torch.tensor([1, 4])
        sub = solver.select(ref, keep)
        assert sub.batch_size == 2 and sub.n_active == 2 and sub.shape == (2, c.shape[1])
        f_sub = lambda z: f_all(torch.zeros_like(c).index_copy(0, keep, z))[keep]
        for _ in range(5):
            ref = solver.step(f_all, ref)
            sub = solver.select(solver.step(f_sub, sub), torch.arange(2))
        torch.testing.assert_close(sub.z, ref.z[keep], rtol=0, atol=1e-12)
        torch.testing.assert_close(sub.last_res, ref.last_res[keep], rtol=1e-9, atol=0)


def test_iterate_map_plain_steps_reach_the_closed_form_fixed_point():
    """``iterate_map`` on the affine contraction ``z -> A z + b`` (``||A||_2 = 0.5``): the steps
    are exactly ``z <- A z + b``, it stops at the first step whose starting residual is within the
    tolerance, its result is the closed-form fixed point ``(I - A)^-1 b`` within the contraction
    bound, and with no steps allowed it returns its start."""
    from robustdeq.deq.solvers import iterate_map, residual
    torch.manual_seed(0)
    d = 6
    A = torch.randn(d, d, dtype=torch.float64)
    A *= 0.5 / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn(3, d, dtype=torch.float64)
    f = lambda z: z @ A.T + b  # noqa: E731
    cfg = SolverConfig(tol=1e-8, stop_mode="abs", max_iter=200)
    z0 = torch.zeros(3, d, dtype=torch.float64)
    z, r, k = iterate_map(f, z0, cfg, 200)
    zs = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - A, b.T).T
    assert 1 < k < 200 and bool((r <= 1e-8).all())
    # r = ||z_k - z_{k-1}||, so ||z_k - z*|| <= rho / (1 - rho) r = r for rho = 0.5
    assert float((z - zs).norm(dim=1).max()) <= float(r.max()) + 1e-12
    manual = z0
    for _ in range(k):
        manual = f(manual)
    assert torch.equal(z, manual)
    # one step fewer would not have stopped: the stopping rule is the first step within tol
    zp = z0
    for _ in range(k - 1):
        zp = f(zp)
    assert float(residual(zp, f(zp), cfg).max()) <= 1e-8
    zq = z0
    for _ in range(k - 2):
        zq = f(zq)
    assert float(residual(zq, f(zq), cfg).max()) > 1e-8
    z_none, r_none, k_none = iterate_map(f, z0, cfg, 0)
    assert z_none is z0 and r_none is None and k_none == 0


@pytest.mark.parametrize("name", SOLVERS)
def test_max_iter_counts_evaluations_and_iterates_counts_steps(name):
    # a solve of max_iter = k evaluates f at z_0 .. z_{k-1}; select="last" returns z_{k-1} (the
    # last evaluated iterate), while DEQClassifier.iterates(u, n) returns z_n: the recorded
    # state n, and the result of a solve with max_iter = n + 1
    from torch import nn
    from robustdeq.deq.cells import LinearCell
    from robustdeq.deq.model import DEQClassifier
    _, c, _ = linear_problem(b=3, d=5, rho=0.9)
    A = torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    A = 0.9 * A / torch.linalg.matrix_norm(A, ord=2)
    cfg = SolverConfig(name=name, max_iter=12, tol=0.0, select="last", damping=0.7)
    model = DEQClassifier(nn.Identity(), LinearCell(A), nn.Identity(), solver=cfg, validate_inputs=False)
    u = c
    f = lambda z: model.f(z, u)  # noqa: E731
    rec = solve(f, torch.zeros_like(u), cfg, record="all")
    assert rec.nfe == 12 and [t.step for t in rec.trajectory] == list(range(12))
    torch.testing.assert_close(rec.z, rec.trajectory[11].z, atol=0, rtol=0)   # z_{max_iter - 1}
    for n in (1, 4, 11):
        zn = model.iterates(u, torch.full((3,), n))
        torch.testing.assert_close(zn, rec.trajectory[n].z, atol=1e-13, rtol=0)
        torch.testing.assert_close(zn, solve(f, torch.zeros_like(u), cfg.replace(max_iter=n + 1)).z,
                                   atol=1e-13, rtol=0)
        torch.testing.assert_close(solve(f, torch.zeros_like(u), cfg.replace(max_iter=n)).z,
                                   rec.trajectory[n - 1].z, atol=1e-13, rtol=0)
    mixed = model.iterates(u, torch.tensor([2, 7, 5]))   # per-sample n
    for b, n in enumerate((2, 7, 5)):
        torch.testing.assert_close(mixed[b], rec.trajectory[n].z[b], atol=1e-13, rtol=0)
