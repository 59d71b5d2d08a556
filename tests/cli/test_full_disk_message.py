"""A full disk while a command writes its folder is one line saying so and naming the folder."""
from __future__ import annotations

import errno

import torch

from robustdeq.checkpoint import save_checkpoint
from robustdeq.cli import main
from robustdeq.deq import zoo


def test_full_disk_during_eval_names_no_space_left_and_the_folder(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 4})
    ck = str(save_checkpoint(tmp_path / "m.pt", m, model_config=m.robustdeq_config, metadata={"dataset": "digits"}))
    import robustdeq.eval as ev

    def full(*a, **k):  # a write of the report failing as the kernel reports it (no file name)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ev, "evaluate", full)
    out = tmp_path / "ev"
    assert main(["eval", ck, "-n", "4", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"robustdeq: error: no space left on device: writing under --out {out}"]
