"""The shrinking-batch solver driver used by PGD's warm-started implicit gradient gives exactly
the per-sample results of ``Solver.solve`` (same iterates, residuals, flags, steps)."""
import pytest
import torch

from robustdeq.deq.shrink import solve_shrinking
from robustdeq.deq.solvers import get_solver


def problem(b=96, d=6, seed=0):
    """z = tanh(A_i z + u_i): contraction rates spread over the batch, so samples stop at very
    different steps; a few samples get a non-contractive A (they hit max_iter)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(b, d, d, generator=g, dtype=torch.float64)
    rate = torch.linspace(0.05, 0.97, b, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, ord=2)[:, None, None] * rate[:, None, None]
    A[::17] = -3 * torch.eye(d, dtype=torch.float64)  # plain iteration oscillates: never converges
    u = torch.randn(b, d, generator=g, dtype=torch.float64)

    def make_f(idx):
        Ai, ui = (A, u) if idx is None else (A[idx], u[idx])
        return lambda z: torch.tanh(torch.einsum("bij,bj->bi", Ai, z) + ui)
    return make_f, torch.zeros(b, d, dtype=torch.float64)


@pytest.mark.parametrize("cfg", [
    {"name": "anderson", "max_iter": 40, "tol": 1e-10, "stop_mode": "abs"},
    {"name": "anderson", "max_iter": 25, "tol": 1e-6, "select": "last", "m": 3},
    {"name": "broyden", "max_iter": 30, "tol": 1e-9},
    {"name": "fixed_point", "max_iter": 40, "tol": 1e-9},  # some samples hit max_iter
])
def test_shrinking_solve_matches_the_solvers_own_solve(cfg):
    make_f, z0 = problem()
    ref = get_solver(cfg).solve(make_f(None), z0)
    out = solve_shrinking(get_solver(cfg), make_f, z0, min_batch=8)
    assert out.work < ref.nfe * z0.shape[0], "the batch never shrank"
    assert torch.equal(out.converged, ref.converged) and torch.equal(out.diverged, ref.diverged)
    assert torch.equal(out.steps, ref.steps)
    torch.testing.assert_close(out.z, ref.z, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.residual, ref.residual, rtol=1e-6, atol=1e-14)
    assert out.nfe == ref.nfe
    assert len(set(ref.steps.tolist())) > 3  # samples stopped at many different steps


def test_small_batches_are_not_shrunk():
    make_f, z0 = problem(b=6)
    cfg = {"name": "anderson", "max_iter": 30, "tol": 1e-8}
    out = solve_shrinking(get_solver(cfg), make_f, z0)  # default min_batch 8
    ref = get_solver(cfg).solve(make_f(None), z0)
    assert out.work == out.nfe * 6
    torch.testing.assert_close(out.z, ref.z)
