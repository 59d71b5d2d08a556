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
