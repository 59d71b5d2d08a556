"""evaluate(..., solver=...): the whole evaluation solves the DEQ with the given config, equal to
evaluating a twin model configured with it, and the model itself keeps its own."""
import copy
import warnings

import pytest
import torch

from robustdeq.config import SolverConfig
from robustdeq.data import synthetic
from robustdeq.deq import zoo
from robustdeq.errors import ConfigError
from robustdeq.eval import evaluate


def _run(model, x, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(model, x, y, eps=0.1, suite=["pgd"], steps=2, batch_size=8, checks=False, **kw)


def test_evaluate_with_another_solver_equals_a_twin_configured_with_it():
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8).eval()
    x, y = synthetic(8, seed=1)
    cfg = {"name": "fixed_point", "max_iter": 3, "tol": 0.0}
    own = model.solver_config
    twin = copy.deepcopy(model)
    twin.solver_config = SolverConfig(**cfg)
    a = _run(model, x, y, solver=cfg)
    b = _run(twin, x, y)
    assert model.solver_config is own                      # the model keeps its own solver
    assert a.clean["solver"]["mean_steps"] == 3.0 and b.clean["solver"]["mean_steps"] == 3.0
    assert [r.robust for r in a.results] == [r.robust for r in b.results]
    assert a.clean_accuracy == b.clean_accuracy and a.clean == b.clean  # the solver statistics too
    assert a.config_hash != _run(model, x, y).config_hash  # the solver is part of the protocol
    with pytest.raises(ConfigError, match="fixed-point solver"):
        _run(zoo.build("ff_mlp", hidden=8), x, y, solver=cfg)
    with pytest.raises(ConfigError, match="unknown solver"):
        _run(model, x, y, solver={"name": "newton"})


@pytest.mark.filterwarnings("ignore::robustdeq.errors.NonConvergenceWarning")  # 3 plain steps, on purpose
def test_cli_eval_solver_options(tmp_path, capsys):
    import json
    from robustdeq.checkpoint import save_checkpoint
    from robustdeq.cli import main
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8)
    ck = tmp_path / "ck.pt"
    save_checkpoint(ck, model, model_config=model.robustdeq_config, metadata={"dataset": "digits"})
    common = ["eval", str(ck), "--suite", "pgd", "--eps", "0.1", "-n", "8", "--steps", "2", "--no-progress"]
    opts = '{"name": "fixed_point", "max_iter": 3, "tol": 0.0}'
    assert main(common + ["--solver-options", opts, "--out", str(tmp_path / "ev")]) == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["clean"]["solver"]["mean_steps"] == 3.0
    capsys.readouterr()
    assert main(common + ["--solver-options", '{"name": "anderson", "sweeps": 3}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustdeq: error:") and "sweeps" in err[0]
