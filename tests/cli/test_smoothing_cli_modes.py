"""The sequential and radius modes of randomized smoothing from the command line: ``robustdeq eval
--certify smoothing --smoothing-mode ...`` (the bracket) and every documented SmoothingConfig field
of ``robustdeq certify --smoothing``; options that would be ignored or are unknown are refused."""
from __future__ import annotations

import json

import pytest
import torch

from robustdeq.certify.smoothing import certify
from robustdeq.checkpoint import save_checkpoint
from robustdeq.cli import main
from robustdeq.data import load_dataset


@pytest.fixture(scope="module")
def deq(trained_model):
    return trained_model("mlp_deq", hidden=32)


@pytest.fixture(scope="module")
def ck(tmp_path_factory, deq):
    return str(save_checkpoint(tmp_path_factory.mktemp("ck") / "m.pt", deq,
                               model_config=deq.robustdeq_config, metadata={"dataset": "digits"}))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustdeq: error: "), err
    return err[0]


@pytest.fixture
def brackets(monkeypatch):
    """Records what the bracket computed (a spy around ``compute_bracket``; no report folder,
    so no plots to draw)."""
    from robustdeq.eval import bracket as B
    seen = []
    real = B.compute_bracket

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out[0].details)
        return out
    monkeypatch.setattr(B, "compute_bracket", spy)
    return seen


# the 2-step L2 attack on this tiny DEQ can leave one adjoint solve short of its tolerance
@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")
def test_eval_bracket_sequential_mode_decides_each_eps_as_the_library_does(ck, deq, brackets):
    opts = {"first_batch": 40, "futility_alpha": 0.05, "alpha": 0.01}
    rc = main(["eval", ck, "--suite", "pgd-ift", "--norm", "L2", "--eps", "0.1,0.3", "-n", "4", "--steps", "2",
               "--certify", "smoothing", "--smoothing", "0.25", "--smoothing-n", "400",
               "--smoothing-mode", "sequential", "--smoothing-options", json.dumps(opts), "--no-progress"])
    assert rc == 0
    details, = brackets
    cfg = details["config"]["smoothing"]
    assert cfg["mode"] == "sequential" and cfg["first_batch"] == 40 and cfg["futility_alpha"] == 0.05
    # oracle: the library's sequential test at the same radii and seed, called directly
    x, y = load_dataset("digits", "test")
    direct = certify(deq, x[:4], y[:4], sigma=0.25, n=400, n0=100, check_samples=400, seed=0,
                     mode="sequential", radii=(0.1, 0.3), **opts)
    for e in (0.1, 0.3):
        assert details["per_sample"][f"{e:g}"]["smoothing_certified"] == [r.certified_at(e) for r in direct.results]
    assert any(r.certified_at(0.1) for r in direct.results)       # something to compare
    rows = details["bracket"]
    assert all(r["certified_smoothed"] <= r["attacked_smoothed"] for r in rows)
    # early stopping: fewer noise samples than the fixed-n procedure would draw (n0 + n)
    assert rows[0]["smoothing_samples_per_image"] < 500


def test_eval_bracket_radius_mode(ck, brackets, capsys):
    rc = main(["eval", ck, "--suite", "pgd-ift", "--norm", "Linf", "--eps", "0.01", "-n", "2", "--steps", "1",
               "--certify", "smoothing", "--smoothing", "0.25", "--smoothing-n", "300",
               "--smoothing-mode", "radius", "--smoothing-options", '{"tolerance": 0.1}', "--no-progress"])
    assert rc == 0
    cfg = brackets[0]["config"]["smoothing"]
    assert (cfg["mode"], cfg["tolerance"]) == ("radius", 0.1)
    assert "smoothed classifier (sigma 0.25) certified" in capsys.readouterr().out


@pytest.mark.parametrize("extra,named", [
    (["--smoothing-options", '{"first_bach": 3}'], "first_bach"),
    (["--smoothing-options", '{"n": 50}'], "its own flag --smoothing-n"),
    (["--smoothing-options", '{"futility_alpha": 2}'], "futility_alpha"),
    (["--smoothing-options", "[1]"], "--smoothing-options must be a JSON object"),
    (["--smoothing-mode", "sequential", "--norm", "Linf"], "a radius per sample"),
    (["--smoothing-mode", "sideways"], "--smoothing-mode"),
])
def test_eval_smoothing_option_errors(ck, capsys, tmp_path, extra, named):
    out = tmp_path / "o"
    argv = ["eval", ck, "--certify", "smoothing", "--smoothing", "0.25", "--no-progress", "--out", str(out)] + extra
    try:
        rc = main(argv)
    except SystemExit as e:   # argparse's usage error for a bad choice
        rc = e.code
    assert rc == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--smoothing-mode", "radius"], ["--smoothing-options", '{"alpha": 0.01}']])
def test_eval_smoothing_options_need_smoothing(ck, capsys, flag):
    assert main(["eval", ck, "--certify", "--no-progress"] + flag) == 2
    assert f"{flag[0]} only applies with --smoothing" in _error(capsys)


def test_certify_cli_exposes_every_sequential_setting(ck, tmp_path):
    out = tmp_path / "c"
    rc = main(["certify", ck, "-n", "3", "--smoothing", "0.25", "--n", "600", "--n0", "20", "--mode", "sequential",
               "--radii", "0.1,0.4", "--first-batch", "30", "--futility-alpha", "0.05", "--batch-size", "60",
               "--futility", "projected", "--final-alpha-fraction", "0.5",
               "--alpha", "0.01", "--clip", "--no-progress", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "certificate.json").read_text())
    cfg = rep["config"]
    assert (cfg["first_batch"], cfg["futility_alpha"], cfg["batch_size"], cfg["clip"]) == (30, 0.05, 60, True)
    assert cfg["futility"] == "projected" and cfg["final_alpha_fraction"] == 0.5
    x, y = load_dataset("digits", "test")
    # the first estimation batch is first_batch: every input drew n0 + 30 * k (k = 1, 3, 7, ...) or the budget
    for r in rep["results"]:
        est = r["samples"] - 20
        assert est == 600 or est in (30, 90, 150, 210, 270, 330, 390, 450, 510, 570), est
        assert set(r["decisions"]) == {"0.1", "0.4"}


@pytest.mark.parametrize("extra,named", [
    (["--first-batch", "10"], "--first-batch only applies with --mode sequential or radius"),
    (["--futility-alpha", "0.1"], "--futility-alpha only applies with --mode sequential or radius"),
    (["--mode", "sequential", "--tolerance", "0.1"], "--tolerance only applies with --mode radius"),
    (["--mode", "radius", "--futility", "projected"], "--futility only applies with --mode sequential"),
    (["--check-slack", "0.2"], "--check-slack only applies with --check-max"),
    (["--check-alpha-fraction", "0.3"], "--check-alpha-fraction only applies with --srs-steps"),
    (["--srs-check", "proof"], "--srs-check only applies with --srs-steps"),
    (["--srs-start", "clean"], "--srs-start only applies with --srs-steps"),
    (["--check-samples", "20"], "--check-samples only applies with --srs-steps"),
    (["--srs-steps", "2", "--srs-check", "proof", "--check-max", "50"], "--check-max only applies with --srs-steps"),
    (["--mode", "sequential", "--futility-alpha", "1.5"], "futility_alpha must be in (0, 1)"),
    (["--batch-size", "0"], "--batch-size"),
    (["--final-alpha-fraction", "0.3"], "--final-alpha-fraction only applies with --mode sequential or radius"),
    (["--mode", "sequential", "--final-alpha-fraction", "1"], "final_alpha_fraction must be a number in [0, 1)"),
])
def test_certify_cli_refuses_inapplicable_or_bad_settings(ck, capsys, tmp_path, extra, named):
    out = tmp_path / "o"
    try:
        rc = main(["certify", ck, "-n", "2", "--smoothing", "0.25", "--no-progress", "--out", str(out)] + extra)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert named in capsys.readouterr().err
    assert not out.exists()
    assert torch.is_grad_enabled()
