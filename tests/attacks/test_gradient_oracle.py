"""The input-gradient oracle (robustdeq.attacks.oracle): its gradients against autograd on the
model's own function, the per-sample losses, the policies' split of a batch by first-solve
convergence, shrinking batches and the EOT average."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robustdeq.attacks.oracle import GradientOracle
from robustdeq.errors import ConfigError


def _per_sample_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def test_exact_oracle_is_autograd_on_a_feed_forward_model(digits_test, trained_model):
    model = trained_model("ff_mlp", hidden=32)
    x, y = digits_test(16)
    out = GradientOracle(model, "auto")(x, y, _per_sample_ce)
    xr = x.clone().requires_grad_(True)
    loss = _per_sample_ce(model(xr), y)
    (g,) = torch.autograd.grad(loss.sum(), xr)
    assert torch.equal(out.grad, g)
    assert torch.allclose(out.loss, loss.detach())
    assert not bool(out.joint.any()) and bool(out.converged.all())


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_auto_serves_converged_first_solves_by_the_joint_iteration(digits_test, trained_model):
    deq = copy.deepcopy(trained_model("mlp_deq", steps=60, hidden=32))
    deq.solver_config = deq.solver_config.replace(max_iter=10)
    x, y = digits_test(32)
    ok = deq.run(x).stats.converged
    assert 0 < int(ok.sum()) < 32  # the premise: a mixed batch
    oracle = GradientOracle(deq, "auto")
    out = oracle(x, y, _per_sample_ce)
    assert torch.equal(oracle.joint_rows, ok) and torch.equal(out.joint, ok)
    assert oracle.method == "mixed"
    # each group gets what a batch of its own group gets from that policy
    joint = GradientOracle(deq, "joint")(x[ok], y[ok], _per_sample_ce)
    exact = GradientOracle(deq, "exact")(x[~ok], y[~ok], _per_sample_ce)
    torch.testing.assert_close(out.grad[ok], joint.grad, rtol=0, atol=1e-7)
    torch.testing.assert_close(out.grad[~ok], exact.grad, rtol=0, atol=1e-7)
    torch.testing.assert_close(out.loss[~ok], exact.loss, rtol=0, atol=1e-6)
    # a shrinking batch: the kept rows follow their own computation
    keep = torch.tensor([0, 3, 5, 8, 13, 21, 30])
    oracle.select(keep)
    x2 = (x[keep] + 0.01).clamp(0, 1)
    out2 = oracle(x2, y[keep], _per_sample_ce)
    assert torch.equal(out2.joint, ok[keep])
    # each computation ran twice (the joint probe on the whole batch was redone on its group)
    assert oracle.joint.stats["calls"] == oracle.exact.stats["calls"] == 2


def test_exact_oracle_converged_flags_and_cold_start_on_a_deq(digits_test, trained_model):
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    x, y = digits_test(8)
    out = GradientOracle(deq, "exact")(x, y, _per_sample_ce)
    assert torch.equal(out.converged, deq.run(x).stats.converged)
    assert torch.allclose(out.logits, deq(x), atol=1e-5)


def test_eot_averages_the_gradient(digits_test):
    """On a model whose logits are random, eot_iter=n averages n independent gradients: the
    mean of n single-call gradients under the same random stream."""
    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.lin(x.flatten(1) + 0.5 * torch.randn_like(x.flatten(1))) ** 2

    torch.manual_seed(0)
    model = Noisy()
    x, y = digits_test(4)
    torch.manual_seed(1)
    avg = GradientOracle(model, "exact", eot_iter=5)(x, y, _per_sample_ce).grad
    torch.manual_seed(1)
    single = GradientOracle(model, "exact")
    ref = sum(single(x, y, _per_sample_ce).grad for _ in range(5)) / 5
    torch.testing.assert_close(avg, ref)


def test_oracle_refuses_bad_options(trained_model):
    ff = trained_model("ff_mlp", hidden=32)
    with pytest.raises(ConfigError):
        GradientOracle(ff, "fast")
    with pytest.raises(ConfigError):
        GradientOracle(ff, "joint")
    with pytest.raises(ConfigError):
        GradientOracle(ff, "exact", eot_iter=0)
    with pytest.raises(ConfigError):
        GradientOracle(ff, "auto", joint_options={"fwd_iters": 2})


def test_joint_defaults_apply_where_the_joint_iteration_serves(digits_test, trained_model):
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    ff = trained_model("ff_mlp", hidden=32)
    o = GradientOracle(deq, "auto", joint_defaults={"fwd_iters": 10})
    assert o.joint.fwd_iters == 10
    o = GradientOracle(deq, "auto", joint_options={"fwd_iters": 4}, joint_defaults={"fwd_iters": 10})
    assert o.joint.fwd_iters == 4  # given options override an attack's defaults
    # unused (no error) where the exact computation serves
    assert GradientOracle(ff, "auto", joint_defaults={"fwd_iters": 10}).policy == "exact"
    assert GradientOracle(deq, "exact", joint_defaults={"fwd_iters": 10}).joint is None


def test_apgd_joint_iteration_tracks_its_large_steps(digits_test, trained_model):
    """APGD's default of more forward iterations per step: after a step of 2 eps (APGD's first
    step size) the joint iteration's logits are closer to the model's own at the new point."""
    from robustdeq.attacks import APGD
    from robustdeq.attacks.apgd import JOINT_FWD_ITERS
    from robustdeq.attacks.base import logits_of
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    x, y = digits_test(32)
    assert APGD(deq, eps=0.1).oracle.joint.fwd_iters == JOINT_FWD_ITERS > 3
    assert APGD(deq, eps=0.1, joint_options={"fwd_iters": 2}).oracle.joint.fwd_iters == 2
    err = {}
    for iters in (3, JOINT_FWD_ITERS, 2 * JOINT_FWD_ITERS):
        oracle = GradientOracle(deq, "joint", joint_options={"fwd_iters": iters})
        g = oracle(x, y, _per_sample_ce).grad
        x2 = (x + 0.2 * g.sign()).clamp(0, 1)
        out = oracle(x2, y, _per_sample_ce)
        err[iters] = float((out.logits - logits_of(deq, x2)).abs().amax(1).mean())
    # the lag shrinks with every iteration (a contraction from the carried state)
    assert err[2 * JOINT_FWD_ITERS] < err[JOINT_FWD_ITERS] < 0.6 * err[3]
