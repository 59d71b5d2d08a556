"""One engine per concept: the PGD engine, warm starts in deq/, the JIIO engine,
tensor helpers, explicit hooks and protocols."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from robustdeq import _tensor as T
from robustdeq.config import SolverConfig
from robustdeq.deq import zoo
from robustdeq.deq.grad import ImplicitGrad
from robustdeq.deq.protocols import FixedPointModel, TrajectoryModel
from robustdeq.deq.warm import WarmStart, WarmStartImplicitGrad
from robustdeq.errors import ConfigError


def _model(**kw):
    torch.manual_seed(0)
    return zoo.build("mlp_deq", hidden=16, **kw).eval()


def _batch(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_inner_pgd_linf_iterates_do_not_depend_on_the_loss_reduction():
    # the sign step ignores the factor B between the summed and the averaged loss exactly
    from robustdeq.defenses.objectives import inner_pgd
    m = _model()
    x, y = _batch()
    a = inner_pgd(m, x, y, eps=0.1, alpha=0.02, steps=4, random_start=False, reduction="sum")
    b = inner_pgd(m, x, y, eps=0.1, alpha=0.02, steps=4, random_start=False, reduction="mean")
    assert torch.equal(a, b)
    with pytest.raises(ConfigError):
        inner_pgd(m, x, y, eps=0.1, alpha=0.02, steps=1, reduction="max")


def test_inner_pgd_is_the_attack_engine():
    # PGD-AT's inner loop and the PGD attack (no random start, CE) are the same iterates
    import robustdeq.attacks as A
    from robustdeq.defenses.objectives import inner_pgd
    m = zoo.build("ff_mlp", hidden=16).eval()
    x, y = _batch()
    ours = inner_pgd(m, x, y, eps=0.1, alpha=0.02, steps=5, random_start=False)
    ref = A.PGD(m, eps=0.1, alpha=0.02, steps=5, random_start=False)(x, y)
    assert torch.equal(ours, ref)


def test_one_ball_projection():
    x = torch.rand(5, 3)
    d = torch.randn(5, 3)
    d[0] = 0
    for eps in (0.0, 0.3):
        out = T.clip_delta(d, eps, "L2")
        assert bool((out.norm(dim=1) <= eps * (1 + 1e-6) + 1e-12).all())
        assert torch.isfinite(out).all()
    # inside samples come back bit for bit; the factor equals torchattacks' min(eps / n, 1)
    xa = (x + 0.01 * d).clamp(0, 1)
    assert torch.equal(T.project_ball(xa, x, 10.0, "L2"), xa)
    n = d.norm(dim=1)
    ref = torch.nan_to_num(torch.min(0.3 / n, torch.ones_like(n)), nan=1.0)
    assert torch.equal(T.ball_factor(n, 0.3), ref)
    assert T.default_alpha(0.1, 10) == pytest.approx(0.025)


def test_warm_start_through_the_model_run():
    tight = SolverConfig(max_iter=200, tol=1e-7)
    m = _model(norm="spectral", scale=0.5)  # a contraction: every solve converges
    m.solver_config = tight
    m.grad = ImplicitGrad(tight)
    x, y = _batch()
    ws = WarmStart(adjoint=True)
    eq = m.run(x, warm=ws)
    assert ws.z is not None and bool(ws.z_ok.all())
    F.cross_entropy(eq.logits, y).backward()
    eq2 = m.run(x, warm=ws)     # starts at the fixed point: converges at once
    assert int(eq2.stats.steps.max()) < int(eq.stats.steps.max())
    assert ws.a is not None  # the adjoint of the first backward was picked up
    torch.testing.assert_close(eq2.logits, eq.logits, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError):
        m.run(x, warm=ws, z0=eq.z_star)
    with pytest.raises(ConfigError):
        WarmStartImplicitGrad(torch.zeros(3, 2), ok=torch.ones(2, dtype=torch.bool))


def test_model_counts_its_own_nonconvergence():
    m = _model(solver={"max_iter": 2, "tol": 0.0})
    x, y = _batch()
    from robustdeq.attacks.pgd import InputGradient
    before = m.nonconvergence_events
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        InputGradient(m, "ift")(x, y, F.cross_entropy)
    assert m.nonconvergence_events == before + 1
    assert m.note_nonconvergence(torch.ones(3, dtype=torch.bool)) is False


def test_protocols():
    m = _model()
    assert isinstance(m, FixedPointModel) and isinstance(m, TrajectoryModel)
    assert not isinstance(torch.nn.Linear(2, 2), FixedPointModel)
    wt = zoo.build("weight_tied_mlp", hidden=8)
    assert isinstance(wt, TrajectoryModel) and not isinstance(wt, FixedPointModel)


def test_cost_counter_uses_an_explicit_hook():
    from robustdeq.deq.jiio import CostCounter
    m = _model()
    m.train()
    x, y = _batch()
    with CostCounter(m) as c:
        F.cross_entropy(m(x), y).backward()
    assert c.backward > 1 and c.forward > 1
    assert "vjp_at" not in m.cell.__dict__          # nothing patched
    assert not m.cell.__dict__.get("_vjp_hooks")    # the hook was removed


def test_lyapunov_penalty_is_seeded():
    from robustdeq.defenses.lyapunov import LyapunovStability
    torch.manual_seed(0)
    m = zoo.build("lyadeq", hidden=8)
    x, _ = _batch(6)
    a = LyapunovStability(seed=3).penalty(m, x)[0]
    torch.manual_seed(123)
    b = LyapunovStability(seed=3).penalty(m, x)[0]
    assert torch.equal(a, b)


def test_the_objectives_do_not_import_the_attacks():
    # (that deq/ and attacks/ never import the defenses is the layer table's, tests/core/test_layers.py)
    # the training objectives take warm starts from robustdeq.deq, not from the attacks
    code = "import sys, robustdeq.defenses.objectives; assert 'robustdeq.attacks.base' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
