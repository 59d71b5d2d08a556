"""The native suites against pyautoattack: what quick and standard run, and quick within 1 point
of AutoAttack standard on a small trained DEQ (slow)."""
from __future__ import annotations

import pytest
import torch

from robustdeq.eval import SuiteContext, build_suite, evaluate, trajectory_model
from robustdeq.eval.suites import SQUARE_MAX_RUNS, SQUARE_RESTART_FRACTION


def _ctx(model, **kw):
    base = dict(model=model, trajectory_model=trajectory_model(model), has_deq=True, solver_model=True,
                randomized=False, horizon=10, max_state=29, num_classes=10)
    base.update(kw)
    return SuiteContext(**base)


def test_native_units_and_their_budgets(trained_model):
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    specs = {s.name: s for s in build_suite(["apgd-ce", "apgd-t", "apgd-t3", "apgd-dlr"], _ctx(deq))}
    atk = specs["apgd-t"].factory(deq, eps=0.1, norm="Linf", steps=20, seed=0)
    assert (atk.steps, atk.n_target_classes, atk.early_stop) == (100, 9, True)
    assert specs["apgd-t3"].factory(deq, eps=0.1, norm="Linf", steps=4, seed=0).steps == 20
    # apgd-t3x3: 3 runs on each of the 3 likeliest targets, from other starts than apgd-t's
    (r3,) = build_suite(["apgd-t3x3"], _ctx(deq))
    atk3 = r3.factory(deq, eps=0.1, norm="Linf", steps=20, seed=0)
    assert (atk3.steps, atk3.n_target_classes, atk3.restarts) == (100, 3, 3) and atk3.seed != atk.seed
    assert build_suite(["apgd-t3x3"], _ctx(deq, num_classes=3)) == []
    # the stripes units: the same runs from the Linf Square attack's start, under Linf only;
    # quick and standard run apgd-t3x3-stripes under Linf, apgd-t3x3 under L2
    for name, (n, r) in (("apgd-t3x3-stripes", (3, 3)), ("apgd-t-stripes", (9, 1))):
        (unit,) = build_suite([name], _ctx(deq, threat="Linf"))
        atk_s = unit.factory(deq, eps=0.1, norm="Linf", steps=20, seed=0)
        assert (atk_s.n_target_classes, atk_s.restarts, atk_s.start) == (n, r, "stripes")
        assert atk_s.seed != atk.seed and "Square attack's start" in unit.description
        assert build_suite([name], _ctx(deq, threat="L2")) == []
    for suite in ("quick", "standard"):
        assert "apgd-t3x3-stripes" in [s.name for s in build_suite(suite, _ctx(deq, threat="Linf"))]
        l2 = [s.name for s in build_suite(suite, _ctx(deq, threat="L2"))]
        assert "apgd-t3x3" in l2 and "apgd-t3x3-stripes" not in l2
    assert atk.start == "uniform" and atk3.start == "uniform"
    # fewer classes: fewer targets; under 4 classes no APGD-T (the targeted DLR loss needs 4)
    few = {s.name: s for s in build_suite(["apgd-t"], _ctx(deq, num_classes=5))}
    assert few["apgd-t"].factory(deq, eps=0.1, norm="Linf", steps=20, seed=0).n_target_classes == 4
    assert build_suite(["apgd-t", "apgd-ce"], _ctx(deq, num_classes=3))[0].name == "apgd-ce"
    # a randomized model: AutoAttack's rand version (APGD-CE and APGD-DLR, EOT over 20 gradients)
    rand = _ctx(deq, randomized=True)
    names = [s.name for s in build_suite("standard", rand)]
    assert "apgd-dlr" in names and "apgd-t" not in names and "square" not in names
    unit = {s.name: s for s in build_suite("quick", rand)}["apgd-ce"]
    assert unit.factory(deq, eps=0.1, norm="Linf", steps=20, seed=0).eot_iter == 20


def test_report_lists_which_attack_broke_which_sample(digits_test, trained_model):
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    x, y = digits_test(24)
    rep = evaluate(deq, x, y, eps=0.15, suite=["pgd-ift", "apgd-ce"], steps=4, checks=False, cascade=True)
    r = rep.result()
    md = rep.to_markdown()
    for a in r.attacks:
        idx = [i for i, w in enumerate(r.first_success) if w == a.key]
        assert len(idx) == a.new_successes
        if idx:
            assert f"| {a.key} | {', '.join(map(str, idx))} |" in md
    # oracle: "clean" exactly on the samples the model misclassifies, None exactly on the robust
    # ones, and the attacks' new successes account for every other sample
    from robustdeq.attacks import predict
    wrong = (predict(deq, x) != y).tolist()
    assert [w == "clean" for w in r.first_success] == wrong and any(wrong)
    assert [w is None for w in r.first_success] == list(r.robust)
    assert sum(a.new_successes for a in r.attacks) == sum(w not in (None, "clean") for w in r.first_success)
    assert all(a.new_successes > 0 for a in r.attacks)    # both rows of the markdown were checked


@pytest.mark.slow
def test_quick_within_one_point_of_autoattack_on_a_trained_deq(digits_test, trained_model):
    pytest.importorskip("pyautoattack")
    from robustdeq.attacks import AutoAttack
    from robustdeq.attacks.base import logits_of
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    x, y = digits_test(100)
    aa = AutoAttack(deq, eps=0.1, version="standard", seed=0)(x, y)
    aa_robust = int((logits_of(deq, aa).argmax(1) == y).sum())
    rep = evaluate(deq, x, y, eps=0.1, suite="quick", cascade=True, checks=False)
    quick_robust = int(torch.tensor(rep.result().robust).sum())
    assert quick_robust <= aa_robust + 1


def test_square_quick_unit_is_a_short_square_with_autoattacks_settings(trained_model):
    """The square-quick unit: the native Square at 50 x steps queries, AutoAttack's settings
    otherwise (p_init 0.8, absolute p schedule), judged as black-box evidence; quick itself
    holds the gradient units only."""
    from robustdeq.attacks import Square
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    assert [s.name for s in build_suite("quick", _ctx(deq))] == ["pgd-ift", "pgd-unrolled", "apgd-ce", "apgd-t", "apgd-t3x3-stripes"]
    (sq,) = build_suite(["square-quick"], _ctx(deq))
    assert sq.kind == "black-box"
    for steps, queries in ((20, 1000), (3, 150)):
        atk = sq.factory(deq, eps=0.1, norm="Linf", steps=steps, seed=0)
        assert isinstance(atk, Square)
        assert (atk.n_queries, atk.p_init, atk.rescale_schedule) == (queries, 0.8, False)
        assert (atk.n_restarts, atk.restart_fraction, atk.restart_while_breaking) == (1, None, False)
    # the standard unit: AutoAttack's Square stage, then more runs on the near misses while the
    # run before broke a sample
    (full,) = build_suite(["square"], _ctx(deq))
    atk = full.factory(deq, eps=0.1, norm="Linf", steps=20, seed=0)
    assert (atk.n_queries, atk.p_init, atk.rescale_schedule) == (5000, 0.8, False)
    assert (atk.n_restarts, atk.restart_fraction, atk.restart_while_breaking) == \
        (SQUARE_MAX_RUNS, SQUARE_RESTART_FRACTION, True)
    assert 0 < SQUARE_RESTART_FRACTION < 1 and SQUARE_MAX_RUNS > 1
    # a randomized model gets AutoAttack's "rand" version
    assert [s.name for s in build_suite("quick", _ctx(deq, randomized=True))][-2:] == ["apgd-ce", "apgd-dlr"]


def test_square_quick_is_the_start_of_the_standard_square(trained_mlp, digits_test):
    """Same seed, same draws, same absolute p schedule: the short unit's examples are the long
    unit's after as many queries (here: the samples it breaks, the long one breaks too, at the
    same point)."""
    from robustdeq.attacks import Square, predict
    x, y = digits_test(24)
    short = Square(trained_mlp, eps=0.1, n_queries=60, p_init=0.8, rescale_schedule=False, seed=3)(x, y)
    long = Square(trained_mlp, eps=0.1, n_queries=200, p_init=0.8, rescale_schedule=False, seed=3)(x, y)
    hit = predict(trained_mlp, short) != y
    assert hit.any() and bool((predict(trained_mlp, long) != y)[hit].all())
    assert torch.equal(short[hit], long[hit])


def test_square_quick_flags_a_model_only_square_breaks(trained_mlp, digits_test):
    """A model with a zero input gradient (quantised input): the short Square breaks samples
    every gradient unit left, and the black-box-stronger check fires on the suite's own results."""
    import warnings
    from helpers.evals import QuantizedModel
    from robustdeq.errors import GradientMaskingWarning
    from robustdeq.eval.checks import CheckConfig
    x, y = digits_test(32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        rep = evaluate(QuantizedModel(trained_mlp), x, y, eps=0.1, suite=["pgd", "apgd-ce", "apgd-t", "square-quick"], steps=4,
                       cascade=True,
                       check_config=CheckConfig(enabled=("black_box_stronger",)))
    r = rep.check("black_box_stronger")
    assert r.fired and r.details["source"] == "square-quick"
    assert r.details["black_box_only"] == rep.result().attack("square-quick").new_successes >= 3


def test_square_quick_is_left_out_where_its_l2_version_is_undefined(trained_model):
    """The L2 Square start tiles the image with squares of side height // 5: on smaller inputs
    the unit is left out; under Linf, or L2 on 28 x 28 images, it runs."""
    deq = trained_model("mlp_deq", steps=60, hidden=32)
    names = lambda **kw: [s.name for s in build_suite(["square-quick"], _ctx(deq, **kw))]  # noqa: E731
    assert "square-quick" not in names(threat="L2", input_shape=(64,))
    assert "square-quick" not in names(threat="L2", input_shape=(1, 4, 4))
    assert "square-quick" in names(threat="L2", input_shape=(1, 28, 28))
    assert "square-quick" in names(threat="Linf", input_shape=(64,))
