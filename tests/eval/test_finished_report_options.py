"""A finished evaluation in ``out_dir`` is returned as is only when it holds what the run asks
for: asking for the certificate bracket or the checks that the stored report lacks (or a
different bracket) recomputes it, never returns the report without them."""
from __future__ import annotations

from robustdeq.eval import evaluate
from robustdeq.eval.bracket import CHECK_NAME

KW = dict(eps=[0.05], suite=["pgd"], steps=2)


def _names(rep):
    return [c.name for c in rep.checks]


def test_bracket_asked_on_a_finished_report_without_one_is_computed(digits_test, trained_mlp, tmp_path):
    x, y = digits_test(16)
    evaluate(trained_mlp, x, y, out_dir=tmp_path, checks=False, **KW)
    rep = evaluate(trained_mlp, x, y, out_dir=tmp_path, checks=False, certify=["lipschitz"], **KW)
    assert CHECK_NAME in _names(rep)
    bracket = rep.check(CHECK_NAME).details["config"]
    assert list(bracket["methods"]) == ["lipschitz"]
    # the same request again is the finished report, bracket included
    again = evaluate(trained_mlp, x, y, out_dir=tmp_path, checks=False, certify=["lipschitz"], **KW)
    assert all(a.resumed for r in again.results for a in r.attacks)
    assert CHECK_NAME in _names(again)
    # another bracket is not the stored one
    other = evaluate(trained_mlp, x, y, out_dir=tmp_path, checks=False, certify=["ibp"], **KW)
    assert list(other.check(CHECK_NAME).details["config"]["methods"]) == ["ibp"]


def test_checks_asked_on_a_finished_report_without_them_are_run(digits_test, trained_mlp, tmp_path):
    x, y = digits_test(16)
    first = evaluate(trained_mlp, x, y, out_dir=tmp_path, checks=False, **KW)
    assert first.checks == []
    rep = evaluate(trained_mlp, x, y, out_dir=tmp_path, checks=True, **KW)
    assert rep.checks, "the checks asked for were silently left out"
    assert [r.robust for r in rep.results] == [r.robust for r in first.results]


def test_a_defense_with_other_settings_is_not_given_the_finished_report(digits_test, trained_deq, tmp_path):
    """An inference-time defense's settings (not in its state dict) are part of the configuration:
    the report of the same defense with other settings is refused, not returned."""
    import pytest

    from robustdeq.defenses import EntropyDefense
    from robustdeq.errors import ConfigError
    x, y = digits_test(8)
    kw = dict(KW, steps=1, checks=False)
    evaluate(EntropyDefense(trained_deq, rounds=2, inner_steps=2), x, y, out_dir=tmp_path, **kw)
    again = evaluate(EntropyDefense(trained_deq, rounds=2, inner_steps=2), x, y, out_dir=tmp_path, **kw)
    assert all(a.resumed for r in again.results for a in r.attacks)
    with pytest.raises(ConfigError, match="different configuration"):
        evaluate(EntropyDefense(trained_deq, rounds=3, inner_steps=2), x, y, out_dir=tmp_path, **kw)
    other = evaluate(EntropyDefense(trained_deq, rounds=3, inner_steps=2), x, y, out_dir=tmp_path,
                     resume=False, **kw)
    assert other.provenance["model"]["describe"]["rounds"] == 3
    assert not any(a.resumed for r in other.results for a in r.attacks)
