"""A model whose logits do not depend on the input under autograd is refused before any attack
runs, with an error naming the likely cause (a DEQ library that detaches in eval mode) and the fix."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robustdeq.attacks import PGD
from robustdeq.errors import GradientMaskingWarning, NoInputGradientError
from robustdeq.eval import evaluate
from robustdeq.guard import model_snapshot, snapshot_diff


class Detaching(nn.Module):
    """Logits computed from a detached input (what an eval-mode TorchDEQ solve amounts to)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x):
        return self.lin(x.detach().flatten(1))


def data(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_attack_refuses_a_model_without_input_gradient():
    x, y = data()
    with pytest.raises(NoInputGradientError, match=r"robustdeq\.adopt.*DEQClassifier"):
        PGD(Detaching(), eps=0.1, steps=2)(x, y)


def test_evaluate_refuses_first_and_never_reports_gradient_masking():
    x, y = data()
    model = Detaching()
    snap = model_snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NoInputGradientError, match="TorchDEQ") as err:
            evaluate(model, x, y, eps=0.1, suite="quick", steps=2)
    assert "eval mode" in str(err.value) and "Detaching" in str(err.value)
    assert not [w for w in caught if issubclass(w.category, GradientMaskingWarning)]
    assert not snapshot_diff(snap)


def test_torchdeq_in_eval_mode_is_refused_and_adopt_fixes_it():
    pytest.importorskip("torchdeq")
    import robustdeq
    from robustdeq.attacks.bridge import TorchAttack
    from helpers.torchdeq_models import TorchDEQMLP
    torch.manual_seed(0)
    model = TorchDEQMLP(width=8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    for mode in ("eval", "train"):  # evaluate() runs the model in eval mode either way
        getattr(model, mode)()
        with pytest.raises(NoInputGradientError, match="TorchDEQ"):
            evaluate(model, x, y, eps=0.1, suite="quick", steps=2)
    pytest.importorskip("torchattacks")
    with pytest.raises(NoInputGradientError):
        TorchAttack(model, "PGD", eps=0.1, steps=2)(x, y)
    # torchattacks running the model in train mode (where TorchDEQ keeps a gradient) is not refused
    TorchAttack(model, "PGD", eps=0.1, steps=2, training_mode={"model_training": True})(x, y)
    x_adv = PGD(robustdeq.adopt(model), eps=0.1, steps=2, seed=0)(x, y)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6


def test_gradient_free_attacks_are_not_refused():
    from robustdeq.attacks.square import Square
    x, y = data()
    x_adv = Square(Detaching(), eps=0.1, n_queries=5, seed=0)(x, y)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
