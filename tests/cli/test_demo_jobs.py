"""The demo's second process: the same reports as one process, errors come back, bad values refused."""
from __future__ import annotations

import time

import pytest

from helpers.training import shrink_demo
from robustdeq import demo
from robustdeq.errors import ConfigError
from robustdeq.eval.report import EvalReport

SMALL_EVAL = {"threat": "Linf", "eps": [0.1], "suite": ["pgd-ift", "apgd-ce"], "steps": 3, "seed": 0,
              "cascade": True, "checks": False}


@pytest.fixture
def small_demo(monkeypatch):
    shrink_demo(monkeypatch, SMALL_EVAL)
    returned = []
    real_eval = demo._evaluate
    monkeypatch.setattr(demo, "_evaluate", lambda *a: returned.append((a[3].name, real_eval(*a))) or returned[-1][1])
    return returned


def test_two_jobs_give_the_reports_of_one(tmp_path, small_demo):
    kw = dict(samples=12, defense="none", progress=False, say=lambda s: None)
    one = demo.run_demo(tmp_path / "one", jobs=1, **kw)
    small_demo.clear()
    two = demo.run_demo(tmp_path / "two", jobs=2, **kw)
    assert one["test_accuracy"] == two["test_accuracy"]
    t1, t2 = one["robustness"]["tables"], two["robustness"]["tables"]   # (the read-back report is rounded)
    assert {m: {e: set(c) for e, c in t.items()} for m, t in t1.items()} == \
        {m: {e: set(c) for e, c in t.items()} for m, t in t2.items()}
    for m in t1:
        for e in t1[m]:
            for row, v in t1[m][e].items():
                assert v == t2[m][e][row] if v is None else v == pytest.approx(t2[m][e][row], abs=1e-6)
    for name in ("eval_undefended", "eval_none"):
        a, b = EvalReport.load(tmp_path / "one" / name), EvalReport.load(tmp_path / "two" / name)
        assert a.config_hash == b.config_hash
        assert [r.robust_accuracy for r in a.results] == [r.robust_accuracy for r in b.results]
        assert [[x.accuracy for x in r.attacks] for r in a.results] == [[x.accuracy for x in r.attacks] for r in b.results]
    # the undefended model was evaluated by the second process: this one only read the report back
    calls = dict(small_demo)
    assert set(calls) == {"eval_none", "eval_undefended"}
    assert all(x.resumed for r in calls["eval_undefended"].results for x in r.attacks)
    assert not any(x.resumed for r in calls["eval_none"].results for x in r.attacks)


def test_the_second_process_reports_its_error_and_can_be_stopped():
    with pytest.raises(ValueError, match="invalid literal"):
        demo._SecondProcess(int, "not a number").result()
    t = time.perf_counter()
    demo._SecondProcess(time.sleep, 60).stop()
    assert time.perf_counter() - t < 30


def test_jobs_other_than_one_or_two_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="jobs must be 1 or 2"):
        demo.run_demo(tmp_path, jobs=3)
