"""Tests for robustdeq.checkpoint: round trip, atomic writes, and refusal of unsafe/foreign files."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from robustdeq.checkpoint import (
    FORMAT_KEY, Checkpoint, load_checkpoint, load_model, save_checkpoint,
)
from robustdeq.errors import CheckpointError


class Tiny(nn.Module):
    def __init__(self, width: int = 4, classes: int = 3):
        super().__init__()
        self.lin = nn.Linear(width, classes)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x):
        return self.lin(self.norm(x))


def tiny_builder(name: str, **options) -> nn.Module:
    if name != "tiny":
        raise ValueError(f"unknown model {name!r}")
    return Tiny(**options)


CFG = {"name": "tiny", "options": {"width": 4, "classes": 3}}


def _saved(tmp_path: Path, **kw) -> tuple[Path, Tiny]:
    torch.manual_seed(0)
    model = Tiny()
    path = save_checkpoint(tmp_path / "m.pt", model, model_config=CFG, **kw)
    return path, model


def test_round_trip_state_config_metadata(tmp_path):
    path, model = _saved(tmp_path, metadata={"dataset": "digits", "eps": 0.1},
                         extra_state={"epoch": 3, "ema": torch.ones(2), "hist": [1.0, 2.0]})
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint) and ckpt.path == path
    assert ckpt.model_config == CFG
    assert ckpt.metadata["dataset"] == "digits" and ckpt.metadata["eps"] == 0.1
    versions = ckpt.metadata["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["python"] == "%d.%d.%d" % sys.version_info[:3]
    assert "robustdeq" in versions and "created" in ckpt.metadata
    assert ckpt.state_dict.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[k], v)
    assert ckpt.extra_state["epoch"] == 3 and torch.equal(ckpt.extra_state["ema"], torch.ones(2))
    assert ckpt.optimizer_state is None


def test_file_holds_only_tensors_and_json_text(tmp_path):
    path, _ = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw[FORMAT_KEY] == 1
    assert isinstance(raw["model_config"], str) and json.loads(raw["model_config"]) == CFG
    assert isinstance(raw["metadata"], str)
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())


def test_optimizer_state_round_trip(tmp_path):
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "o.pt", model, model_config=CFG, optimizer=opt)
    ckpt = load_checkpoint(path)
    opt2 = torch.optim.Adam(Tiny().parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.optimizer_state)
    assert opt2.state_dict()["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_load_model_with_builder(tmp_path):
    path, model = _saved(tmp_path)
    rebuilt, ckpt = load_model(path, builder=tiny_builder)
    assert isinstance(rebuilt, Tiny) and not rebuilt.training
    x = torch.randn(3, 4)
    model.eval()
    assert torch.equal(rebuilt(x), model(x))
    assert ckpt.model_config["name"] == "tiny"


def test_load_model_mismatch_names_keys(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", {"lin.weight": torch.zeros(3, 4), "bogus": torch.ones(1)},
                           model_config=CFG)
    with pytest.raises(CheckpointError) as info:
        load_model(path, builder=tiny_builder)
    msg = str(info.value)
    assert "missing keys" in msg and "lin.bias" in msg and "unexpected keys" in msg and "bogus" in msg
    # right keys, wrong shapes
    path = save_checkpoint(tmp_path / "s.pt", Tiny(width=5), model_config=CFG)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path, builder=tiny_builder)


def test_load_model_bad_config(tmp_path):
    path = save_checkpoint(tmp_path / "n.pt", Tiny(), model_config={"options": {}})
    with pytest.raises(CheckpointError, match="name"):
        load_model(path, builder=tiny_builder)
    path = save_checkpoint(tmp_path / "u.pt", Tiny(), model_config={"name": "huge"})
    with pytest.raises(CheckpointError, match="cannot rebuild model 'huge'"):
        load_model(path, builder=tiny_builder)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    path, _ = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="unreadable|corrupted"):
        load_checkpoint(path)


# seeded bytes: the same parameters in every process that collects them (pytest-xdist workers)
@pytest.mark.parametrize("payload", [random.Random(0).randbytes(64), random.Random(1).randbytes(4096), b"",
                                     b"PK\x03\x04garbage"], ids=["bytes64", "bytes4096", "empty", "zip-header"])
def test_random_bytes_file(tmp_path, payload):
    path = tmp_path / "r.pt"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save(Tiny().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a robustdeq checkpoint"):
        load_checkpoint(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="not a robustdeq checkpoint"):
        load_checkpoint(path)


def test_unsupported_format_version(tmp_path):
    path, _ = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw[FORMAT_KEY] = 99
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)


def test_corrupted_json_fields(tmp_path):
    path, _ = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["model_config"] = "{not json"
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="model_config"):
        load_checkpoint(path)


def _write_marker(path: str) -> None:  # would run only if the file were unpickled unsafely
    Path(path).write_text("executed")


class Malicious:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def test_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({FORMAT_KEY: 1, "state_dict": {}, "model_config": "{}", "metadata": "{}",
                "extra_state": {"payload": Malicious(marker)}}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="untrusted"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="untrusted"):
        load_model(path, builder=tiny_builder)
    assert not marker.exists()


def test_save_refuses_non_plain_objects(tmp_path):
    with pytest.raises(CheckpointError, match="extra_state"):
        save_checkpoint(tmp_path / "x.pt", Tiny(), model_config=CFG,
                        extra_state={"obj": Malicious(tmp_path / "m")})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "y.pt", Tiny(), model_config={"name": "tiny", "f": object()})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path)
    save_checkpoint(path, Tiny(width=2), model_config=CFG)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert load_checkpoint(path).state_dict["lin.weight"].shape == (3, 2)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, Tiny(), model_config=CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # old file intact, no temp
    assert load_checkpoint(path).state_dict["lin.weight"].shape == (3, 2)


def test_save_creates_parent_dirs(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "b" / "m.pt", Tiny(), model_config=CFG)
    assert path.is_file()
