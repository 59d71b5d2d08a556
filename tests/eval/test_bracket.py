"""The robustness bracket (robustdeq.eval.bracket): certified <= robust <= attacked, alarms."""
import json

import pytest
import torch

from robustdeq.deq import zoo
from robustdeq.errors import CertificateSoundnessWarning, ConfigError
from robustdeq.eval import bracket as B
from robustdeq.eval import evaluate


def _model(seed=0):
    torch.manual_seed(seed)
    return zoo.build("mlp_deq", hidden=16, norm="spectral", scale=0.5, in_shape=(1, 4, 4), num_classes=3,
                     std=0.3, mean=0.5)


def _data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 4, 4), generator=g)


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x = _data()
    with torch.no_grad():
        y = model(x).argmax(dim=1)      # every sample correct: certificates can hold
    return model, x, y


def test_bracket_orders_certified_below_attacked_and_stays_quiet(setup):
    model, x, y = setup
    rep = evaluate(model, x, y, threat="L2", eps=[0.05, 0.5], suite="quick", steps=5, checks=False,
                   certify=True)
    check = rep.check(B.CHECK_NAME)
    assert not check.fired and check.value == 0
    for row, res in zip(check.details["bracket"], rep.results):
        assert row["certified_base"] <= row["attacked_base"] == pytest.approx(res.robust_accuracy)
    assert check.details["bracket"][0]["certified_base"] > 0    # a contractive DEQ certifies small eps
    assert any(n.startswith("bracket at L2 eps 0.05") for n in rep.notes)
    json.loads(rep.to_json())


def test_alarm_fires_on_a_deliberately_unsound_certificate(setup, monkeypatch):
    model, x, y = setup
    rep = evaluate(model, x, y, threat="L2", eps=[2.0], suite="quick", steps=10, checks=False)
    broken = [i for i, r in enumerate(rep.results[0].robust) if not r]
    assert broken, "eps 2 must break some sample for the oracle"

    def fake(model, x, y, eps, threat, methods, notes):   # certifies everything at every eps
        return {e: ["fake"] * x.shape[0] for e in eps}
    monkeypatch.setattr(B, "_base_certificates", fake)
    with pytest.warns(CertificateSoundnessWarning):
        check = B.attach_bracket(rep, model, x, y, True)
    assert check.fired and check.value == len(broken)
    assert sorted(a["index"] for a in check.details["alarms"]) == broken
    assert B.CHECK_NAME in rep.fired


def test_linf_uses_ibp_or_the_l2_radius_of_the_box_ball(setup):
    model, x, y = setup
    rep = evaluate(model, x, y, threat="Linf", eps=[0.01, 0.02], suite="quick", steps=5, checks=False,
                   certify=["lipschitz", "ibp"])
    check = rep.check(B.CHECK_NAME)
    assert not check.fired
    # oracle: IBP's own verdict at eps, else the certified L2 radius against the farthest point of
    # the Linf box & [0, 1] (each pixel moved by min(eps, its room to 0 or 1, the larger))
    from robustdeq.certify import certify, ibp_certify
    radius = torch.tensor([r.radius for r in certify(model, x, y, eps_l2=(0.1,), methods=["lipschitz"]).results],
                          dtype=torch.float64)
    xf = x.flatten(1).double()
    total = 0
    for e in (0.01, 0.02):
        by = check.details["per_sample"][f"{e:g}"]["certified_by"]
        ibp = ibp_certify(model, x, y, e).certified.tolist()
        far = torch.minimum(torch.full_like(xf, e), torch.maximum(xf, 1 - xf)).norm(dim=1)
        expected = ["ibp" if i else "lipschitz" if float(r) > float(d) else None
                    for i, r, d in zip(ibp, radius, far)]
        assert by == expected, e
        total += sum(b is not None for b in by)
    assert total > 0                           # the oracle saw certified samples


def test_smoothing_bracket_is_compared_with_the_smoothed_classifier(setup):
    model, x, y = setup
    rep = evaluate(model, x[:4], y[:4], threat="L2", eps=[0.1], suite="quick", steps=3, checks=False,
                   certify={"methods": [], "smoothing": {"sigma": 0.25, "n0": 20, "n": 200},
                            "attack_steps": 3, "attack_samples": 8, "predict_n": 200})
    row = rep.check(B.CHECK_NAME).details["bracket"][0]
    assert row["certified_smoothed"] <= row["attacked_smoothed"]
    assert any("smoothed classifier, not the base model" in n for n in rep.notes)


def test_bracket_config_errors():
    with pytest.raises(ConfigError):
        B.make_bracket_config(["lipschitz", "magic"])
    with pytest.raises(ConfigError):
        B.make_bracket_config({"attack_steps": 0})
    with pytest.raises(ConfigError):
        B.make_bracket_config({"smoothing": {"sigma": -1}})
    assert B.make_bracket_config("lipschitz,smoothing").smoothing == {}


def test_cli_eval_certify_and_strict(tmp_path, monkeypatch, capsys):
    from robustdeq.cli import main
    out = tmp_path / "train"
    assert main(["train", "--model-options", '{"hidden": 16, "norm": "spectral", "scale": 0.5}', "--epochs", "1",
                 "--lr", "0.01", "--out", str(out), "--no-progress"]) == 0
    ck = str(out / "checkpoint.pt")
    assert main(["eval", ck, "--suite", "quick", "--norm", "L2", "--eps", "0.1", "-n", "8", "--steps", "3",
                 "--certify", "--strict", "--no-progress"]) == 0
    assert "bracket at L2 eps 0.1" in capsys.readouterr().out
    monkeypatch.setattr(B, "_base_certificates",
                        lambda model, x, y, eps, threat, methods, notes: {e: ["fake"] * x.shape[0] for e in eps})
    with pytest.warns(CertificateSoundnessWarning):
        rc = main(["eval", ck, "--suite", "quick", "--norm", "L2", "--eps", "3", "-n", "8", "--steps", "5",
                   "--certify", "--strict", "--no-progress"])
    assert rc == 3


def test_bracket_takes_the_feedforward_networks_certify_takes():
    """A wrapper whose forward normalises before its Sequential .net gets no IBP of .net alone
    (the same predicate as certify()); FeedForward around the same Sequential does."""
    from torch import nn
    from robustdeq.deq.zoo import FeedForward

    class Normalising(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net((x - 0.45) / 0.01)

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(3, 1, 2, 2)
    y = seq(x).argmax(1)
    notes = []
    out = B._base_certificates(Normalising(seq), x, y, [0.0], "Linf", ("ibp",), notes)
    assert out == {0.0: [None] * 3}
    assert "Normalising's forward is not that of nn.Sequential or FeedForward" in notes[0]
    out = B._base_certificates(FeedForward(seq, (1, 2, 2)), x, y, [0.0], "Linf", ("ibp",), [])
    assert out == {0.0: ["ibp"] * 3}            # eps 0, own predictions: certified


def _short_solver_deq():
    """A 1-D linear DEQ ``z = z / 2 + x`` read out as ``logit_0 - logit_1 = 50 z - 50`` whose own
    solver stops after 8 fixed-point steps, ``(1 - 2^-8)`` of the way to ``z* = 2 x``: within
    ``deploy_tol`` of z* at the clean inputs (certified), yet misclassifying just right of the
    exact decision boundary ``x = 0.5`` where z* is still class 0."""
    from robustdeq.certify.oracles import linear_deq
    model = linear_deq(torch.tensor([[0.5]]), in_shape=(1, 1, 1), num_classes=2,
                       solver={"name": "fixed_point", "max_iter": 8, "tol": 1e-12, "stop_mode": "abs"})
    with torch.no_grad():
        model.injection.linear.weight.fill_(1.0)
        model.injection.linear.bias.zero_()
        model.head.linear.weight.copy_(torch.tensor([[50.0], [0.0]]))
        model.head.linear.bias.copy_(torch.tensor([-50.0, 0.0]))
    return model.eval(), torch.tensor([0.9, 0.95]).view(2, 1, 1, 1), torch.tensor([0, 0])


def _evaluate_short_solver_deq(model, x, y, **kw):
    import warnings
    from robustdeq.errors import CertificationWarning, NonConvergenceWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        warnings.simplefilter("ignore", CertificationWarning)
        return evaluate(model, x, y, threat="L2", eps=[0.399], suite="quick", steps=10, checks=False, **kw)


def test_a_break_of_the_deployed_solver_alone_is_reported_apart_not_as_an_alarm():
    """Sample 0 (x = 0.9) is certified at radius ~0.4 (> 0.399) for the exact fixed point; PGD
    reaches x' = 0.501 where the 8-step solve predicts class 1 but z*(x') = 1.002 is class 0. The
    bracket raised its soundness alarm for what is the solver's break, not the certificate's."""
    from robustdeq.errors import NonConvergenceWarning
    model, x, y = _short_solver_deq()
    rep = _evaluate_short_solver_deq(model, x, y)
    assert rep.results[0].robust == [False, True]                    # the deployed model is broken
    with pytest.warns(NonConvergenceWarning, match=r"broken by the model's own solver.*eps 0.399 sample 0"):
        check = B.attach_bracket(rep, model, x, y, True)
    assert not check.fired and check.value == 0 and B.CHECK_NAME not in rep.fired   # --strict passes
    (brk,) = check.details["deployed_solver_breaks"]
    assert (brk["eps"], brk["index"], brk["certificate"], brk["exact_pred"]) == (0.399, 0, "lipschitz", 0)
    assert check.details["bracket"][0]["deployed_solver_breaks"] == 1
    assert check.details["per_sample"]["0.399"]["certified_by"][0] == "lipschitz"
    assert any("broken by the deployed solver only (samples 0" in n for n in rep.notes)
    again = json.loads(rep.to_json())
    saved = next(c for c in again["checks"] if c["name"] == B.CHECK_NAME)
    assert saved["details"]["deployed_solver_breaks"][0]["index"] == 0


def test_a_break_the_exact_fixed_point_confirms_still_alarms(monkeypatch):
    """A deliberately wrong certificate (sample 1 "certified" at a radius where the exact map is
    broken too) keeps the alarm, next to sample 0's deployed-solver break."""
    from robustdeq.errors import NonConvergenceWarning
    model, x, y = _short_solver_deq()
    x = torch.tensor([0.9, 0.6]).view(2, 1, 1, 1)                    # 0.6 - 0.399 < 0.5: truly broken
    rep = _evaluate_short_solver_deq(model, x, y)
    assert rep.results[0].robust == [False, False]
    real = B._base_certificates

    def wrong(model, x, y, eps, threat, methods, notes):             # certify sample 1 as well
        out = real(model, x, y, eps, threat, methods, notes)
        return {e: [c if i != 1 else "wrong" for i, c in enumerate(v)] for e, v in out.items()}
    monkeypatch.setattr(B, "_base_certificates", wrong)
    with pytest.warns(NonConvergenceWarning, match="sample 0"), \
            pytest.warns(CertificateSoundnessWarning, match="eps 0.399 sample 1 \\(wrong"):
        check = B.attach_bracket(rep, model, x, y, True)
    assert check.fired and B.CHECK_NAME in rep.fired
    (alarm,) = check.details["alarms"]
    assert (alarm["index"], alarm["certificate"], alarm["exact_pred"]) == (1, "wrong", 1)
    assert [d["index"] for d in check.details["deployed_solver_breaks"]] == [0]
    # without the attacks' examples (a report read back) nothing can be re-judged: both alarm
    for r in rep.results:
        del r.x_adv
    rep.checks = [c for c in rep.checks if c.name != B.CHECK_NAME]
    with pytest.warns(CertificateSoundnessWarning):
        check = B.attach_bracket(rep, model, x, y, True)
    assert sorted(a["index"] for a in check.details["alarms"]) == [0, 1]
    assert any("could not be re-judged at the exact fixed point" in n for n in rep.notes)


def test_cli_strict_passes_a_deployed_solver_break(monkeypatch, capsys):
    from robustdeq.cli import evaluate as cli_eval
    from robustdeq.cli import main
    model, x, y = _short_solver_deq()
    monkeypatch.setattr(cli_eval, "load_for_eval", lambda args: (model, x, y))
    with pytest.warns(Warning):
        rc = main(["eval", "unused.pt", "--suite", "quick", "--norm", "L2", "--eps", "0.399", "--steps", "10",
                   "--certify", "--strict", "--no-progress"])
    assert rc == 0
    assert "broken by the deployed solver only" in capsys.readouterr().out
