"""``robustdeq benchmark`` (cards per checkpoint under one protocol, the leaderboard) and
``robustdeq judge`` (refusals with exit status 2, the model's own accuracy reproduced)."""
from __future__ import annotations

import json

import pytest
import torch

from robustdeq.checkpoint import save_checkpoint
from robustdeq.cli import main
from robustdeq.deq import zoo


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    models = []
    for seed in (0, 1):  # two small untrained DEQs: the protocol, not their quality, is tested
        torch.manual_seed(seed)
        models.append(zoo.build("mlp_deq", hidden=16))
    paths = []
    for name, m in zip(("first", "second"), models):
        p = root / f"{name}.pt"
        save_checkpoint(p, m, model_config=m.robustdeq_config, metadata={"dataset": "digits"})
        paths.append(str(p))
    out = root / "out"
    rc = main(["benchmark", *paths, "--out", str(out), "-n", "8", "--eps", "0.1", "--suite", "pgd-ift",
               "--steps", "2", "--save-adversarial", "--no-progress", "--no-checks"])
    assert rc == 0
    return paths, out


def test_benchmark_writes_one_card_per_checkpoint_and_a_sorted_leaderboard(run):
    paths, out = run
    rows = json.loads((out / "leaderboard.json").read_text())
    assert sorted(r["name"] for r in rows) == ["first", "second"]
    accs = [r["robust_accuracy"] for r in rows]
    assert accs == sorted(accs, reverse=True)
    for r in rows:
        card = json.loads((out / r["name"] / "model_card.json").read_text())
        assert card["robust"]["accuracy"] == r["robust_accuracy"]
        assert card["model"]["checkpoint"]["sha256"] == r["checkpoint_sha256"] is not None
        assert card["data"]["n_samples"] == 8 and card["threat"]["eps"] == 0.1
        assert (out / r["name"] / "adversarial.pt").is_file()
    assert "| 1 |" in (out / "leaderboard.md").read_text()


def test_judge_reproduces_the_card_and_refuses_out_of_ball_examples(run, tmp_path, capsys):
    paths, out = run
    card = json.loads((out / "first" / "model_card.json").read_text())
    capsys.readouterr()
    assert main(["judge", paths[0], str(out / "first" / "adversarial.pt"), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["accuracy"] == card["robust"]["accuracy"]
    d = torch.load(out / "first" / "adversarial.pt", weights_only=True)
    d["x_adv"][:2] = (d["x"][:2] + 0.3).clamp(0, 1)
    bad = tmp_path / "bad.pt"
    torch.save(d, bad)
    assert main(["judge", paths[0], str(bad)]) == 2
    err = capsys.readouterr().err
    assert "robustdeq: error:" in err and "2 lie outside the Linf ball" in err


def test_benchmark_takes_one_eps(run, capsys):
    paths, out = run
    assert main(["benchmark", paths[0], "--out", str(out / "x"), "--eps", "0.1,0.2"]) == 2
    assert "one radius" in capsys.readouterr().err
