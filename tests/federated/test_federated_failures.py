"""Federated runs never report success for work they did not do: user registrations reach the
clients (or are refused before round 1), a round with no fused update fails the run, dropped
clients are named by partition id with a one-line reason, impossible settings are refused early."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from robustdeq.errors import ConfigError, TrainingError
from robustdeq.federated import FederatedConfig

from helpers.flower import InlineGrid

flwr = pytest.importorskip("flwr", reason="needs the 'federated' extra (flwr)")

BASE = {"clients": 2, "rounds": 1, "partition": "iid", "budgets": [30], "eval_suite": "none",
        "local_epochs": 1, "seed": 0}


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A user's module (importable by name) that defines and registers a solver 'my_fp'."""
    (tmp_path / "my_fed_plugins.py").write_text(textwrap.dedent("""
        from robustdeq.deq.solvers import FixedPointIteration, register_solver

        class MyFP(FixedPointIteration):
            calls = 0

        register_solver("my_fp", MyFP, replace=True)

        from robustdeq.data import register_dataset, synthetic

        def my_data(split, root=None):
            return synthetic(8, seed=3)

        register_dataset("my_data", my_data, shape=(1, 8, 8), num_classes=10, replace=True)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_fed_plugins
    yield my_fed_plugins
    from robustdeq.registry import DATASETS, SOLVERS
    SOLVERS.unregister("my_fp")
    DATASETS.unregister("my_data")
    sys.modules.pop("my_fed_plugins", None)


def test_registrations_are_sent_and_installed_in_a_fresh_registry(plugin_module):
    from robustdeq.federated.plugins import install, user_registrations
    from robustdeq.registry import SOLVERS
    cfg = FederatedConfig.from_dict({**BASE, "solver": "my_fp"})
    payload = user_registrations(cfg)
    entry = [e for e in json.loads(payload)["entries"] if e["name"] == "my_fp"]
    assert entry == [{"registry": "SOLVERS", "name": "my_fp", "ref": "my_fed_plugins:MyFP"}]
    data = [e for e in json.loads(payload)["entries"] if e["name"] == "my_data"]
    assert data == [{"registry": "DATASETS", "name": "my_data", "ref": "my_fed_plugins:my_data",
                     "shape": [1, 8, 8], "num_classes": 10}]
    # what a client process sees: robustdeq imported afresh, without the user's registration
    from robustdeq.registry import DATASETS
    SOLVERS.unregister("my_fp")
    DATASETS.unregister("my_data")
    sys.modules.pop("my_fed_plugins")
    assert "my_fp" not in SOLVERS and "my_data" not in DATASETS
    assert install(payload) >= 2
    assert SOLVERS.get("my_fp").__name__ == "MyFP"
    from robustdeq.data import load_dataset, synthetic
    assert torch.equal(load_dataset("my_data")[0], synthetic(8, seed=3)[0])
    from robustdeq.deq.solvers import get_solver
    from robustdeq.federated.local import build_model
    assert type(get_solver(build_model(cfg, budget=3).solver_config)).__name__ == "MyFP"


def test_registered_solver_defined_in_a_function_is_refused_before_round_1(tmp_path):
    from robustdeq.deq.solvers import FixedPointIteration, register_solver
    from robustdeq.federated.run import federate
    from robustdeq.registry import SOLVERS

    class LocalFP(FixedPointIteration):
        pass

    register_solver("local_fp", LocalFP)
    try:
        with pytest.raises(ConfigError, match="local_fp.*inside a function"):
            federate({**BASE, "solver": "local_fp"}, tmp_path / "o")
    finally:
        SOLVERS.unregister("local_fp")
    assert not (tmp_path / "o").exists()


def test_run_whose_clients_all_fail_raises_and_writes_no_checkpoint(tmp_path, task_identity):
    from robustdeq.federated.server import run_rounds
    ansi = ("\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1, ip=127.0.0.1)\n  File \"x.py\", line 3\n"
            "    raise ValueError\n\x1b[31mValueError: worker exploded\x1b[0m\n")
    cfg = FederatedConfig.from_dict({**BASE, "rounds": 2, "faults": {"1": "raise"}})
    with pytest.raises(TrainingError) as err:
        run_rounds(InlineGrid(2, reason=ansi), cfg, tmp_path)
    msg = str(err.value)
    assert "round 1" in msg and "never updated" in msg
    assert "node 1000: client error: ValueError: worker exploded" in msg
    assert "client 1: RuntimeError: injected client fault" in msg and "\n" not in msg
    assert not (tmp_path / "checkpoint.pt").exists()
    md = (tmp_path / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| 1 ")]
    assert len(rows) == 1 and "\x1b" not in md and "ray::" not in md
    assert "rounds completed: 0 of 2" in md and "round 1 failed" in md


def test_dropped_client_is_named_by_partition_id_with_one_line_reason(tmp_path, task_identity):
    from robustdeq.federated.server import run_rounds
    cfg = FederatedConfig.from_dict({**BASE, "clients": 3, "faults": {"1": "raise"}})
    res = run_rounds(InlineGrid(3), cfg, tmp_path)
    (drop,) = res.final["clients_dropped"]
    assert drop["client"] == 1
    assert drop["reason"] == "RuntimeError: injected client fault: the client crashed during local training"
    md = (tmp_path / "report.md").read_text()
    assert "client 1 (RuntimeError: injected client fault" in md
    assert len([ln for ln in md.splitlines() if ln.startswith("| 1 ")]) == 1


def test_more_clients_than_samples_refused_before_round_1(tmp_path):
    from robustdeq.federated.run import federate
    with pytest.raises(ConfigError, match="2000 clients"):
        federate({**BASE, "clients": 2000, "min_client_samples": 1}, tmp_path / "o")
    with pytest.raises(ConfigError, match="samples"):
        federate({**BASE, "clients": 200}, tmp_path / "o")   # 10 samples each needed
    assert not (tmp_path / "o").exists()


def test_federate_under_torchrun_is_refused(tmp_path, monkeypatch):
    from robustdeq.federated.run import federate
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun"):
        federate(BASE, tmp_path / "o")


def test_architecture_of_the_recipe_and_model_defaults():
    with pytest.raises(ConfigError, match="lyadeq.*conv_deq"):
        FederatedConfig.from_dict({**BASE, "defense": "lyadeq", "model": "conv_deq"})
    conv = FederatedConfig.from_dict({**BASE, "model": "conv_deq"})
    assert conv.model_options == {}
    from robustdeq.federated.local import build_model
    assert sum(p.numel() for p in build_model(conv).parameters()) > 0
    mlp = FederatedConfig.from_dict(BASE)
    assert mlp.model_options["hidden"] == 64 and mlp.model_options["norm"] == "spectral"
    assert FederatedConfig.from_dict({**BASE, "defense": "lyadeq"}).model_options == mlp.model_options


@pytest.mark.slow
def test_registered_solver_trains_in_the_simulation_engine(plugin_module, tmp_path):
    """A solver registered by the user works in Flower's client processes."""
    from robustdeq.federated import federate
    res = federate({**BASE, "solver": "my_fp"}, tmp_path)
    assert res.final["clients_fused"] == 2 and not res.final["clients_dropped"]
