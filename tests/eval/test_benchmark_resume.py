"""benchmark_checkpoints keeps each checkpoint's card as it finishes: a benchmark interrupted
after some checkpoints reuses their cards (same checkpoint file, data and settings) and evaluates
only the others; a card of other settings or an unreadable one is computed again."""
import json

import pytest
import torch

from robustdeq.checkpoint import save_checkpoint
from robustdeq.deq import zoo
from robustdeq.eval import card as card_mod

KW = dict(dataset="digits", n=16, eps=0.05, suite=["pgd"], steps=2, checks=False)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        m = zoo.build("ff_mlp", in_shape=[1, 8, 8], num_classes=10)
        paths.append(d / f"m{i}.pt")
        save_checkpoint(paths[-1], m, model_config=m.robustdeq_config)
    return paths


@pytest.fixture
def counted(monkeypatch):
    calls, stop_after = [], [None]
    real = card_mod.benchmark

    def bench(model, x, y, **kw):
        if stop_after[0] is not None and len(calls) >= stop_after[0]:
            raise Interrupt
        calls.append(kw["name"])
        return real(model, x, y, **kw)
    monkeypatch.setattr(card_mod, "benchmark", bench)
    return calls, stop_after


def test_interrupted_benchmark_reuses_the_finished_cards(ckpts, tmp_path, counted, caplog):
    calls, stop_after = counted
    stop_after[0] = 1
    with pytest.raises(Interrupt):
        card_mod.benchmark_checkpoints(ckpts, tmp_path, **KW)
    first = json.loads((tmp_path / "m0" / "model_card.json").read_text())
    calls.clear()
    stop_after[0] = None
    cards = card_mod.benchmark_checkpoints(ckpts, tmp_path, **KW)
    assert calls == ["m1"]
    assert cards[0] == first and (tmp_path / "leaderboard.json").is_file()
    # other settings: every card is computed again
    calls.clear()
    card_mod.benchmark_checkpoints(ckpts, tmp_path, **{**KW, "steps": 3})
    assert calls == ["m0", "m1"]
    # a truncated card (killed while writing it by an older version) is computed again
    p = tmp_path / "m1" / "model_card.json"
    p.write_text(p.read_text()[:50])
    calls.clear()
    card_mod.benchmark_checkpoints(ckpts, tmp_path, **{**KW, "steps": 3})
    assert calls == ["m1"] and "cannot read" in caplog.text
