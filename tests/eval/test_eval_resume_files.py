"""Resume files are tied to their unit (key, eps and configuration hash inside the tensor file)
and validated: a swapped, malformed or foreign unit is recomputed with a warning, never trusted."""
from __future__ import annotations

import json
import logging
import os

import pytest

from robustdeq.eval import evaluate

KW = dict(eps=[0.05, 0.3], suite=["pgd"], steps=3, checks=False)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def setup(digits_test, trained_mlp):
    x, y = digits_test(32)
    model = trained_mlp
    return model, x, y, evaluate(model, x, y, **KW)


def _interrupted(model, x, y, out):
    def stop(info):  # both units (one per eps) saved, the report not written
        if info["eps_index"] == 1:
            raise Interrupt
    with pytest.raises(Interrupt):
        evaluate(model, x, y, out_dir=out, callback=stop, **KW)
    part = out / "partial"
    assert sorted(p.name for p in part.glob("e*_u*.*")) == ["e000_u000.json", "e000_u000.pt",
                                                             "e001_u000.json", "e001_u000.pt"]
    return part


def _same(a, b):
    return [r.robust for r in a.results] == [r.robust for r in b.results]


def test_units_of_different_eps_swapped_are_recomputed(setup, tmp_path, caplog):
    model, x, y, full = setup
    part = _interrupted(model, x, y, tmp_path)
    assert full.results[0].robust != full.results[1].robust  # the swap would change the result
    for ext in (".pt", ".json"):
        os.replace(part / f"e000_u000{ext}", part / f"tmp{ext}")
        os.replace(part / f"e001_u000{ext}", part / f"e000_u000{ext}")
        os.replace(part / f"tmp{ext}", part / f"e001_u000{ext}")
    with caplog.at_level(logging.WARNING, logger="robustdeq.eval.store"):
        rep = evaluate(model, x, y, out_dir=tmp_path, **KW)
    assert "expected 0.05" in caplog.text and "recomputing" in caplog.text
    assert [[a.resumed for a in r.attacks] for r in rep.results] == [[False], [False]]
    assert _same(rep, full)


def test_tensor_file_moved_under_another_units_json_is_recomputed(setup, tmp_path, caplog):
    model, x, y, full = setup
    part = _interrupted(model, x, y, tmp_path)
    os.replace(part / "e001_u000.pt", part / "e000_u000.pt")      # JSON of eps 0.05, tensors of 0.3
    with caplog.at_level(logging.WARNING, logger="robustdeq.eval.store"):
        rep = evaluate(model, x, y, out_dir=tmp_path, **KW)
    assert "tensor file says eps 0.3" in caplog.text
    assert _same(rep, full)


@pytest.mark.parametrize("damage", ["manifest_list", "json_missing_field", "json_list"])
def test_malformed_resume_files_are_recomputed_not_a_traceback(setup, tmp_path, caplog, damage):
    model, x, y, full = setup
    part = _interrupted(model, x, y, tmp_path)
    if damage == "manifest_list":
        (part / "manifest.json").write_text("[]")
    elif damage == "json_missing_field":
        meta = json.loads((part / "e000_u000.json").read_text())
        del meta["seconds"]
        (part / "e000_u000.json").write_text(json.dumps(meta))
    else:
        (part / "e001_u000.json").write_text("[1, 2]")
    with caplog.at_level(logging.WARNING, logger="robustdeq.eval.store"):
        rep = evaluate(model, x, y, out_dir=tmp_path, **KW)
    assert "recomputed" in caplog.text or "recomputing" in caplog.text
    assert _same(rep, full)
