"""The fast paths of the JIIO engine (the block iteration, cached projections, select="next") and the
JIIO-AT options.

Oracles: the generic fixed-point solver (robustdeq.deq.solvers) iterating the augmented map on the
stacked vector ``[z; mu; x]`` (the engine's original loop: the plain block iteration must give the
same iterates, selection, residuals and cost), each constraint's own ``project``, the stacked
Anderson iteration (the same KKT point as the plain one on a smooth problem), and the model's own
forward solve (``z_init="solve"``).
"""

import pytest
import torch

from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.deq.jiio import (Box, CostCounter, Intersection, JIIOConfig, L2Ball, LinfBall, Mask, Unconstrained,
                                _Augmented, _projector, cross_entropy_objective, kkt_residuals, optimize_inputs,
                                threat_constraint)
from robustdeq.deq.solvers import get_solver
from robustdeq.defenses.objectives import JIIOAT
from robustdeq.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=16).double().eval()
    x, y = load_digits("test")
    return m, x[:8].double(), y[:8]


def stacked_solver_oracle(model, objective, constraint, x0, cfg):
    """The generic solver on the stacked, weighted vector (the engine's loop before the block
    iteration): returns (z, mu, x) selected, residual, mean residual history, nfe."""
    with torch.no_grad():
        z0 = model.init_state(model.inject(x0))
    aug = _Augmented(model, objective, constraint, x0.shape, z0.shape, cfg)
    slv = get_solver(cfg.solver_config())
    with torch.no_grad():
        state = slv.init(aug, aug.pack(z0, torch.zeros_like(z0), x0))
        for k in range(cfg.iters):
            if k == cfg.switch and cfg.alpha_final is not None and cfg.alpha_final != aug.alpha:
                aug.alpha = cfg.alpha_final
                state = slv.reset(state)
            state = slv.step(aug, state)
        res = slv.finalize(state)
    z, mu, x = aug.unpack(state.z.view(res.z.shape) if cfg.select == "next" else res.z)
    return (z, mu, constraint.project(x)), res.residual, [float(r.mean()) for r in state.residual_history], res.nfe


@pytest.mark.parametrize("case", [
    dict(direction="sign", select="best"),
    dict(direction="sign", select="last"),
    dict(direction="sign", select="next"),
    dict(direction="sign", select="best", alpha_final=0.01, switch_at=5),
    dict(direction="normalized", select="best", norm="L2"),
    dict(direction="gradient", select="best", weights=(1.0, 2.0, 0.5)),
])
def test_plain_block_iteration_matches_the_stacked_fixed_point_solver(small, case):
    m, x, y = small
    case = dict(case)
    norm = case.pop("norm", "Linf")
    eps = 0.1 if norm == "Linf" else 0.5
    cfg = JIIOConfig(iters=12, alpha=eps / 4, solver="fixed_point", resolve=False, **case)
    C = threat_constraint(x, eps, norm)
    obj = cross_entropy_objective(y)
    (z_o, mu_o, x_o), res_o, hist_o, nfe_o = stacked_solver_oracle(m, obj, C, x, cfg)
    with CostCounter(m) as c:
        r = optimize_inputs(m, obj, C, x0=x, config=cfg)
    exact = case.get("weights") is None  # non-unit weights: the stacked path rounds w * z / w
    tol = dict(atol=0, rtol=0) if exact else dict(atol=1e-12, rtol=1e-12)
    assert torch.allclose(r.x, x_o, **tol)
    assert torch.allclose(r.mu, mu_o, **tol)
    assert torch.allclose(r.z_joint, z_o, **tol)
    assert torch.allclose(r.residual, res_o, atol=1e-12, rtol=1e-9)
    assert r.history["residual"] == pytest.approx(hist_o, rel=1e-9, abs=1e-12)
    assert r.nfe == nfe_o == cfg.iters
    assert c.forward == cfg.iters and c.backward == cfg.iters  # one f and one VJP per iteration
    assert len(r.history["objective"]) == cfg.iters
    assert float(r.mu.abs().max()) > 0 and float((r.x - x).abs().max()) > 0  # a real solve


def test_block_iteration_stops_samples_as_the_solver_does():
    """Per-sample stopping (tol = 0, as the solver): a sample at an exact fixed point (residual 0)
    and samples whose iterates overflow (non-finite residual) stop and keep their last iterate;
    the selection falls back as the solver's does."""
    from torch import nn
    from robustdeq.deq.cells import LinearCell
    from robustdeq.deq.model import DEQClassifier
    torch.manual_seed(0)
    inj, head = nn.Linear(3, 4, bias=False).double(), nn.Linear(4, 2).double()
    model = DEQClassifier(inj, LinearCell(1e60 * torch.eye(4, dtype=torch.float64)), head,
                          validate_inputs=False, warn_nonconvergence=False).eval()
    x = torch.rand(3, 3, dtype=torch.float64)
    x[0] = 0.0  # u = 0: z stays 0, residual exactly 0 from the first iteration
    obj = lambda out, xx: 0.0 * out.sum(1)  # noqa: E731
    for select in ("best", "last", "next"):
        cfg = JIIOConfig(iters=10, alpha=0.01, direction="sign", solver="fixed_point", resolve=False, select=select)
        (z_o, mu_o, x_o), res_o, hist_o, _ = stacked_solver_oracle(model, obj, Box(0, 1), x, cfg)
        r = optimize_inputs(model, obj, Box(0, 1), x0=x, config=cfg)
        for a, b in ((r.z_joint, z_o), (r.mu, mu_o), (r.x, x_o), (r.residual, res_o)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert r.history["residual"] == pytest.approx(hist_o, nan_ok=True)
        assert float(r.residual[0]) == 0.0 and not bool(torch.isfinite(torch.tensor(hist_o[-1])))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("direction", ["sign", "gradient"])
def test_select_next_is_select_last_one_evaluation_later(small, solver, direction):
    """K evaluations with select="next" return the state that K + 1 evaluations with "last"
    return (the map's output at the last evaluated iterate), at one f + one VJP less."""
    m, x, y = small
    C = threat_constraint(x, 0.1, "Linf")
    obj = cross_entropy_objective(y)
    out = {}
    for sel, k in (("next", 9), ("last", 10)):
        cfg = JIIOConfig(iters=k, alpha=0.025, direction=direction, solver=solver, select=sel, resolve=False)
        with CostCounter(m) as c:
            out[sel] = (optimize_inputs(m, obj, C, x0=x, config=cfg), c.total)
    (rn, cn), (rl, cl) = out["next"], out["last"]
    assert torch.equal(rn.x, rl.x) and torch.equal(rn.mu, rl.mu) and torch.equal(rn.z_joint, rl.z_joint)
    assert cn == cl - 2 and rn.nfe == 9
    assert rn.history["residual"] == rl.history["residual"][:9]
    assert float((rn.x - x).abs().max()) > 0
    # and it is one step further than "last" after the same 9 evaluations
    cfg = JIIOConfig(iters=9, alpha=0.025, direction=direction, solver=solver, select="last", resolve=False)
    assert not torch.equal(optimize_inputs(m, obj, C, x0=x, config=cfg).x, rn.x)


def test_cached_projection_equals_each_constraints_project():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 4, 4)
    c = torch.rand(5, 1, 4, 4)
    mask = torch.rand(5, 1, 4, 4) < 0.3
    probe = 2 * torch.randn(5, 1, 4, 4)
    for C in (Box(0, 1), Box(-0.2, 0.7), Unconstrained(), LinfBall(c, 0.1), L2Ball(c, 0.3), Mask(mask, c),
              Intersection(LinfBall(c, 0.1), Box(0, 1)), Intersection(Mask(mask, c), Box(0, 1)),
              Intersection(L2Ball(c, 0.3), Box(0, 1)), threat_constraint(c, 0.05, "L2")):
        assert torch.equal(_projector(C, x)(probe), C.project(probe)), C.describe()


def test_cached_projection_keeps_user_constraints_and_the_empty_intersection_error():
    class Shifted(Box):  # a user subclass: its own projection must be used
        def project(self, x):
            return super().project(x) + 0.0

    calls = []

    class Spy(Shifted):
        def project(self, x):
            calls.append(1)
            return super().project(x)

    x = torch.rand(3, 4)
    _projector(Spy(0, 1), x)(x)
    assert calls
    from robustdeq.errors import InputError
    with pytest.raises(InputError):
        _projector(Intersection(Box(0, 0.2), Box(0.5, 1)), x)


def test_stacked_anderson_reaches_the_plain_iterations_kkt_point(small):
    """On a smooth problem (plain gradient input steps, box inactive) Anderson on the stacked
    (z, mu, x) state and the plain joint iteration reach the same KKT point."""
    m, x, y = small
    x = 0.3 + 0.4 * x  # well inside [0, 1]
    obj = lambda out, xx: 0.5 * out.pow(2).sum(1) + 2.0 * (xx - x).pow(2).flatten(1).sum(1)  # noqa: E731
    C = Box(0, 1)
    r_fp = optimize_inputs(m, obj, C, x0=x, iters=400, step_size=0.1, direction="gradient",
                           solver="fixed_point", resolve=False)
    r_aa = optimize_inputs(m, obj, C, x0=x, iters=60, step_size=0.1, direction="gradient",
                           solver="anderson", resolve=False)
    for r in (r_fp, r_aa):
        kk = kkt_residuals(m, obj, C, r.x, r.z_joint, r.mu, alpha=0.1)
        assert float(kk["primal"].max()) < 1e-8 and float(kk["input"].max()) < 1e-8
    assert torch.allclose(r_aa.x, r_fp.x, atol=1e-8)
    assert torch.allclose(r_aa.mu, r_fp.mu, atol=1e-8)


# ------------------------------------------------------------------------------ JIIO-AT options
def test_jiioat_defaults_take_the_attack_path_and_describe_records_them(small):
    m, x, y = small
    o = JIIOAT(eps=0.1, iters=6, select="last")
    assert JIIOAT().iters == 14 and JIIOAT().select == "next"  # the defaults measured in bench_jiio.py
    d = o.describe()
    assert d["random_start"] is False and d["z_init"] == "init" and d["direction"] is None
    assert JIIOAT(eps=0.1, iters=6, random_start=True).describe()["random_start"] is True
    assert JIIOAT(eps=0.1, iters=6, z_init="solve").describe()["z_init"] == "solve"
    from robustdeq.deq.jiio import jiio_attack
    r = o.generate(m, x, y)
    assert (o.iters, o.select) == (6, "last")
    r0 = jiio_attack(m, x, y, eps=0.1, iters=6, solver="fixed_point", select="last", resolve=False)
    assert torch.equal(r.x, r0.x)


def test_jiioat_default_is_15_last_iterations_one_evaluation_cheaper(small):
    """The default (14 evaluations, select "next") trains on exactly the batch and loss of 15
    evaluations with select "last" (the configuration measured in bench_jiio.py)."""
    m, x, y = small
    m.train()
    a, b = JIIOAT(eps=0.1), JIIOAT(eps=0.1, iters=15, select="last")
    la, sa = a(m, x, y)
    lb, sb = b(m, x, y)
    m.eval()
    assert float(la.detach()) == float(lb.detach()) and sa["jiio_nfe"] == 14 and sb["jiio_nfe"] == 15
    assert torch.equal(a.generate(m, x, y).x, b.generate(m, x, y).x)


def test_jiioat_z_init_solve_starts_at_the_models_fixed_point(small):
    m, x, y = small
    o = JIIOAT(eps=0.1, iters=1, z_init="solve", select="last", alpha=0.0)
    r = o.generate(m, x, y)
    # one evaluation, select "last": the returned joint state is the start, the model's own solve
    with torch.no_grad():
        z_model = m.solve(m.inject(x)).z
    assert torch.equal(r.z_joint, z_model)


def test_jiioat_random_start_is_seeded_and_in_the_ball(small):
    m, x, y = small
    a = JIIOAT(eps=0.1, iters=3, random_start=True, seed=3, select="last", alpha=0.0)
    b = JIIOAT(eps=0.1, iters=3, random_start=True, seed=3, select="last", alpha=0.0)
    ra, rb = a.generate(m, x, y), b.generate(m, x, y)
    assert torch.equal(ra.x, rb.x)
    d = (ra.x - x).abs()
    assert float(d.max()) <= 0.1 + 1e-12 and float(d.mean()) > 0.02  # alpha 0: the random start itself
    assert float(ra.x.min()) >= 0 and float(ra.x.max()) <= 1
    loss, scalars = JIIOAT(eps=0.1, iters=3, random_start=True, z_init="solve", seed=0)(m.train(), x, y)
    m.eval()
    assert torch.isfinite(loss) and loss.requires_grad


@pytest.mark.parametrize("bad", [dict(random_start=1), dict(random_start="yes"), dict(z_init="clean"),
                                 dict(z_init=None), dict(select="first"), dict(select=None)])
def test_jiioat_bad_start_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        JIIOAT(eps=0.1, **bad)
