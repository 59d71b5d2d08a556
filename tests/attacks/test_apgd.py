"""Native APGD (Croce & Hein 2020): the step-size checkpoints and halving rules against a
hand-computed trace, the DLR losses against their closed forms, fidelity with pyautoattack on a
small CNN, EOT on a randomized model, DEQ-native runs judged by the model's inference, and the
model guard."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers.attacks import check_ball
from robustdeq.attacks import build
from robustdeq.attacks.apgd import (APGD, APGDT, _normalize, checkpoints, dlr_per_sample,
                                    dlr_targeted_per_sample)
from robustdeq.attacks.base import logits_of
from robustdeq.errors import ConfigError, InputError


def test_checkpoints_follow_the_papers_schedule():
    """w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert checkpoints(100) == [math.ceil(round(q * 100, 6)) for q in p[1:]]
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(20) == [4, 7, 9] + list(range(10, 21))


class _Scripted(nn.Module):
    """1-D input, 2 classes: clean (no-grad) logits [0, -1] (class 0); the attack's n-th
    gradient call on the batch of 2 gets logits [0, L_n + 1e-6 x] so the cross-entropy of
    class 0 (increasing in L_n) follows a scripted sequence whatever the iterate (other calls,
    such as the attack's one-sample check that the model has input gradients, get [0, 0])."""

    def __init__(self, script):
        super().__init__()
        self.script = list(script)
        self.calls = 0

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        if not torch.is_grad_enabled():
            return torch.cat([torch.zeros_like(x[:, :1]), -torch.ones_like(x[:, :1])], 1)
        if x.shape[0] != 2:
            return torch.cat([torch.zeros_like(x[:, :1]), 1e-6 * x[:, :1]], 1)
        g = self.script[self.calls] + 1e-6 * x[:, :1]
        self.calls += 1
        return torch.cat([torch.zeros_like(g), g], 1)


def test_step_size_halving_follows_a_hand_computed_trace():
    """N = 20: windows of 4, 3, 2, then 1 iteration (checkpoints after iterations 4, 7, 9, 10,
    ..., 20). Hand-computed from the script below (L_0 is the start's loss):
    - it 4: increases at 4 of 4 comparisons (the first one against 0): > 0.75 * 4, keep;
    - it 7: 3, 3.5, 3.9 after 4: 2 increases <= 2.25 -> halve (condition 1);
    - it 9: 2 of 2 increases, and halved last time -> keep;
    - it 10: 1 of 1 increase, not halved last time and best loss (4) not improved -> halve
      (condition 2 alone);
    - it 11: 5 (a new best), halved last time -> keep; it 12: 6, best improved -> keep;
    - it 13: 5.5, no increase -> halve; then increasing improving losses -> keep."""
    script = [0.5, 1, 2, 3, 4, 3, 3.5, 3.9, 3.95, 3.99, 3.999, 5, 6, 5.5, 7, 8, 9, 10, 11, 12, 13]
    model = _Scripted(script)
    atk = APGD(model, eps=0.1, steps=20, seed=0)
    x, y = torch.full((2, 1), 0.5), torch.zeros(2, dtype=torch.long)
    atk(x, y)
    assert model.calls == 21
    halved = [(it, n) for it, n in atk.last_halvings]
    assert [it for it, _ in halved] == [4, 7, 9] + list(range(10, 21))
    assert [n for _, n in halved] == [0, 2, 0, 2, 0, 0, 2] + [0] * 7  # both samples
    assert atk.last_step_size.tolist() == pytest.approx([2 * 0.1 / 8] * 2)


def test_dlr_losses_match_their_closed_forms():
    z = torch.tensor([[3.0, 1.0, 4.0, 0.5, 2.0]])
    # sorted decreasingly: 4, 3, 2, 1, 0.5
    assert float(dlr_per_sample(z, torch.tensor([0]))) == pytest.approx(-(3 - 4) / (4 - 2))
    assert float(dlr_per_sample(z, torch.tensor([2]))) == pytest.approx(-(4 - 3) / (4 - 2))
    yt = torch.tensor([[0, 4]])
    assert float(dlr_targeted_per_sample(z, yt)) == pytest.approx(-(3 - 2) / (4 - (2 + 1) / 2))
    yt = torch.tensor([[2, 3]])
    assert float(dlr_targeted_per_sample(z, yt)) == pytest.approx(-(4 - 0.5) / (4 - 1.5))


def _same_as_pyautoattack(model, x, y, norm, eps, steps, same_examples=False, **native):
    """Same seed and budget: APGD-CE (2 restarts), APGD-DLR and APGD-T give pyautoattack's
    robust flags (within 1 sample in 200: on fewer than 200 samples, the same flags); with
    ``same_examples``, its examples too. ``native``: options of the native attacks (their
    gradient oracle's policy)."""
    pytest.importorskip("pyautoattack")
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    pairs = [
        (APGDAttack(model, n_iter=steps, norm=norm, n_restarts=2, eps=eps, seed=0, loss="ce",
                    device=x.device),
         APGD(model, eps=eps, norm=norm, steps=steps, restarts=2, loss="ce", **native)),
        (APGDAttack(model, n_iter=steps, norm=norm, n_restarts=1, eps=eps, seed=0, loss="dlr",
                    device=x.device),
         APGD(model, eps=eps, norm=norm, steps=steps, loss="dlr", **native)),
        (APGDAttack_targeted(model, n_iter=steps, norm=norm, eps=eps, seed=0, n_target_classes=3,
                             device=x.device),
         APGDT(model, eps=eps, norm=norm, steps=steps, n_target_classes=3, **native)),
    ]
    for ref, mine in pairs:
        with torch.random.fork_rng():
            a = ref.perturb(x, y)
        b = mine(x, y)
        check_ball(x, b, eps, norm)
        ra, rb = logits_of(model, a).argmax(1) == y, logits_of(model, b).argmax(1) == y
        assert int((ra != rb).sum()) <= x.shape[0] // 200, mine.name
        if same_examples:
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=mine.name)
        assert torch.equal(mine.last_robust, rb)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.8)])
def test_apgd_matches_pyautoattack_on_the_feed_forward_baseline(norm, eps, digits_test, trained_model):
    x, y = digits_test(24)
    _same_as_pyautoattack(trained_model("ff_mlp", hidden=32).eval(), x, y, norm, eps, steps=8)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.8)])
def test_apgd_with_cold_solves_matches_pyautoattack_on_a_deq(norm, eps, digits_test, trained_model):
    """On a DEQ pyautoattack solves the fixed point cold at every step and backpropagates through
    the model's own gradient; the native attacks with exact cold solves (``method="exact",
    warm_start=False``) make the same computation, so they return the same examples (with warm
    starts or the joint iteration the solves stop elsewhere within their tolerance, and the
    paths part)."""
    x, y = digits_test(24)
    model = trained_model("mlp_deq", hidden=32).eval()
    assert APGD(model, eps=eps, norm=norm, method="exact", warm_start=False).oracle.logits_are_inference
    assert not APGD(model, eps=eps, norm=norm, method="exact").oracle.logits_are_inference
    assert not APGD(model, eps=eps, norm=norm).oracle.logits_are_inference   # the joint iteration
    _same_as_pyautoattack(model, x, y, norm, eps, steps=8, same_examples=True, method="exact",
                          warm_start=False)


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.8)])
def test_apgd_matches_pyautoattack_on_a_small_cnn(norm, eps, digits_test, trained_model):
    x, y = digits_test(200)
    _same_as_pyautoattack(trained_model("ff_cnn", steps=60).eval(), x, y, norm, eps, steps=25)


@pytest.mark.parametrize("targeted", [False, True])
def test_false_claims_of_an_estimated_oracle_change_nothing(targeted, monkeypatch, digits_test,
                                                            trained_model):
    """On a DEQ the joint iteration's logits are an estimate. An oracle whose logits claim every
    sample misclassified after its first call, with the same losses and gradients, must give
    the same verdicts: a claim counts only once the model's own inference confirms it, so a
    run's success flags and its latest misclassified iterate are the model's own (an
    unconfirmed claim neither marks a sample broken nor replaces a confirmed example)."""
    from robustdeq.attacks.oracle import GradientOracle
    model = trained_model("mlp_deq", hidden=32).eval()
    x, y = digits_test(40)
    runs = []
    real_run = APGD._run

    def recorded_run(self, xr, yr, *args, **kw):
        out = real_run(self, xr, yr, *args, **kw)
        runs.append((yr, out))
        return out

    monkeypatch.setattr(APGD, "_run", recorded_run)

    def attack():
        cls, extra = (APGDT, {"n_target_classes": 3}) if targeted else (APGD, {})
        atk = cls(model, eps=0.1, steps=20, seed=0, **extra)   # early_stop=False: runs to the end
        atk(x, y)
        return atk.last_robust

    honest = attack()
    assert 0 < int(honest.sum()) < int((logits_of(model, x).argmax(1) == y).sum())
    real_call = GradientOracle.__call__
    calls = []

    def lying_call(self, xa, y_loss, loss_fn):
        out = real_call(self, xa, y_loss, loss_fn)
        calls.append(1)
        if len(calls) > 1:   # every row claimed misclassified: the true class's logit lowest
            true = y_loss[:, 0] if y_loss.dim() == 2 else y_loss
            logits = out.logits.clone()
            logits[torch.arange(logits.shape[0]), true] = logits.min(dim=1).values - 1.0
            out.logits = logits
        return out

    monkeypatch.setattr(GradientOracle, "__call__", lying_call)
    runs.clear()
    lying = attack()
    assert len(calls) > 1 and runs
    assert torch.equal(lying, honest)
    for yr, (_, acc, _, x_best_adv) in runs:   # the run's flags are the model's own
        wrong = logits_of(model, x_best_adv).argmax(1) != yr
        assert torch.equal(~acc, wrong & ~acc) and bool(acc.any())


def test_eot_beats_single_samples_on_a_randomized_model(digits_test, trained_model):
    """A randomized model whose random term moves the logits little (``0.1 sin(100 r.x) a``
    with ``r`` drawn per call) but dominates a single gradient: APGD with eot_iter=32 averages
    that noise out and breaks clearly more samples (judged by the noise-free part) than with one
    gradient sample per step."""
    class Noisy(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.register_buffer("a", torch.randn(10, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            f = x.flatten(1)
            r = torch.randn_like(f)
            return self.base(x) + 0.1 * torch.sin(100 * (r * f).sum(1, keepdim=True)) * self.a

    base = trained_model("ff_mlp", hidden=32)
    model = Noisy(base).eval()
    x, y = digits_test(64)

    def robust(x_adv):  # the noise-free decision
        return int((logits_of(base, x_adv).argmax(1) == y).sum())

    torch.manual_seed(1)
    one = robust(APGD(model, eps=0.1, steps=10, seed=0)(x, y))
    torch.manual_seed(1)
    eot = APGD(model, eps=0.1, steps=10, seed=0, eot_iter=32)
    assert eot.describe()["eot_iter"] == 32 and "EOT" in eot.name
    many = robust(eot(x, y))
    assert many <= one - 6


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_apgd_on_a_deq_is_judged_by_the_models_inference_and_leaves_it_untouched(digits_test, trained_model):
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    x, y = digits_test(32)
    before = {k: v.clone() for k, v in deq.state_dict().items()}
    deq.train()
    for cls, kw in ((APGD, {}), (APGDT, dict(n_target_classes=2)),
                    (APGDT, dict(n_target_classes=3, parallel_runs=3, early_stop=True))):
        atk = cls(deq, eps=0.1, steps=6, **kw)
        x_adv = atk(x, y)
        check_ball(x, x_adv, 0.1, "Linf")
        assert torch.equal(atk.last_robust, logits_of(deq, x_adv).argmax(1) == y)
        assert atk.last_stats["runs"][0]["method"] == "joint"  # the solves converge here
    assert deq.training and all(torch.equal(v, before[k]) for k, v in deq.state_dict().items())
    exact = APGD(deq, eps=0.1, steps=6, method="exact")
    exact(x, y)
    assert exact.last_stats["runs"][0]["method"] == "exact"


def _fixed_start(self, x, gen):
    """A start that is a fixed function of the sample (the same for every run and batch)."""
    return (x + self.eps * _normalize(torch.sin(37.0 * x + 1.0), self.norm)).clamp(0.0, 1.0)


@pytest.mark.parametrize("early_stop", [False, True])
def test_parallel_runs_are_the_runs_one_after_another_side_by_side(early_stop, monkeypatch,
                                                                    digits_test, trained_model):
    """Off a DEQ APGD is per sample: with starts that depend on the sample only, APGD-T's runs
    side by side (all 8 in one batch, or 3 + 3 + 2) break exactly the samples its runs one
    after another break, and without early stopping give the same examples (a sample's example
    is its first breaking run's in both)."""
    model = trained_model("ff_mlp", hidden=32).eval()
    x, y = digits_test(48)
    monkeypatch.setattr(APGD, "_random_start", _fixed_start)
    kw = dict(eps=0.1, steps=10, n_target_classes=4, restarts=2, early_stop=early_stop)
    seq = APGDT(model, **kw)
    x_seq = seq(x, y)
    assert sum(r["broken"] > 0 for r in seq.last_stats["runs"]) >= 2  # more than one run breaks
    assert 6 <= int((~seq.last_robust).sum()) <= 42
    for parallel in (8, 3):
        par = APGDT(model, parallel_runs=parallel, **kw)
        x_par = par(x, y)
        check_ball(x, x_par, 0.1, "Linf")
        assert torch.equal(par.last_robust, seq.last_robust)
        assert torch.equal(par.last_robust, logits_of(model, x_par).argmax(1) == y)
        assert len(par.last_stats["runs"]) == (1 if parallel == 8 else 3)
        if not early_stop:
            assert torch.allclose(x_par, x_seq, atol=1e-6)


def test_apgd_registry_names_and_bad_options(digits_test, trained_model):
    ff = trained_model("ff_mlp", hidden=32)
    assert isinstance(build("apgd-ce", ff, eps=0.1), APGD)
    assert build("apgd-t", ff, eps=0.1).name.startswith("APGD-T")
    assert build("apgd-dlr", ff, eps=0.1).loss == "dlr"
    with pytest.raises(ConfigError):
        APGD(ff, eps=0.1, loss="margin")
    with pytest.raises(ConfigError):
        APGD(ff, eps=0.1, rho=1.5)
    with pytest.raises(ConfigError):
        APGDT(ff, eps=0.1, parallel_runs=0)
    with pytest.raises(ConfigError):
        build("apgd-ce", ff, eps=0.1, targeted=True)
    x, y = digits_test(4)
    with pytest.raises(InputError):
        APGDT(ff, eps=0.1, n_target_classes=10)(x, y)


def test_stripes_start_is_the_square_attacks_start():
    """start="stripes": the Linf Square attack's start, checked against pyautoattack's
    SquareAttack drawing from a generator in the same state (its ``random_choice`` on the
    (B, c, 1, w) shape): one sign per column and channel, the point clipped to [0, 1]."""
    from pyautoattack.square import SquareAttack
    torch.manual_seed(0)
    x = torch.rand(5, 2, 6, 7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(84, 3))
    atk = APGD(model, eps=0.25, start="stripes")
    gen = torch.Generator().manual_seed(11)
    start = atk._random_start(x, gen)
    torch.manual_seed(11)
    ref = SquareAttack(model, eps=0.25, device="cpu")
    expected = torch.clamp(x + 0.25 * ref.random_choice([5, 2, 1, 7]), 0.0, 1.0)
    assert torch.equal(start, expected)
    sign = torch.sign(start - x)
    moved = (start - x).abs() > 1e-6
    # one sign per column wherever the pixel could move that way
    col = torch.where(moved, sign, torch.zeros_like(sign))
    assert ((col == col.max(dim=2, keepdim=True).values) | ~moved).all()
    assert ((col == col.min(dim=2, keepdim=True).values) | ~moved).all()
    full = ((start - x).abs() - 0.25).abs() < 1e-6
    assert (full | (start == 0) | (start == 1)).all()  # a full eps shift unless clipped
    # flat inputs: a sign per feature
    flat = atk._random_start(x.flatten(1), torch.Generator().manual_seed(3))
    assert flat.shape == (5, 84)
    assert ((flat - x.flatten(1)).abs() <= 0.25 + 1e-6).all()


class _ColumnGate(nn.Module):
    """(B, 1, 8, 8) images, 2 classes: class 1's logit is ``20 sum_j relu(m_j - 0.25)``, ``m_j``
    the mean of column j, class 0's is 0.5. On black images with eps = 0.3 the model is wrong
    once one column has more than 5/6 of its pixels raised by eps; the gradient is zero wherever
    no column is that bright, as throughout the uniform start's region (a threshold in the first
    layer, as adversarially trained models learn)."""

    def forward(self, x):
        h = torch.relu(x.mean(dim=-2) - 0.25).flatten(1).sum(1, keepdim=True)
        return torch.cat([torch.full_like(h, 0.5), 20 * h], 1)


def test_stripes_start_breaks_a_model_whose_gradient_vanishes_at_uniform_starts():
    """Property: from the uniform start the gradient is exactly zero, so APGD never moves and
    breaks nothing; from the stripes start (a vertex with whole columns raised) it breaks the
    samples whose start raises a column (each does with probability 1 - 2^-8)."""
    x, y = torch.zeros(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)
    model = _ColumnGate()
    assert (logits_of(model, x).argmax(1) == 0).all()
    uniform = APGD(model, eps=0.3, steps=20, restarts=2, seed=0)
    assert (logits_of(model, uniform(x, y)).argmax(1) == 0).all()
    stripes = APGD(model, eps=0.3, steps=20, restarts=2, seed=0, start="stripes")
    adv = stripes(x, y)
    check_ball(adv, x, 0.3, "Linf")
    assert int((logits_of(model, adv).argmax(1) == 1).sum()) >= 15


def test_start_option_is_checked_and_reported(trained_model):
    ff = trained_model("ff_mlp", hidden=32)
    with pytest.raises(ConfigError, match="start"):
        APGD(ff, eps=0.1, start="corner")
    with pytest.raises(ConfigError, match="Linf"):
        APGD(ff, eps=0.5, norm="L2", start="stripes")
    atk = APGDT(ff, eps=0.1, start="stripes")
    assert atk.start == "stripes" and atk.params()["start"] == "stripes"
    assert "stripes" in atk.name
    assert APGD(ff, eps=0.1).params()["start"] == "uniform"
