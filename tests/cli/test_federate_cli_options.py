"""``robustdeq federate``: ``--device`` reaches the run's config (default: CUDA when present, else
the CPU; a device the machine lacks refused on one line), and ``--model`` is only what the user
chose: an explicit model that a recipe with its own architecture cannot train is refused, as
``robustdeq train`` refuses it."""
from __future__ import annotations

import pytest
import torch

from robustdeq.cli import main


@pytest.fixture
def captured(monkeypatch):
    """The config ``cmd_federate`` hands to the federated run (the run itself is not started)."""
    from robustdeq.federated import run as run_mod
    from robustdeq.federated.server import FederatedResult
    seen = []

    def fake(cfg, out, **kw):
        seen.append(cfg)
        return FederatedResult(state={}, rounds=[])

    monkeypatch.setattr(run_mod, "federate", fake)
    return seen


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustdeq: error: "), err
    return err[0]


def test_device_flag_reaches_the_config(tmp_path, captured, monkeypatch):
    args = ["federate", "--out", str(tmp_path / "o"), "--eval-suite", "none", "--no-progress"]
    assert main(args + ["--device", "cpu"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(args) == 0                               # default without CUDA: the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert main(args) == 0                               # default with CUDA: the GPU
    assert [c.device for c in captured] == ["cpu", "cpu", "cuda:0"]


def test_device_the_machine_lacks_is_one_line(tmp_path, captured, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["federate", "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in _one_line(capsys)
    assert main(["federate", "--out", str(tmp_path / "o"), "--device", "gpu"]) == 2
    assert "--device 'gpu'" in _one_line(capsys)
    assert captured == [] and not (tmp_path / "o").exists()


def test_explicit_model_with_a_recipe_of_its_own_architecture(tmp_path, captured, capsys):
    out = ["--out", str(tmp_path / "o"), "--device", "cpu"]
    for model in ("mlp_deq", "conv_deq"):
        assert main(["federate", "--defense", "lyadeq", "--model", model] + out) == 2
        line = _one_line(capsys)
        assert f"--defense lyadeq trains its own architecture (lyadeq), not --model {model}" in line
    assert captured == []
    # the same refusal as train's
    assert main(["train", "--defense", "lyadeq", "--model", "mlp_deq"] + out) == 2
    assert "--defense lyadeq trains its own architecture (lyadeq), not --model mlp_deq" in _one_line(capsys)
    # no --model: the recipe's architecture; --model lyadeq named: accepted; no recipe: mlp_deq
    assert main(["federate", "--defense", "lyadeq"] + out) == 0
    assert main(["federate", "--defense", "lyadeq", "--model", "lyadeq"] + out) == 0
    assert main(["federate"] + out) == 0
    assert [c.model for c in captured] == ["lyadeq", "lyadeq", "mlp_deq"]
    assert captured[0].model_options == captured[2].model_options   # the MLP defaults
