"""The demo rerun on its folder: other settings are refused without wiping the finished summary,
and ``resume=False`` (``--no-resume``) trains and evaluates again, evaluations included."""
from __future__ import annotations

import json

import pytest

from helpers.training import shrink_demo
from robustdeq import demo
from robustdeq.errors import ConfigError

SMALL_EVAL = {"threat": "Linf", "eps": [0.1], "suite": ["pgd-ift"], "steps": 2, "seed": 0,
              "cascade": True, "checks": False}


@pytest.fixture
def small_demo(monkeypatch):
    shrink_demo(monkeypatch, SMALL_EVAL)


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_other_samples_are_refused_and_the_finished_summary_kept(tmp_path, small_demo):
    kw = dict(defense="none", progress=False, say=lambda s: None, jobs=1)
    demo.run_demo(tmp_path, samples=8, **kw)
    finished = _summary(tmp_path)
    assert finished["robustness"]["samples"] == 8 and "certificate" in finished
    with pytest.raises(ConfigError, match="different configuration"):
        demo.run_demo(tmp_path, samples=6, **kw)
    assert _summary(tmp_path) == finished


@pytest.mark.parametrize("jobs", [1, 2])
def test_no_resume_evaluates_again(tmp_path, small_demo, jobs):
    kw = dict(defense="none", progress=False, say=lambda s: None, jobs=jobs)
    demo.run_demo(tmp_path, samples=8, **kw)
    again = demo.run_demo(tmp_path, samples=6, resume=False, **kw)
    assert again["robustness"]["samples"] == 6 and _summary(tmp_path)["robustness"]["samples"] == 6
    for name in ("eval_undefended", "eval_none"):
        assert json.loads((tmp_path / name / "report.json").read_text())["n_samples"] == 6
