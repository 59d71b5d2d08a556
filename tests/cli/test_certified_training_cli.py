"""The certified-training recipes from the command line: train, certify, the bracket."""
import json

import pytest

from robustdeq.cli import main


@pytest.mark.slow
def test_ibp_and_lipschitz_margin_through_train_certify_and_eval(tmp_path, capsys):
    out = tmp_path / "ibp"
    assert main(["train", "--defense", "ibp", "--model", "mlp_deq", "--model-options",
                 '{"hidden": 16, "act": "relu", "norm": "interval", "scale": 0.7}',
                 "--defense-options", '{"eps": 0.05, "ramp": 10}', "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    assert main(["certify", str(out / "checkpoint.pt"), "-n", "16", "--eps-linf", "0.05", "--eps-l2", "",
                 "--out", str(tmp_path / "cert"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "cert" / "certificate.json").read_text())
    assert "linf" in rep["results"][0]["details"]
    assert main(["eval", str(out / "checkpoint.pt"), "--suite", "pgd-ift", "--eps", "0.05", "-n", "16",
                 "--steps", "5", "--certify", "ibp", "--strict", "--no-progress"]) == 0
    assert "bracket at Linf eps 0.05" in capsys.readouterr().out
    assert main(["train", "--defense", "lipschitz-margin", "--defense-options", '{"eps": 0.5}',
                 "--model-options", '{"hidden": 16}', "--epochs", "1", "--out", str(tmp_path / "lm"),
                 "--no-progress"]) == 0
    # a model whose interval fixed point is not guaranteed is refused, by name
    assert main(["train", "--defense", "ibp", "--model-options", '{"hidden": 16, "norm": "none", "init_gain": 0.95}',
                 "--epochs", "1", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "interval map is not a contraction" in capsys.readouterr().err
    assert main(["train", "--defense", "ibp", "--defense-options", '{"epsilon": 0.1}', "--epochs", "1",
                 "--out", str(tmp_path / "bad2"), "--no-progress"]) == 2
