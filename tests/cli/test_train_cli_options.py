"""robustdeq train: ``--train-options`` keys that have a flag of their own are refused (the flag
decides); a run that trains nothing exits with an error, never 0."""
import json

import pytest

from robustdeq import train
from robustdeq.cli import main
from helpers.cli import cli_error


@pytest.mark.parametrize("key,flag", [("epochs", "--epochs"), ("lr", "--lr"), ("seed", "--seed"),
                                      ("batch_size", "--batch-size")])
def test_train_options_may_not_repeat_a_flag(monkeypatch, tmp_path, capsys, key, flag):
    monkeypatch.setattr(train, "train_model", lambda *a, **k: pytest.fail("trained"))
    opts = json.dumps({key: 0 if key == "epochs" else 1})
    assert main(["train", "--out", str(tmp_path), "--train-options", opts, "--no-progress"]) == 2
    cli_error(capsys, f"--train-options: '{key}' has its own flag {flag}")


def test_a_run_that_trained_nothing_is_an_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train, "train_model", lambda *a, **k: (None, [], None))
    assert main(["train", "--out", str(tmp_path), "--no-progress"]) == 2
    cli_error(capsys, "no epoch was trained", "no checkpoint was written")
