"""No result from meaningless numbers: a checkpoint or model with NaN/inf weights is refused
(naming the tensor), and non-finite logits never count for a class in a smoothing certificate."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustdeq.certify.smoothing import ABSTAIN, certify, predict
from robustdeq.checkpoint import load_checkpoint, load_model, save_checkpoint
from robustdeq.deq import zoo
from robustdeq.errors import CheckpointError, InputError


def _model():
    torch.manual_seed(0)
    return zoo.build("mlp_deq", hidden=8, solver={"max_iter": 5})


def test_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    m = _model()
    with torch.no_grad():
        m.head.linear.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "c.pt", m, model_config=m.robustdeq_config)
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"'head.linear.weight' \(1 of 80 entries\)"):
            load(tmp_path / "c.pt")


def test_certify_refuses_a_model_with_an_infinite_buffer():
    m = _model()
    m.injection.normalize.std.fill_(float("inf"))
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(InputError, match="injection.normalize.std"):
        certify(m, x, sigma=0.25, n0=4, n=8)
    with pytest.raises(InputError, match="injection.normalize.std"):
        predict(m, x, sigma=0.25, n=8)


class _NaNLogits(nn.Module):
    """Finite weights, NaN logits (as a solve that diverged on every noisy input)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan")) * self.w


def test_nan_logits_are_never_certified():
    x = torch.rand(3, 1, 8, 8)
    rep = certify(_NaNLogits(), x, torch.zeros(3, dtype=torch.long), sigma=0.25, n0=8, n=40)
    assert [r.prediction for r in rep.results] == [ABSTAIN] * 3
    assert all(r.radius == 0 and r.count == 0 for r in rep.results)
    assert predict(_NaNLogits(), x, sigma=0.25, n=20).tolist() == [ABSTAIN] * 3
