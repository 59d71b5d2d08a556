"""The command line end to end on tiny settings (the full demo is a slow test)."""
import json

import pytest
import torch

from robustdeq.checkpoint import load_model
from robustdeq.cli import main
from robustdeq.data import load_digits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    rc = main(["train", "--model", "mlp_deq", "--model-options", '{"hidden": 16}', "--epochs", "2",
               "--lr", "0.01", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out / "checkpoint.pt"


def test_train_writes_checkpoint_history_and_tensorboard(ckpt, capsys):
    hist = json.loads((ckpt.parent / "history.json").read_text())
    assert len(hist) == 2 and hist[-1]["val_accuracy"] > 0.5
    assert list((ckpt.parent / "tb").glob("events.*"))


def test_attack_saves_examples_in_the_ball(ckpt, tmp_path, capsys):
    out = tmp_path / "adv.pt"
    assert main(["attack", str(ckpt), "--attack", "pgd", "--eps", "0.1", "-n", "16", "--steps", "5",
                 "--out", str(out), "--no-progress"]) == 0
    d = torch.load(out, weights_only=True)
    assert (d["x_adv"] - d["x"]).abs().max() <= 0.1 + 1e-6
    assert d["x_adv"].min() >= 0 and d["x_adv"].max() <= 1
    assert "robust accuracy" in capsys.readouterr().out
    # the file is one `robustdeq judge` reads; its verdicts are the attack's own
    assert main(["judge", str(ckpt), str(out), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["n_samples"] == 16 and v["eps"] == 0.1 and v["norm"] == "Linf"
    assert v["correct"] == int(d["robust"].sum())


def test_eval_and_certify_write_reports(ckpt, tmp_path, capsys):
    assert main(["eval", str(ckpt), "--suite", "quick", "--eps", "0.1", "-n", "16", "--steps", "5",
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["schema_version"] == 1 and rep["n_samples"] == 16
    assert main(["certify", str(ckpt), "-n", "8", "--out", str(tmp_path / "cert"), "--no-progress"]) == 0
    assert (tmp_path / "cert" / "certificate.json").exists()


def test_harden_evaluates_plain_and_wrapped_and_says_where_its_reports_went(ckpt, tmp_path, capsys):
    # eps 0.3: each unit breaks both samples within its first iterations and stops early on
    # them, so quick's APGD-T runs (9 targets) finish at once
    assert main(["harden", str(ckpt), "--eps", "0.3", "-n", "2", "--steps", "1", "--no-progress",
                 "--wrap-options", '{"rounds": 2, "inner_steps": 1}', "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "as trained" in out and "+ entropy" in out
    assert str(tmp_path / "as_trained") in out and str(tmp_path / "with_entropy") in out
    assert (tmp_path / "with_entropy" / "report.json").exists()
    # the same folder with other defense settings: refused (not the stored report), or redone
    args = ["harden", str(ckpt), "--eps", "0.3", "-n", "2", "--steps", "1", "--no-progress",
            "--wrap-options", '{"rounds": 3, "inner_steps": 1}', "--out", str(tmp_path)]
    assert main(args) == 2
    assert "with_entropy" in capsys.readouterr().err
    assert main(args + ["--no-resume"]) == 0
    rep = json.loads((tmp_path / "with_entropy" / "report.json").read_text())
    assert rep["provenance"]["model"]["describe"]["rounds"] == 3


def test_demo_training_part(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--skip-eval", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    # oracle: the saved checkpoint re-evaluated here on the whole digits test split
    model, _ = load_model(tmp_path / "undefended" / "checkpoint.pt")
    xt, yt = load_digits("test")
    with torch.no_grad():
        eq = model.run(xt)
    assert summary["test_accuracy"] == pytest.approx(float((eq.logits.argmax(1) == yt).float().mean()),
                                                     abs=1e-5)
    assert summary["solver"]["converged_fraction"] == pytest.approx(
        float(eq.stats.converged.float().mean()), abs=1e-5)


def test_errors_are_reported_cleanly(tmp_path, capsys):
    assert main(["certify", str(tmp_path / "missing.pt")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["train", "--defense", "magic", "--out", str(tmp_path / "x"), "--epochs", "1"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "x.pt", "--suite", "huge"])


@pytest.mark.slow
def test_full_demo(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--samples", "60", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.97
    assert set(summary["robustness"]["tables"]) == {"undefended", "jiio-at"}


def test_eval_takes_a_comma_list_of_attack_names(ckpt, tmp_path, capsys):
    assert main(["eval", str(ckpt), "--suite", "pgd-ift,apgd-ce", "--eps", "0.1", "-n", "8", "--steps", "3",
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert [a["key"] for a in rep["results"][0]["attacks"]] == ["pgd-ift", "apgd-ce"]
    with pytest.raises(SystemExit):
        main(["eval", str(ckpt), "--suite", "pgd-ift,apgd-zz"])
    assert "apgd-zz" in capsys.readouterr().err
