"""Every check of robustdeq.eval.checks fires on a model built to trip it and stays silent on a
plain trained DEQ."""
import contextlib
import copy
import warnings

import pytest
import torch

from robustdeq.errors import ConfigError, GradientMaskingWarning, NonConvergenceWarning
from robustdeq.eval import CHECKS, CheckConfig, evaluate
from robustdeq.eval import checks as C
from robustdeq.eval import AttackSpec, trajectory_stats

from helpers.evals import (BudgetModel, NoisyModel, QuantizedModel, ReversedGradModel, SoftmaxModel,
                           nonconverging_deq, unstable_linear_deq)



@pytest.fixture(scope="module")
def data(digits_test):
    return digits_test(32)


@pytest.fixture(scope="module")
def deq(trained_deq):
    return trained_deq


@pytest.fixture(scope="module")
def mlp(trained_mlp):
    return trained_mlp


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        yield


# -- 1. randomised output -------------------------------------------------------------------------
def test_randomized_fires_on_noisy_model(mlp, data):
    x, _ = data
    with pytest.warns(GradientMaskingWarning, match="randomized_output"):
        r = C.check_randomized(NoisyModel(mlp), x)
    assert r.fired and r.value > 1e-3


def test_randomized_silent_on_deq(deq, data):
    r = C.check_randomized(deq, data[0])
    assert not r.fired and r.value == 0.0


# -- 2. softmax ---------------------------------------------------------------------------------
def test_softmax_fires(mlp, data):
    with pytest.warns(GradientMaskingWarning, match="softmax"):
        r = C.check_softmax(SoftmaxModel(mlp), data[0])
    assert r.fired and r.value < 1e-4


def test_softmax_silent_on_deq_and_on_log_probabilities(deq, mlp, data):
    assert not C.check_softmax(deq, data[0]).fired

    class LogSoftmax(torch.nn.Module):
        def forward(self, x):
            return torch.log_softmax(mlp(x), dim=1)
    # log-probabilities are valid logits (shift-invariant losses): silent
    assert not C.check_softmax(LogSoftmax(), data[0]).fired


# -- 3. zero / non-finite gradients ------------------------------------------------------------------
def test_zero_gradients_fires_on_quantized_input(mlp, data):
    x, y = data
    with pytest.warns(GradientMaskingWarning, match="zero_gradients"):
        r = C.check_gradients(QuantizedModel(mlp), x, y)
    assert r.fired and r.value == 1.0 and r.details["zero"] == x.shape[0]


def test_nonfinite_gradients_fire(mlp, data):
    class NaNGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    class M(torch.nn.Module):
        def forward(self, x):
            return mlp(NaNGrad.apply(x))
    with pytest.warns(GradientMaskingWarning):
        r = C.check_gradients(M(), *data)
    assert r.fired and r.details["non_finite"] == data[0].shape[0]


def test_zero_gradients_silent_on_deq(deq, data):
    r = C.check_gradients(deq, *data)
    assert not r.fired and r.value == 0.0


def test_input_gradients_match_finite_differences(mlp, data):
    x, y = data[0][:2].double(), data[1][:2]
    net = copy.deepcopy(mlp).double()
    g = C.input_gradients(net, x, y)
    h = 1e-6
    for i in (10, 20, 43):
        xp, xm = x.clone(), x.clone()
        xp.view(2, -1)[:, i] += h
        xm.view(2, -1)[:, i] -= h
        fd = (C.margin(net(xp), y) - C.margin(net(xm), y)) / (2 * h)
        assert torch.allclose(g.view(2, -1)[:, i], fd, atol=1e-6)


# -- 4. black-box stronger ------------------------------------------------------------------------------
def test_black_box_fires_on_misleading_gradient(mlp, data):
    """White-box PGD follows the negated gradient and fails; a transfer attack from the honest
    network (the black-box side) breaks most samples."""
    x, y = data
    model = ReversedGradModel(mlp)

    def transfer(target, *, eps, norm, steps, seed):
        from robustdeq.attacks import PGD
        return PGD(mlp, eps=eps, steps=steps, norm=norm, seed=seed)
    suite = ["pgd", AttackSpec("transfer", transfer, kind="transfer", scope="model")]
    with pytest.warns(GradientMaskingWarning, match="black_box_stronger"):
        rep = evaluate(model, x, y, eps=0.2, suite=suite, steps=10,
                       check_config=CheckConfig(enabled=("black_box_stronger",)))
    r = rep.check("black_box_stronger")
    assert r.fired and r.details["black_box_only"] >= 10
    res = rep.result()
    assert res.attack("pgd").accuracy > res.attack("transfer").accuracy


def test_black_box_square_probe_fires(mlp, data):
    """Without black-box attacks in the suite the check runs torchattacks' Square itself."""
    x, y = data
    with pytest.warns(GradientMaskingWarning, match="black_box_stronger"):
        rep = evaluate(ReversedGradModel(mlp), x, y, eps=0.3, suite=["pgd", "pgd-margin"], steps=5,
                       check_config=CheckConfig(enabled=("black_box_stronger",), black_box_queries=100))
    r = rep.check("black_box_stronger")
    assert r.fired and "Square" in r.details["source"] and r.details["probe"]


def test_a_silent_square_probe_says_it_is_short(mlp, data):
    """The probe found nothing on an honest model: its message says how little it searched, so
    that a quiet check is not read as evidence that a full score-based search finds nothing."""
    x, y = data
    rep = evaluate(mlp, x, y, eps=0.05, suite=["pgd"], steps=5,
                   check_config=CheckConfig(enabled=("black_box_stronger",), black_box_queries=20))
    r = rep.check("black_box_stronger")
    assert not r.fired and r.details["probe"] and r.details["black_box_only"] == 0
    assert r.details["probed"] > 0 and f"short probe on {r.details['probed']} of" in r.message
    assert "Square (20 queries)" in r.message
    assert "standard suite" in r.message


def _aa_with_square(target, *, eps, norm, steps, seed):
    from robustdeq.attacks import AutoAttack
    return AutoAttack(target, eps=eps, norm=norm, version="custom", attacks=["apgd-ce", "square"],
                      settings={"apgd.n_iter": 5, "square.n_queries": 300}, seed=seed)


@pytest.mark.parametrize("cascade", [True, False])
def test_black_box_reads_the_square_stage_of_autoattack(mlp, data, cascade):
    """AutoAttack's Square stage is black-box evidence, per sample: on a model whose input
    gradient is negated, Square breaks samples that APGD missed; those the PGD unit missed too
    are black-box-only. With a cascade (AutoAttack attacks what PGD left) the count equals the
    unit's own per-stage accuracies; without one, the samples whose first breaker is AutoAttack
    among those its Square stage broke (the report's per-sample first successes)."""
    x, y = data
    model = ReversedGradModel(mlp)
    suite = ["pgd", AttackSpec("aa-square", _aa_with_square)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        rep = evaluate(model, x, y, eps=0.3, suite=suite, steps=5, cascade=cascade,
                       check_config=CheckConfig(enabled=("black_box_stronger",), black_box_queries=50))
    r = rep.check("black_box_stronger")
    assert r.fired and r.details["source"] == "Square inside aa-square"
    res = rep.result()
    square = res.attack("aa-square").describe["score_based_samples"]
    if cascade:
        # oracle: the unit's own per-stage accuracies (cumulative, per batch)
        rec = res.attack("aa-square").describe["robust_accuracy_after"]
        expect = sum(round(b["n"] * (b["apgd-ce"] - b["square"])) for b in rec)
    else:
        expect = sum(res.first_success[i] == "aa-square" for i in square)
    assert r.details["black_box_only"] == expect > 0
    assert r.details["samples"] == x.shape[0] and r.value == pytest.approx(expect / x.shape[0])


def _native_square(target, *, eps, norm, steps, seed):
    from robustdeq.attacks import Square
    return Square(target, eps=eps, norm=norm, n_queries=200, seed=seed)


@pytest.mark.parametrize("masked", [True, False])
def test_black_box_fires_when_square_breaks_what_gradients_left(mlp, data, masked):
    """A model whose input gradient is zero (quantised input): the native Square unit breaks
    samples PGD left and the check fires; on the plain network it stays silent."""
    x, y = data
    model = QuantizedModel(mlp) if masked else mlp
    suite = ["pgd", AttackSpec("native-square", _native_square, kind="black-box")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        rep = evaluate(model, x, y, eps=0.1, suite=suite, steps=10,
                       check_config=CheckConfig(enabled=("black_box_stronger",)))
    r = rep.check("black_box_stronger")
    assert r.details["source"] == "native-square"
    assert r.fired == masked, r.message
    if masked:
        assert r.details["black_box_only"] >= 3


def test_square_units_are_registered(mlp):
    """"square" is the native attack at AutoAttack's budget; the libraries' versions keep theirs."""
    from robustdeq.attacks import AutoAttack, Square, TorchAttack
    from robustdeq.eval.suites import builtin_spec
    ctx = None
    sq, = builtin_spec("square", ctx)
    atk = sq.factory(mlp, eps=0.1, norm="Linf", steps=10, seed=0)
    assert sq.kind == "black-box" and isinstance(atk, Square)
    assert (atk.n_queries, atk.p_init, atk.rescale_schedule) == (5000, 0.8, False)
    pa, = builtin_spec("pyautoattack-square", ctx)
    assert pa.kind == "black-box" and isinstance(pa.factory(mlp, eps=0.1, norm="Linf", steps=10,
                                                            seed=0), AutoAttack)
    ta, = builtin_spec("torchattacks-square", ctx)
    pytest.importorskip("torchattacks")
    assert ta.kind == "black-box" and isinstance(ta.factory(mlp, eps=0.1, norm="Linf", steps=10,
                                                            seed=0), TorchAttack)


def test_black_box_pure_function():
    white = torch.tensor([True, False, False, False])
    assert not C.check_black_box(white, white.clone(), warn=False).fired
    r = C.check_black_box(white, torch.tensor([True, True, False, False]), warn=False)
    assert r.fired and r.details["black_box_only"] == 1 and r.value == 0.25
    with pytest.raises(ConfigError):
        C.check_black_box(white, torch.ones(3, dtype=torch.bool))
    assert C.check_black_box_count(1, 4, warn=False).value == 0.25
    with pytest.raises(ConfigError):
        C.check_black_box_count(5, 4)


# -- 5. large eps not at chance -----------------------------------------------------------------------
def test_large_eps_fires_on_misleading_gradient(mlp, data):
    with pytest.warns(GradientMaskingWarning, match="large_eps"):
        r = C.check_large_eps(ReversedGradModel(mlp), *data)
    assert r.fired and r.value > 0.5 and r.threshold == pytest.approx(0.2)


def test_large_eps_silent_on_plain_models(mlp, deq, data):
    assert not C.check_large_eps(mlp, *data).fired
    with _quiet():
        r = C.check_large_eps(deq, *data, norm="L2")
    assert not r.fired and r.details["eps"] == 4.0


# -- 6. robust accuracy rising with steps or eps --------------------------------------------------------
def test_monotonic_fires_when_more_steps_help_the_model(mlp, data):
    cfg = CheckConfig()
    model = BudgetModel(mlp, budget=cfg.steps_short)
    with pytest.warns(GradientMaskingWarning, match="non_monotonic"):
        r = C.check_monotonic(model, *data, eps=0.1, config=cfg)
    assert r.fired and r.details["accuracy_long"] > r.details["accuracy_short"] + cfg.monotonic_tol


def test_monotonic_fires_when_larger_eps_helps_the_model(mlp, data):
    """The model's gradient turns misleading after the first eps of the sweep."""
    x, y = data
    model = BudgetModel(mlp, budget=5)  # exactly the backward passes of PGD-5 on one batch
    with pytest.warns(GradientMaskingWarning, match="non_monotonic"):
        rep = evaluate(model, x, y, eps=[0.1, 0.3], suite=["pgd"], steps=5,
                       check_config=CheckConfig(enabled=("non_monotonic",)))
    r = rep.check("non_monotonic")
    assert rep.robust_accuracy(0.3) > rep.robust_accuracy(0.1)
    assert r.fired and "eps 0.3" in r.message


def test_monotonic_silent_on_plain_models(mlp, deq, data):
    assert not C.check_monotonic(mlp, *data, eps=0.1).fired
    assert not C.check_monotonic(mlp, *data, eps=None, sweep={0.1: 0.5, 0.2: 0.3}).fired
    assert C.check_monotonic(mlp, *data, eps=None, sweep={0.1: 0.3, 0.2: 0.5}, warn=False).fired
    assert C.check_monotonic(mlp, *data, eps=None).skipped


# -- 7. non-convergence ---------------------------------------------------------------------------------
def test_nonconvergence_fires_on_starved_solver(data):
    x, y = data
    with _quiet():
        stats = trajectory_stats(nonconverging_deq(), x, y, 64)
    assert stats["solver"]["converged_fraction"] == 0.0
    with pytest.warns(NonConvergenceWarning, match="non_convergence"):
        r = C.check_convergence(stats["solver"], {})
    assert r.fired and r.value == 1.0


def test_nonconvergence_fires_on_adversarial_inputs_only():
    clean = {"converged_fraction": 1.0}
    r = C.check_convergence(clean, {0.1: {"converged_fraction": 0.8}}, warn=False)
    assert r.fired and "adversarial eps=0.1" in r.message
    assert C.check_convergence(None, {}).skipped


def test_nonconvergence_silent_on_deq(deq, data):
    stats = trajectory_stats(deq, *data, 64)
    assert not C.check_convergence(stats["solver"], {}).fired


# -- 8. estimator disagreement -------------------------------------------------------------------------
def test_estimators_fire_on_unstable_fixed_point(data):
    model = unstable_linear_deq()
    with _quiet():
        assert bool(model.run(data[0]).stats.converged.all())  # the solver does find z*
    with pytest.warns(GradientMaskingWarning, match="estimator_disagreement"):
        r = C.check_estimators(model, *data)
    # sum_{k<8} (-1.5)^k < 0 while (1 + 1.5)^-1 > 0: opposite directions (closed form)
    assert r.fired and r.value == pytest.approx(-1.0, abs=1e-6)


def test_estimators_silent_on_deq_and_skipped_without_deq(deq, mlp, data):
    r = C.check_estimators(deq, *data)
    assert not r.fired and r.value > 0.9
    assert C.check_estimators(mlp, *data).skipped


# -- all checks silent on a plain DEQ through the harness ---------------------------------------------
def test_every_check_silent_on_plain_deq(digits_test, trained_contractive_deq):
    # A well-posed (contractive) DEQ attacked with PGD-20: an honest white-box setting. (On a
    # non-contractive DEQ with weak PGD the black-box probe may legitimately win on a few samples:
    # that is the finding of Yang et al. 2022, not a false alarm.) The checks run on what the
    # units found (per-sample successes, worst-case inputs), whichever units ran: quick's gradient
    # units without its APGD-T runs (most of its cost) exercise all of them, and fewer white-box
    # units leave the black-box probe more samples to win on, not fewer.
    deq = trained_contractive_deq
    x, y = digits_test(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientMaskingWarning)
        warnings.simplefilter("error", NonConvergenceWarning)
        rep = evaluate(deq, x, y, eps=[0.05, 0.1], suite=["pgd-ift", "pgd-unrolled", "apgd-ce"], steps=20)
    assert [c.name for c in rep.checks] == list(CHECKS)
    assert rep.fired == []
    assert not any(c.skipped for c in rep.checks), [c.message for c in rep.checks if c.skipped]


def test_check_config_validation():
    with pytest.raises(ConfigError):
        CheckConfig(subset=0)
    with pytest.raises(ConfigError):
        CheckConfig(steps_short=10, steps_long=5)
    with pytest.raises(ConfigError):
        CheckConfig(enabled=("no_such_check",))
    with pytest.raises(ConfigError):
        CheckConfig(cosine_threshold=2.0)


def test_apgd_ce_units_native_and_pyautoattack(mlp, data):
    """``pyautoattack-apgd-ce`` runs AutoAttack's APGD-CE stage alone: its per-stage record has
    only that stage, and the unit's robust accuracy is that stage's (oracle: AutoAttack's own
    bookkeeping of the same run). ``apgd-ce`` is robustdeq's APGD-CE: the same algorithm (other
    random starts: the units' seeds differ), within 2 samples of it here."""
    x, y = data
    rep = evaluate(mlp, x, y, eps=0.1, suite=["pyautoattack-apgd-ce", "apgd-ce"], checks=False)
    a = rep.result().attack("pyautoattack-apgd-ce")
    assert a.describe["attacks"] == ["apgd-ce"]
    rec = a.describe["robust_accuracy_after"]
    assert [set(b) for b in rec] == [{"n", "clean", "apgd-ce"}] * len(rec)
    n = x.shape[0]
    robust = sum(round(b["n"] * b["apgd-ce"]) for b in rec)
    assert a.accuracy == pytest.approx(robust / n)
    native = rep.result().attack("apgd-ce")
    assert native.describe["implementation"] == "robustdeq" and native.describe["steps"] == 100
    assert abs(native.accuracy - a.accuracy) * n <= 2
    assert a.accuracy < rep.clean_accuracy


# -- 9. breaks only where the solver stops unconverged -------------------------------------------------
def _budget_deq(max_iter):
    """``z = 0.5 z + x`` (2-d, plain fixed-point iteration from 0): the k-th iterate is
    ``2 (1 - 0.5^k) x``, the equilibrium ``2 x``; class 1 iff ``z_1 > 0.9``."""
    from robustdeq import DEQClassifier
    from robustdeq.deq.cells import LinearCell
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
        head.bias.copy_(torch.tensor([0.9, 0.0], dtype=torch.float64))
    return DEQClassifier(torch.nn.Identity(), LinearCell(0.5 * torch.eye(2, dtype=torch.float64)),
                         head.double(), solver={"name": "fixed_point", "max_iter": max_iter, "tol": 1e-3})


def test_unconverged_breaks_known_answer():
    model = _budget_deq(2)
    # the model's answer after 2 iterations: z_1 = 1.5 x_1
    x = torch.tensor([[0.5, 0.3],    # 0.75 < 0.9: class 0; equilibrium 1.0 > 0.9: class 1 (the solver's break)
                      [0.4, 0.3],    # 0.6 and 0.8: class 0 both ways (a break of the equilibrium too)
                      [0.0, 0.0],    # z = 0 at once (converged): class 0 (a converged break)
                      [0.9, 0.1]],   # 1.35: class 1, correct (not broken)
                     dtype=torch.float64)
    y = torch.tensor([1, 1, 1, 1])
    broken = torch.tensor([True, True, True, False])
    with pytest.warns(NonConvergenceWarning, match="unconverged_breaks"):
        r = C.check_unconverged_breaks(model, x, y, broken)
    assert r.fired and r.details["samples"] == [0] and r.details["unconverged"] == 2
    assert r.details["broken"] == 3 and r.details["no_equilibrium"] == []
    assert r.value == pytest.approx(1 / 4)
    # a tight budget too small to reach the equilibrium proves nothing: not counted
    r = C.check_unconverged_breaks(model, x, y, broken, CheckConfig(equilibrium_iter_factor=2), warn=False)
    assert not r.fired and r.details["no_equilibrium"] == [0, 1]
    # the model with a budget that converges: no such break (the same inputs, nothing unconverged)
    r = C.check_unconverged_breaks(_budget_deq(40), x, y, broken, warn=False)
    assert not r.fired and r.details["unconverged"] == 0
    # the threshold is a share of the samples; below it the message still counts them
    r = C.check_unconverged_breaks(model, x, y, broken, CheckConfig(unconverged_break_fraction=0.25), warn=False)
    assert not r.fired and r.details["samples"] == [0] and r.message.startswith("1 of the 3")


def test_unconverged_breaks_skips_and_rejects(mlp, data):
    x, y = data
    assert C.check_unconverged_breaks(mlp, x, y, torch.ones(len(y), dtype=torch.bool)).skipped
    with pytest.raises(ConfigError, match="batch size"):
        C.check_unconverged_breaks(_budget_deq(2), torch.zeros(3, 2, dtype=torch.float64),
                                   torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ConfigError, match="equilibrium_tol_factor"):
        CheckConfig(equilibrium_tol_factor=0.0)
    with pytest.raises(ConfigError, match="equilibrium_iter_factor"):
        CheckConfig(equilibrium_iter_factor=0)


def test_unconverged_breaks_in_an_evaluation():
    """Through evaluate(): the worst-case examples of a budget-starved DEQ are re-judged at the
    equilibrium; the check names the samples and fires with a NonConvergenceWarning."""
    model = _budget_deq(2)
    x = torch.tensor([[0.62, 0.3], [0.9, 0.1]], dtype=torch.float64)  # 0.93 and 1.35 at 2 iterations
    y = torch.tensor([1, 1])
    with pytest.warns(NonConvergenceWarning, match="unconverged_breaks"):
        rep = evaluate(model, x, y, eps=0.05, suite=["pgd-ift"], steps=5,
                       check_config=CheckConfig(enabled=("unconverged_breaks",)))
    # the first sample falls below 0.9 within the ball at 2 iterations (1.5 x 0.57 = 0.855) but
    # not at its equilibrium (2 x 0.57 = 1.14); the second is robust either way
    assert rep.results[0].robust == [False, True]
    c = rep.check("unconverged_breaks")
    assert c.fired and c.details["samples"] == [0] and c.details["eps"] == 0.05


class _ShiftDown:
    """A 'black-box' attack for the report test: lowers the first input coordinate by eps."""

    def __init__(self, eps):
        self.eps = eps

    def __call__(self, x, y):
        return (x - self.eps * torch.tensor([1.0, 0.0], dtype=x.dtype)).clamp(0, 1)

    def describe(self):
        return {"name": "shift-down", "eps": self.eps}


def test_black_box_wins_at_unconverged_solves_are_noted():
    """Where only a black-box attack breaks a sample and that break exists only at the solver's
    unconverged iterate, the report says so next to the black-box-stronger check."""
    model = _budget_deq(2)
    x = torch.tensor([[0.62, 0.3], [0.9, 0.1]], dtype=torch.float64)
    y = torch.tensor([1, 1])
    spec = AttackSpec("shift-down", lambda target, *, eps, norm, steps, seed: _ShiftDown(eps), kind="black-box")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = evaluate(model, x, y, eps=0.05, suite=[spec], steps=5,
                       check_config=CheckConfig(enabled=("black_box_stronger", "unconverged_breaks")))
    bb, ub = rep.check("black_box_stronger"), rep.check("unconverged_breaks")
    assert bb.fired and bb.details["only"] == [0]
    assert ub.fired and ub.details["by_eps"] == [{"eps": 0.05, "samples": [0]}]
    assert any("only where the model's solve stops unconverged (samples [0]" in n for n in rep.notes)
    # a model whose solve converges: the same black-box win is the equilibrium's, and no note
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = evaluate(_budget_deq(40), torch.tensor([[0.47, 0.3]], dtype=torch.float64), y[:1], eps=0.05,
                       suite=[spec], steps=5,
                       check_config=CheckConfig(enabled=("black_box_stronger", "unconverged_breaks")))
    assert rep.check("black_box_stronger").fired and not rep.check("unconverged_breaks").fired
    assert not any("unconverged_breaks" in n for n in rep.notes)
