"""An option given as 0 counts as given: ``--smoothing 0`` with a smoothing option gets the error
about the 0 itself, not "--n/--noise-n only applies with --smoothing SIGMA"."""

from robustdeq.checkpoint import save_checkpoint
from robustdeq.cli import main
from robustdeq.deq import zoo


def test_smoothing_zero_is_reported_as_such(tmp_path, capsys):
    m = zoo.build("mlp_deq", hidden=4)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, m, model_config=m.robustdeq_config, metadata={"dataset": "digits"})
    assert main(["certify", str(path), "--smoothing", "0", "--n", "10", "-n", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sigma must be a finite number > 0, got 0.0" in err and "only applies with" not in err, err
