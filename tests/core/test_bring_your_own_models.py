"""User models of the kinds docs/bring-your-own-model.md supports, beyond the guide's example:
a float64 model, a forward that returns a tuple or a dict, an adopted TorchDEQ model copied after
an attack."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import robustdeq
from robustdeq.attacks import APGD, PGD
from robustdeq.errors import ConfigError
from robustdeq.eval import evaluate


def _x_y(n=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 3


def test_apgd_runs_on_a_float64_model():
    """A float64 model's losses are float64; the attack's per-step loss record was float32 and
    every step's write into it failed."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).double().eval()
    x, y = _x_y()
    x = x.double()
    x_adv = APGD(model, eps=0.1, steps=3, seed=0)(x, y)
    assert x_adv.dtype == x.dtype and float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert next(model.parameters()).dtype == torch.float64


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 3)

    def forward(self, x):
        logits = self.lin(x.flatten(1))
        return logits, logits.softmax(1)


class _DictOut(_TupleOut):
    def forward(self, x):
        return {"logits": self.lin(x.flatten(1))}


@pytest.mark.parametrize("cls, kind", [(_TupleOut, "tuple"), (_DictOut, "dict")])
def test_a_forward_that_does_not_return_a_tensor_is_refused_with_its_type(cls, kind):
    model = cls().eval()
    x, y = _x_y()
    with pytest.raises(ConfigError, match=rf"_\w+Out.forward returns {kind}, not a logits tensor"):
        evaluate(model, x, y, eps=0.1, suite="quick", steps=2)
    with pytest.raises(ConfigError, match=rf"returns {kind}"):
        PGD(model, eps=0.1, steps=2, seed=0)(x, y)


def test_an_adopted_model_can_be_copied_and_certified_after_an_attack():
    """The adopted classifier keeps the latest input for its read-out; after a call on a
    non-leaf input (what attacks pass) a deep copy (certify's working copy) must still work."""
    pytest.importorskip("torchdeq")
    from helpers.torchdeq_models import TorchDEQMLP
    from robustdeq.certify import certify
    adopted = robustdeq.adopt(TorchDEQMLP(width=8).eval())
    x, y = _x_y()
    delta = torch.zeros_like(x, requires_grad=True)
    adopted(x + delta).sum().backward()
    twin = copy.deepcopy(adopted)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), adopted(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = certify(adopted, x, y, eps_l2=(0.05,), methods=["local"])
    assert len(rep.results) == x.shape[0]


class _OneLogit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 1)

    def forward(self, x):
        return self.lin(x.flatten(1)).squeeze(1)


def test_one_dimensional_logits_are_refused_with_their_shape():
    model = _OneLogit().eval()
    x, y = _x_y()
    with pytest.raises(ConfigError, match=r"logits of shape \(4,\).*\(B, num_classes\)"):
        evaluate(model, x, y % 2, eps=0.1, suite="quick", steps=2)
    with pytest.raises(ConfigError, match=r"logits of shape \(4,\)"):
        APGD(model, eps=0.1, steps=2, seed=0)(x, y % 2)
