"""robustdeq.benchmark model cards (figures against a hand computation from the evaluation report,
intervals against scipy's exact binomial interval), leaderboards, and judging adversarial examples
produced elsewhere (refusals, and the model's own accuracy reproduced)."""
from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import binomtest

import robustdeq
from robustdeq.errors import ConfigError, InputError
from robustdeq.eval import evaluate
from robustdeq.eval.card import (clopper_pearson, judge, judge_file, leaderboard, model_card,
                                 tensors_sha256)
from robustdeq.guard import model_snapshot, snapshot_diff

OPTS = dict(suite=["pgd-ift", "pgd-unrolled"], steps=2, checks=False, seed=0)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (37, 50)])
def test_clopper_pearson_is_scipys_exact_interval(k, n):
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, digits_test, trained_deq):
    model = trained_deq
    x, y = digits_test(12)
    out = tmp_path_factory.mktemp("card")
    snap = model_snapshot(model)
    card = robustdeq.benchmark(model, x, y, eps=0.1, name="tiny", dataset="digits:test", out=out,
                               save_adversarial=True, **OPTS)
    assert not snapshot_diff(snap)
    return model, x, y, out, card


def test_card_figures_equal_a_hand_computation_from_the_report(bench):
    model, x, y, out, card = bench
    report = evaluate(model, x, y, eps=0.1, **OPTS)  # the same protocol, deterministic seeds
    res = report.result(0.1)
    n = len(res.robust)
    k_rob, k_clean = sum(res.robust), round(report.clean_accuracy * n)
    assert card["robust"]["accuracy"] == k_rob / n == pytest.approx(report.robust_accuracy(0.1))
    assert card["clean"]["accuracy"] == k_clean / n == pytest.approx(report.clean_accuracy)
    ci = binomtest(k_rob, n).proportion_ci(0.95, method="exact")
    assert card["robust"]["ci"] == pytest.approx([ci.low, ci.high], abs=1e-12)
    assert [a["key"] for a in card["suite"]["attacks"]] == [a.key for a in res.attacks]
    assert [a["accuracy"] for a in card["suite"]["attacks"]] == [a.accuracy for a in res.attacks]
    assert card["solver"]["adversarial"] == res.solver["adversarial"]
    assert card["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["model"]["architecture"]["cell"] == type(model.cell).__name__
    assert card["data"] == {"name": "digits:test", "n_samples": 12, "sha256": tensors_sha256(x, y)}
    assert card["threat"] == {"norm": "Linf", "eps": 0.1}
    assert set(card["versions"]) >= {"robustdeq", "torch", "pyautoattack", "torchattacks"}
    # a card recomputed from the report holds the same figures
    again = model_card(report, model, name="tiny", dataset="digits:test", x=x, y=y, seconds=0.0)
    assert again["robust"] == card["robust"] and again["clean"] == card["clean"]
    on_disk = json.loads((out / "model_card.json").read_text())
    assert on_disk["robust"] == card["robust"]
    md = (out / "model_card.md").read_text()
    assert "Clopper-Pearson" in md and "tiny" in md


def test_judge_reproduces_the_models_accuracy_on_its_own_adversarial_examples(bench):
    model, x, y, out, card = bench
    verdict = judge_file(model, out / "adversarial.pt")
    assert verdict["accuracy"] == card["robust"]["accuracy"]
    assert verdict["clean_accuracy"] == card["clean"]["accuracy"]


def test_judge_refuses_examples_outside_the_ball_or_the_unit_box(bench):
    model, x, y, out, card = bench
    d = torch.load(out / "adversarial.pt", weights_only=True)
    bad = d["x_adv"].clone()
    bad[:3] = (d["x"][:3] + 0.25).clamp(0, 1)
    bad[3] = bad[3] + 0.0  # stays in the ball
    with pytest.raises(InputError, match=r"3 lie outside the Linf ball of radius 0.1"):
        judge(model, bad, d["y"], x=d["x"], eps=0.1)
    low = d["x"].clone()
    low[5] = low[5] - 0.05
    with pytest.raises(InputError, match=r"1 have values outside \[0, 1\]"):
        judge(model, low, d["y"], x=d["x"], eps=0.1)
    with pytest.raises(InputError, match="outside the L2 ball"):
        judge(model, d["x_adv"], d["y"], x=d["x"], eps=0.1, norm="L2")


def test_judge_and_the_evaluation_share_the_ball_tolerance_and_the_tie_rule():
    from robustdeq.eval.harness import _check_ball
    torch.manual_seed(0)
    x = torch.full((2, 1, 20, 20), 0.5)
    d = torch.randn_like(x)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    eps = 1.0
    inside = x + d * eps * (1 + 5e-6)        # past eps by float rounding only
    outside = x + d * eps * (1 + 5e-4)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(400, 3))
    y = torch.zeros(2, dtype=torch.long)
    # the evaluation keeps `inside` as it is; judge accepts it too
    assert _check_ball(inside, x, eps, "L2")[1] == 0
    judge(lin, inside, y, x=x, eps=eps, norm="L2")
    assert _check_ball(outside, x, eps, "L2")[1] == 2
    with pytest.raises(InputError, match="outside the L2 ball"):
        judge(lin, outside, y, x=x, eps=eps, norm="L2")

    class Tie(torch.nn.Module):             # class 0 ties with class 1 on every input
        def forward(self, x):
            s = x.flatten(1).sum(dim=1)
            return torch.stack([s, s, s - 1], dim=1)
    assert judge(Tie(), x, y, x=x, eps=0.1)["accuracy"] == 0.0
    assert evaluate(Tie(), x, y, eps=0.1, suite=["pgd"], checks=False).clean_accuracy == 0.0


def test_judge_reads_a_file_that_refers_to_a_dataset(bench, tmp_path):
    model, x, y, out, card = bench
    d = torch.load(out / "adversarial.pt", weights_only=True)
    path = tmp_path / "adv.pt"
    torch.save({"x_adv": d["x_adv"], "eps": 0.1, "norm": "Linf", "dataset": "digits", "split": "test"}, path)
    assert judge_file(model, path)["accuracy"] == card["robust"]["accuracy"]
    torch.save({"x_adv": d["x_adv"], "eps": 0.1, "norm": "Linf", "colour": 1}, path)
    with pytest.raises(ConfigError, match="colour"):
        judge_file(model, path)


def test_leaderboard_sorts_by_robust_accuracy_and_needs_one_protocol(bench):
    card = bench[4]
    worse = json.loads(json.dumps(card))
    worse["model"]["name"], worse["robust"]["accuracy"] = "worse", card["robust"]["accuracy"] - 0.5
    rows, md = leaderboard([worse, card])
    assert [r["name"] for r in rows] == ["tiny", "worse"] and "| 1 | tiny |" in md
    other = json.loads(json.dumps(card))
    other["threat"]["eps"] = 0.2
    with pytest.raises(ConfigError, match="one protocol"):
        leaderboard([card, other])


def test_benchmark_takes_one_radius(digits_test, trained_deq):
    model = trained_deq
    x, y = digits_test(4)
    with pytest.raises(ConfigError, match="one radius"):
        robustdeq.benchmark(model, x, y, eps=[0.1, 0.2])
