"""The federated run's ``device``: typed and checked in the config, a device the machine lacks
refused before round 1, honoured by the clients' local training and the server's evaluation
(updates and checkpoints stay CPU tensors)."""
from __future__ import annotations

import pytest
import torch

from robustdeq.errors import ConfigError
from robustdeq.federated import FederatedConfig
from robustdeq.federated.config import config_hash, resolve_device

BASE = {"clients": 2, "rounds": 1, "partition": "iid", "budgets": [5], "eval_suite": "none",
        "local_epochs": 1, "seed": 0, "model_options": {"hidden": 8}}


def test_device_is_typed_and_left_out_of_the_run_hash():
    cfg = FederatedConfig.from_dict(BASE)
    assert cfg.device is None and cfg.to_dict()["device"] is None
    for dev in ("cpu", "cuda", "cuda:1", "mps"):
        moved = cfg.replace(device=dev)
        assert moved.device == dev and FederatedConfig.from_json(moved.to_json()) == moved
        assert config_hash(moved) == config_hash(cfg)   # a run may resume on another device
    for bad in ("gpu", "cuda:x", "CPU", 0):
        with pytest.raises(ConfigError, match=r"FederatedConfig\.device .*" + repr(bad).replace("'", "")):
            FederatedConfig.from_dict({**BASE, "device": bad})


def test_resolve_device_default_is_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'cuda:0': CUDA is not available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_round_1(tmp_path):
    pytest.importorskip("flwr", reason="needs the 'federated' extra (flwr)")
    from robustdeq.federated.run import federate
    from robustdeq.federated.server import run_rounds

    class NoGrid:   # a deployed server: nothing may be sent before the device is checked
        def __getattr__(self, name):
            raise AssertionError(f"grid.{name} used before the device was checked")

    cfg = FederatedConfig.from_dict({**BASE, "device": "cuda"})
    with pytest.raises(ConfigError, match="'cuda': CUDA is not available"):
        federate(cfg, tmp_path / "sim")
    with pytest.raises(ConfigError, match="'cuda': CUDA is not available"):
        run_rounds(NoGrid(), cfg, tmp_path / "dep")
    assert not (tmp_path / "sim").exists()
    assert not (tmp_path / "dep" / "checkpoint.pt").exists()


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_client_trains_on_the_config_device(monkeypatch):
    """The device reaches the client's Trainer; the update comes back as CPU tensors."""
    from robustdeq import train as train_mod
    from robustdeq.federated.local import build_model, train_client, transferable_state
    seen = []
    real_init = train_mod.Trainer.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        seen.append(self.config.device)

    monkeypatch.setattr(train_mod.Trainer, "__init__", spy)
    cfg = FederatedConfig.from_dict({**BASE, "clients": 16, "device": "cpu"})
    torch.manual_seed(0)
    state = transferable_state(build_model(cfg))
    res = train_client(cfg, 0, state, 1)
    assert seen == ["cpu"]
    assert all(v.device.type == "cpu" for v in res.state.values())
    # default: where this process computes (CUDA when present, else the CPU)
    seen.clear()
    train_client(cfg.replace(device=None), 0, state, 1)
    assert seen == [str(resolve_device(None))]


@pytest.mark.gpu
def test_one_round_federation_on_cuda(tmp_path):
    pytest.importorskip("flwr", reason="needs the 'federated' extra (flwr)")
    from robustdeq.checkpoint import load_checkpoint
    from robustdeq.federated.run import federate
    res = federate({**BASE, "device": "cuda", "eval_suite": "quick", "eval_samples": 8, "eval_steps": 2},
                   tmp_path)
    assert res.final["clients_fused"] == 2 and not res.final["clients_dropped"]
    assert res.final["robust_accuracy"] is not None
    assert all(v.device.type == "cpu" for v in res.state.values())
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(v.device.type == "cpu" for v in ck.state_dict.values())
    assert res.summary["config"]["device"] == "cuda"
