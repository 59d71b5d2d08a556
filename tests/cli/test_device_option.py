"""``--device`` on every command that computes (default: CUDA when present, else the CPU) and a
``device`` in TrainConfig; checkpoints load to that device."""
from __future__ import annotations

import argparse

import pytest
import torch

from robustdeq.checkpoint import load_model, save_checkpoint
from robustdeq.cli import main
from robustdeq.cli.common import device_of
from robustdeq.config import TrainConfig
from robustdeq.deq import zoo
from robustdeq.errors import ConfigError
from robustdeq.train import Trainer


def test_default_device_is_cuda_when_present(monkeypatch):
    ns = argparse.Namespace(device=None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_of(ns) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert device_of(ns) == "cuda:0"
    assert device_of(argparse.Namespace(device="cuda:1")) == "cuda:1"
    with pytest.raises(ConfigError, match="2 CUDA device"):
        device_of(argparse.Namespace(device="cuda:5"))
    with pytest.raises(ConfigError, match="--device 'gpu'"):
        device_of(argparse.Namespace(device="gpu"))


def test_train_config_device_is_typed():
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(ConfigError, match="TrainConfig.device"):
        TrainConfig(device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "o"), "--device", "cuda", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda: CUDA is not available" in err[0]
    for cmd in (["demo", "--out", str(tmp_path / "d")], ["certify", "m.pt"], ["eval", "m.pt"]):
        assert main(cmd + ["--device", "cuda:0"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Trainer(zoo.build("mlp_deq", hidden=8), None, {"epochs": 1, "device": "cuda"}).fit(
            torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))


@pytest.mark.gpu
def test_training_and_loading_on_cuda(tmp_path):
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 6})
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    Trainer(m, None, {"epochs": 2, "batch_size": 16, "device": "cuda"}, out_dir=tmp_path,
            tensorboard=False).fit(x, y, x, y)
    assert all(p.is_cuda for p in m.parameters())
    loaded, _ = load_model(tmp_path / "checkpoint.pt", map_location="cuda")
    assert all(p.is_cuda for p in loaded.parameters())
    # resumed on the GPU: the run goes on from its checkpoint
    t = Trainer(loaded, None, {"epochs": 3, "batch_size": 16, "device": "cuda"}, out_dir=tmp_path,
                tensorboard=False, model_config=m.robustdeq_config)
    t.fit(x, y)
    assert t.start_epoch == 2


@pytest.mark.gpu
def test_cli_eval_and_certify_on_cuda(tmp_path, capsys):
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 6})
    ck = str(save_checkpoint(tmp_path / "m.pt", m, model_config=m.robustdeq_config, metadata={"dataset": "digits"}))
    assert main(["eval", ck, "-n", "8", "--suite", "pgd-ift", "--steps", "2", "--eps", "0.1",
                 "--device", "cuda", "--no-progress"]) == 0
    assert main(["certify", ck, "-n", "4", "--smoothing", "0.25", "--n", "50", "--n0", "10",
                 "--device", "cuda", "--no-progress"]) == 0
