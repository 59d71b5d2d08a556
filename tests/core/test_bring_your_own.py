"""docs/bring-your-own-model.md: its example code runs as written, and the certificate it states
for affine (conv) injections is exact on a linear DEQ (closed-form oracle)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

DOC = Path(__file__).resolve().parents[2] / "docs" / "bring-your-own-model.md"


def doc_blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_guide_example_runs_as_written(capsys):
    pytest.importorskip("torchdeq")
    blocks = doc_blocks()
    assert len(blocks) >= 4
    ns: dict = {"__name__": "byo_doc"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for code in blocks:
            exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - the guide's own code
    model = ns["model"]
    # the hand-written model: a trained DEQ whose evaluation and certification ran
    assert ns["eq"].stats.converged.numel() == 8 and [s.step for s in ns["eq"].trajectory] == [2, 5]
    assert ns["report"].robust_accuracy(0.1) <= ns["report"].clean_accuracy
    assert ns["cert"].global_certificates["available"]["lipschitz"].startswith("no")
    assert isinstance(model.cell, nn.Module) and ns["adopted"].last_stats is not None


def test_conv_injection_gets_the_exact_lipschitz_radius_of_a_linear_deq():
    """A conv injection, a linear cell ``A z + u`` and a linear head make x -> logits affine:
    the certified L2 radius must equal the exact distance to the decision boundary,
    min_j g_j(x) / ||(w_y - w_j)^T (I - A)^{-1} C||, C the conv's matrix (built here with autograd)."""
    from robustdeq import DEQClassifier
    from robustdeq.certify import certify
    from robustdeq.certify.oracles import LinearCell
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten())
    D = 2 * 4 * 4
    A = torch.randn(D, D)
    A = 0.5 * A / torch.linalg.matrix_norm(A, ord=2)
    model = DEQClassifier(conv, LinearCell(A), nn.Linear(D, 3),
                          solver={"max_iter": 100, "tol": 1e-9}, input_shape=(1, 4, 4)).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    rep = certify(model, x, None, eps_l2=[0.01], methods=["lipschitz"])
    assert rep.global_certificates["available"]["lipschitz"] == "yes"
    C = torch.autograd.functional.jacobian(lambda v: conv(v.view(1, 1, 4, 4)).flatten(),
                                           torch.zeros(16, dtype=torch.float64))
    M = model.head.weight.detach() @ torch.linalg.inv(torch.eye(D, dtype=torch.float64) - A.double()) @ C
    with torch.no_grad():
        logits = model(x)
    for b, r in enumerate(rep.results):
        yb = int(logits[b].argmax())
        exact = min(float(logits[b, yb] - logits[b, j]) / float((M[yb] - M[j]).norm())
                    for j in range(3) if j != yb)
        assert r.radius == pytest.approx(exact, rel=1e-5)
