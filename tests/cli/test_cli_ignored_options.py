"""Options that would be silently ignored are refused on one line naming them (exit status 2),
and messages name the command line's flags, not the library's Python arguments."""
from __future__ import annotations

import pytest
import torch

from robustdeq.checkpoint import save_checkpoint
from robustdeq.cli import main
from robustdeq.deq import zoo


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    torch.manual_seed(0)
    m = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 4})
    return str(save_checkpoint(tmp_path_factory.mktemp("ck") / "m.pt", m, model_config=m.robustdeq_config,
                               metadata={"dataset": "digits"}))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("robustdeq: error: ")
    return err[0]


@pytest.mark.parametrize("argv,named", [
    (["certify", "{ck}", "--n", "100"], "--n/--noise-n only applies with --smoothing"),
    (["certify", "{ck}", "--alpha", "0.01"], "--alpha only applies with --smoothing"),
    (["certify", "{ck}", "--srs-steps", "2"], "--srs-steps only applies with --smoothing"),
    (["certify", "{ck}", "--mode", "sequential"], "--mode only applies with --smoothing"),
    (["eval", "{ck}", "--srs-steps", "2"], "--srs-steps only applies with --smoothing"),
    (["eval", "{ck}", "--smoothing-n", "50"], "--smoothing-n only applies with --smoothing"),
    (["eval", "{ck}", "--strict"], "--strict only applies with --certify"),
    (["eval", "{ck}", "--certify", ""], "--certify ''"),
    (["eval", "{ck}", "--certify", "lipschitz,foo"], "'foo'"),
    (["eval", "{ck}", "--smoothing", "0.25", "--smoothing-n", "0"], "--smoothing-n: must be >= 1"),
])
def test_option_that_would_be_ignored_is_refused(ck, capsys, tmp_path, argv, named):
    out = tmp_path / "o"
    try:
        rc = main([a.format(ck=ck) for a in argv] + ["--out", str(out)])
    except SystemExit as e:  # a usage error of argparse
        rc = e.code
    assert rc == 2
    assert named in _one_line(capsys)
    assert not out.exists()


def test_messages_name_flags_not_python_arguments(tmp_path, capsys):
    out = str(tmp_path / "t")
    base = ["train", "--out", out, "--epochs", "1", "--no-progress", "--model-options", '{"hidden": 8}']
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--lr", "0.5"]) == 2
    line = _one_line(capsys)
    assert "lr: 0.003 there, 0.5 now" in line and "--no-resume" in line and "resume=False" not in line
    assert "out_dir" not in line and "another --out" in line
