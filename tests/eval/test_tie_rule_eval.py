"""The evaluation's accuracy curves, solver check and the bracket's re-judgement at the exact fixed
point use the one untargeted rule: a tie between the true class and another is wrong (argmax would
resolve a true class 0 tied with class 1 as correct)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from robustdeq.eval import bracket as B
from robustdeq.eval.checks import _solve_flags
from robustdeq.eval.targets import trajectory_stats

TIE = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
Y = torch.zeros(2, dtype=torch.long)


class _Trajectory(nn.Module):
    """Two recorded states whose read-out ties class 0 with class 1 (weight-tied stand-in)."""

    def run(self, x, record=None):
        states = [SimpleNamespace(step=k, z=x.flatten(1)[:, :1]) for k in (0, 1)]
        return SimpleNamespace(trajectory=states)

    def readout(self, z):
        return TIE.to(z).expand(z.shape[0], 3)


def test_the_per_state_accuracy_curve_counts_a_tie_as_wrong():
    out = trajectory_stats(_Trajectory(), torch.zeros(2, 1, 2, 2), Y, batch_size=8)
    assert out["per_state"]["accuracy"] == [0.0, 0.0]


class _Solved(nn.Module):
    def forward(self, x):
        self.last_stats = SimpleNamespace(converged=torch.ones(x.shape[0], dtype=torch.bool))
        return TIE[: x.shape[0]].clone()


def test_the_unconverged_breaks_check_reads_a_tie_as_wrong():
    ok, converged = _solve_flags(_Solved(), torch.zeros(2, 1, 2, 2), Y, batch_size=8)
    assert ok.tolist() == [False, False] and converged.tolist() == [True, True]


def test_a_tie_at_the_exact_fixed_point_keeps_the_alarm(monkeypatch):
    """The exact fixed point ties the true class 0 with class 1 at the attack's example: it does
    not classify it correctly, so the break is not the deployed solver's alone (an alarm)."""
    from robustdeq.certify import api
    from robustdeq.certify.oracles import linear_deq
    model = linear_deq(torch.tensor([[0.5]]), in_shape=(1, 1, 1), num_classes=2)
    monkeypatch.setattr(api, "exact_logits", lambda m, rows: (
        torch.tensor([[1.0, 1.0]], dtype=torch.float64).expand(rows.shape[0], 2),
        torch.zeros(rows.shape[0], dtype=torch.float64)))
    cand = [{"eps": 0.1, "index": 0, "certificate": "lipschitz"}]
    alarms, deployed = B._rejudge_at_exact_fixed_point(model, torch.tensor([0]), cand,
                                                       {0.1: torch.zeros(1, 1, 1, 1)}, [])
    assert deployed == [] and [a["index"] for a in alarms] == [0]
    assert alarms[0]["exact_pred"] == 0
    # a strict win is the deployed solver's break
    monkeypatch.setattr(api, "exact_logits", lambda m, rows: (
        torch.tensor([[1.0, 0.5]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)))
    alarms, deployed = B._rejudge_at_exact_fixed_point(model, torch.tensor([0]), cand,
                                                       {0.1: torch.zeros(1, 1, 1, 1)}, [])
    assert alarms == [] and [d["index"] for d in deployed] == [0]
    # a win smaller than the logits can move within the tight solve's residual proves nothing
    monkeypatch.setattr(api, "exact_logits", lambda m, rows: (
        torch.tensor([[1.0, 1.0 - 1e-9]], dtype=torch.float64), torch.full((1,), 1e-7, dtype=torch.float64)))
    alarms, deployed = B._rejudge_at_exact_fixed_point(model, torch.tensor([0]), cand,
                                                       {0.1: torch.zeros(1, 1, 1, 1)}, [])
    assert deployed == [] and [a["index"] for a in alarms] == [0]
