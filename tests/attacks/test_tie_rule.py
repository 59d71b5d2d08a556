"""One rule for a tie in every untargeted verdict: the true class's logit must lie strictly above
every other (``robustdeq._tensor.correct``); a tie between it and another class is wrong, whatever
the classes' order (``argmax`` resolves a tie to the lower index: a true class 0 tied with class 1
would count as correct). The attacks, WorstCase, ``evaluate`` and ``judge`` agree."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustdeq._tensor import correct, verdict_margins
from robustdeq.attacks import APGD, APGDT, PGD, Square, WorstCase
from robustdeq.attacks.apgd import APGDDLR
from robustdeq.attacks.base import accuracy
from robustdeq.attacks.pgd import succeeded
from robustdeq.eval import evaluate
from robustdeq.eval.card import judge


class CleanTie(nn.Module):
    """Class 0 ties with class 1 on every input (gradients flow): ``[s, s, s - 1, s - 2]``."""

    def forward(self, x):
        s = x.flatten(1).sum(dim=1)
        return torch.stack([s, s, s - 1, s - 2], dim=1)


class ReachableTie(nn.Module):
    """Correct clean (class 0 at 1, class 1 at ``6 mean(x) = 0.6`` on inputs of mean 0.1); a Linf
    attack of radius 0.1 can raise class 1 only up to a tie with class 0, never above it."""

    def forward(self, x):
        z1 = torch.clamp(6 * x.flatten(1).mean(1), max=1.0)
        return torch.stack([torch.ones_like(z1), z1, z1 - 1, z1 - 2], dim=1)


X = torch.full((3, 1, 8, 8), 0.1)
Y = torch.zeros(3, dtype=torch.long)   # the true class is the lower index of the tie
EPS = 0.1


def _attacks(model):
    return {
        "pgd": PGD(model, eps=EPS, steps=10, seed=0),
        "pgd-restarts": PGD(model, eps=EPS, steps=10, restarts=2, seed=0),
        "pgd-early": PGD(model, eps=EPS, steps=10, seed=0, early_stop=True),
        "apgd-ce": APGD(model, eps=EPS, steps=10),
        "apgd-ce-early": APGD(model, eps=EPS, steps=10, early_stop=True),
        "apgd-dlr": APGDDLR(model, eps=EPS, steps=10),
        "apgd-t": APGDT(model, eps=EPS, steps=10, n_target_classes=3),
        "square": Square(model, eps=EPS, n_queries=300, seed=0),
    }


def test_the_shared_rule_counts_a_tie_as_wrong_whatever_the_order():
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    assert correct(logits, y).tolist() == [False, False, True]
    assert succeeded(logits, y, targeted=False).tolist() == [True, True, False]
    # targeted: the prediction (argmax, a tie resolves to the lower index) is the target
    assert succeeded(logits, y, targeted=True).tolist() == [True, False, True]
    assert accuracy(CleanTie(), X, Y) == 0.0


def test_a_clean_tie_is_broken_for_every_attack_worst_case_evaluate_and_judge():
    model = CleanTie().eval()
    for name, atk in _attacks(model).items():
        x_adv = atk(X, Y)
        assert judge(model, x_adv, Y, x=X, eps=EPS)["accuracy"] == 0.0, name
        robust = getattr(atk, "last_robust", None)
        if robust is not None:
            assert not bool(robust.any()), name
    res = WorstCase(list(_attacks(model).values())).run(X, Y)
    assert not bool(res.clean.any()) and not bool(res.robust.any())
    rep = evaluate(model, X, Y, eps=EPS, suite=["pgd", "apgd-ce"], steps=5, checks=False)
    assert rep.clean_accuracy == 0.0 and rep.robust_accuracy(EPS) == 0.0


def test_a_tie_the_attack_reaches_is_broken_and_agrees_with_evaluate_and_judge():
    model = ReachableTie().eval()
    assert bool(correct(model(X), Y).all())
    for name, atk in _attacks(model).items():
        x_adv = atk(X, Y)
        z = model(x_adv)
        assert torch.equal(z[:, 0], z[:, 1]), name        # the best the threat model allows
        assert judge(model, x_adv, Y, x=X, eps=EPS)["accuracy"] == 0.0, name
        robust = getattr(atk, "last_robust", None)
        if robust is not None:
            assert not bool(robust.any()), name
        if name == "pgd-early":
            assert atk.last_stats["frozen"] == 3 and atk.last_stats["unconfirmed"] == 0
        if name.startswith("apgd"):
            assert sum(r["broken"] for r in atk.last_stats["runs"]) == 3, name
    res = WorstCase(list(_attacks(model).values())).run(X, Y)
    assert bool(res.clean.all()) and not bool(res.robust.any())
    assert all(s not in (None, "clean") for s in res.first_success)
    for suite in (["pgd"], ["apgd-ce"], ["square"]):
        rep = evaluate(model, X, Y, eps=EPS, suite=suite, steps=10, checks=False)
        assert rep.clean_accuracy == 1.0 and rep.robust_accuracy(EPS) == 0.0, suite


def test_the_state_attack_judges_a_tie_as_fooled():
    from robustdeq.attacks.intermediate import StateAttack
    atk = StateAttack.__new__(StateAttack)
    atk.judge, atk.targeted = CleanTie().eval(), False
    fooled, _ = atk._judge(X, Y)
    assert bool(fooled.all())


def test_verdict_margins_keep_a_float64_models_precision():
    logits = torch.tensor([[1.0 + 1e-9, 1.0]], dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.long)
    assert verdict_margins(logits, y).dtype == torch.float64
    assert bool(correct(logits, y).all())
    half = logits.to(torch.bfloat16)
    assert verdict_margins(half, y).dtype == torch.float32


class TinyMargin(nn.Module):
    """A float64 model whose true class 0 wins by 1e-9 on every input, whatever the attack does
    (float32 rounds that margin to a tie)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        s = self.w * x.flatten(1).sum(dim=1)
        return torch.stack([s + 1e-9, s, s - 1], dim=1)


def test_a_float64_models_tiny_margin_is_judged_in_float64():
    model = TinyMargin().eval()
    x, y = X.double(), Y
    with torch.no_grad():
        z = model(x)
    assert float((z[:, 0] - z[:, 1]).min()) > 5e-10
    assert torch.equal(z.float()[:, 0], z.float()[:, 1])            # float32 rounds it to a tie
    pgd = PGD(model, eps=EPS, steps=3, restarts=2, seed=0)
    pgd(x, y)
    assert bool(pgd.last_robust.all())
    early = PGD(model, eps=EPS, steps=3, seed=0, early_stop=True)
    early(x, y)
    assert early.last_stats["frozen"] == 0
    assert judge(model, x, y, x=x, eps=EPS)["accuracy"] == 1.0
    rep = evaluate(model, x, y, eps=EPS, suite=["pgd"], steps=3, checks=False)
    assert rep.clean_accuracy == 1.0 and rep.robust_accuracy(EPS) == 1.0


def test_targeted_margins_agree_with_argmax_at_ties():
    from robustdeq._tensor import targeted_margins
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    t = torch.tensor([0, 1, 2])
    m = targeted_margins(logits, t)
    assert ((m <= 0) == succeeded(logits, t, targeted=True)).all()
    assert (m <= 0).tolist() == [True, False, False]


def test_targeted_pgd_does_not_count_a_tie_the_argmax_resolves_elsewhere():
    """Target class 1 ties with class 0 everywhere (argmax: 0): no targeted success."""
    model = CleanTie().eval()
    t = torch.ones(3, dtype=torch.long)
    pgd = PGD(model, eps=EPS, steps=3, restarts=2, seed=0, targeted=True)
    pgd(X, t)
    assert bool(pgd.last_robust.all())


def test_correct_flags_refuses_labels_outside_the_classes_and_a_bad_batch_size():
    from robustdeq.attacks.base import correct_flags
    from robustdeq.errors import ConfigError, InputError
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(InputError):
        correct_flags(model, x, torch.tensor([0, 5]))
    with pytest.raises(ConfigError):
        correct_flags(model, x, torch.tensor([0, 1]), batch_size=0)
