"""Foreseeable training failures are one clear error: a diverged loss, labels outside the class
range, a full disk when the checkpoint is written."""
from __future__ import annotations

import os

import pytest
import torch

from robustdeq.checkpoint import save_checkpoint
from robustdeq.deq import zoo
from robustdeq.errors import CheckpointError, InputError, TrainingError
from robustdeq.train import Trainer

# the tiny models here stop after 4 solver iterations on purpose: their non-convergence is not the subject
pytestmark = pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return zoo.build("mlp_deq", hidden=8, solver={"max_iter": 4})


def test_diverging_training_is_a_training_error(tmp_path):
    from robustdeq.defenses.objectives import CrossEntropy
    x, y = _data()
    ce, calls = CrossEntropy(), []

    def diverging(model, xb, yb):  # the loss of a training that blew up at its third batch
        loss, scalars = ce(model, xb, yb)
        calls.append(1)
        return (loss * float("inf") if len(calls) == 3 else loss), scalars

    t = Trainer(_model(), diverging, {"epochs": 2, "batch_size": 8, "lr": 0.5}, out_dir=tmp_path,
                tensorboard=False, model_config={"name": "mlp_deq", "options": {"hidden": 8}})
    with pytest.raises(TrainingError, match=r"non-finite training loss at epoch 0, batch 2: the "
                                            r"parameters are finite; .*learning rate 0\.5"):
        t.fit(x, y)


def test_cli_train_with_huge_learning_rate_is_one_line(tmp_path, capsys):
    from robustdeq.cli import main
    assert main(["train", "--lr", "1e30", "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustdeq: error: non-finite training loss")


def test_labels_outside_the_class_range_are_an_input_error():
    x, y = _data()
    y[3] = 10
    with pytest.raises(InputError, match=r"y_train holds labels outside the class range 0\.\.9 \(min 0, max 10\)"):
        Trainer(_model(), None, {"epochs": 1}, tensorboard=False).fit(x, y)
    y[3] = -1
    with pytest.raises(InputError, match="y_val"):
        Trainer(_model(), None, {"epochs": 1}, tensorboard=False).fit(x, y.abs(), x, y)


def test_full_disk_names_no_space_left_and_the_path(tmp_path, monkeypatch):
    import robustdeq.checkpoint as ck
    m = _model()
    save_checkpoint(tmp_path / "c.pt", m, model_config=m.robustdeq_config)
    before = (tmp_path / "c.pt").read_bytes()

    def full_disk(prefix, suffix, dir):  # the kernel's ENOSPC: every write to /dev/full fails
        return os.open("/dev/full", os.O_WRONLY), os.path.join(dir, prefix + "x" + suffix)
    monkeypatch.setattr(ck.tempfile, "mkstemp", full_disk)
    with pytest.raises(CheckpointError, match=r"no space left on device: cannot write checkpoint .*c\.pt"):
        save_checkpoint(tmp_path / "c.pt", m, model_config=m.robustdeq_config)
    assert (tmp_path / "c.pt").read_bytes() == before
