"""Entry points: :func:`federate` (Flower's simulation engine, one machine) and
:func:`write_flower_app` (a Flower App folder for a deployment: SuperLink + SuperNodes)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

from ..errors import ConfigError
from ._flwr import require_flwr
from .config import FederatedConfig

logger = logging.getLogger(__name__)

__all__ = ["federate", "write_flower_app", "simulation_backend_config", "refuse_multiprocess_launch"]


def simulation_backend_config(cpus: int = 1) -> Dict[str, Any]:
    """Backend config of Flower's (ray) simulation engine sized for ``cpus`` cores: ``cpus``
    worker actors of one CPU each, no GPU, no dashboard."""
    if cpus < 1:
        raise ConfigError(f"cpus must be >= 1, got {cpus}")
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": int(cpus), "num_gpus": 0, "include_dashboard": False,
                          "logging_level": logging.WARNING, "log_to_driver": False}}


@contextlib.contextmanager
def _quiet_flower(level: int):
    lg = logging.getLogger("flwr")
    old = lg.level
    lg.setLevel(level)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        yield
    finally:
        lg.setLevel(old)


def refuse_multiprocess_launch() -> None:
    """``ConfigError`` under torchrun (or any launcher setting ``WORLD_SIZE`` > 1): a federated
    simulation is one process that starts its own clients; one per rank would run the whole
    federation several times into the same folder."""
    world = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(world)
    except ValueError:
        n = 1
    if n > 1:
        raise ConfigError(f"federate cannot run under torchrun (WORLD_SIZE={world}): Flower's "
                          "simulation engine starts the clients itself; launch it as one process "
                          "(robustdeq federate ..., --cpus N for parallel clients)")


def federate(config: Union[FederatedConfig, Mapping[str, Any], None] = None,
             out_dir: Union[str, Path, None] = None, *, progress: bool = False, resume: bool = True,
             cpus: int = 1, on_round_end: Optional[Callable[[dict], None]] = None,
             flower_log_level: int = logging.ERROR):
    """Train a DEQ federatedly in Flower's simulation engine (``cfg.clients`` virtual SuperNodes).

    Args:
        config: :class:`FederatedConfig` or a dict of its options (unknown keys: ``ConfigError``).
        out_dir: checkpoint per round, ``summary.json``, ``report.md``, ``accuracy.png``, ``tb/``.
        progress: tqdm bar over rounds. resume: continue a run found in ``out_dir``.
        cpus: cores the simulation engine may use (one client trains per core at a time).
        on_round_end: called in the server with every finished round's record.
        flower_log_level: level of the ``flwr`` logger during the run (default ``logging.ERROR``).

    Returns:
        :class:`~robustdeq.federated.server.FederatedResult`.

    Raises:
        MissingExtraError: Flower is not installed (the ``federated`` extra).
        ConfigError: before round 1: a device this machine lacks, a user registration the
            clients cannot import, more clients than training samples, a multi-process launch
            (torchrun).
        TrainingError: a round in which no client's update was fused (each client's reason named).
    """
    cfg = FederatedConfig.from_dict(config)
    require_flwr()
    refuse_multiprocess_launch()
    # before Flower starts: registrations the clients cannot import, clients without samples
    from .config import resolve_device
    from .local import check_shards
    from .plugins import user_registrations
    resolve_device(cfg.device)  # a device this machine lacks
    user_registrations(cfg)
    check_shards(cfg)
    from .. import runlock
    with runlock.hold(out_dir):  # one run per output folder
        return _federate(cfg, out_dir, progress=progress, resume=resume, cpus=cpus,
                         on_round_end=on_round_end, flower_log_level=flower_log_level)


def _federate(cfg: FederatedConfig, out_dir, *, progress, resume, cpus, on_round_end, flower_log_level):
    if out_dir is not None and resume and (Path(out_dir) / "checkpoint.pt").exists():
        from .server import _load_resume
        _load_resume(Path(out_dir) / "checkpoint.pt", cfg)  # another experiment: fail before starting
    # Flower 1.42 marks run_simulation deprecated in favour of the `flwr run` CLI, which starts a
    # detached local SuperLink and runs the ServerApp in another process (no in-process result,
    # no on_round_end callback); flwr.simulation's other entry points (run_simulation_process,
    # flwr-simulation) are process entry points of that runtime, not a Python API. There is no
    # non-deprecated in-process simulation API, so run_simulation stays (its notice goes to
    # Flower's logger, quieted below). Deployments already use `flwr run` (write_flower_app).
    from flwr.simulation import run_simulation
    from .apps import clientapp, make_server_app

    holder: Dict[str, Any] = {}
    server = make_server_app(cfg, out_dir, progress=progress, resume=resume,
                             on_round_end=on_round_end, holder=holder)
    import warnings
    with _quiet_flower(flower_log_level), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")
        run_simulation(server_app=server, client_app=clientapp, num_supernodes=cfg.clients,
                       backend_config=simulation_backend_config(cpus))
    if "error" in holder:
        raise holder["error"]
    if "result" not in holder:
        raise RuntimeError("the federated simulation ended without a result (see the Flower log)")
    return holder["result"]


_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "robustdeq-federated-app"
version = "1.0.0"
description = "Federated DEQ training with robustdeq"
license = "MIT"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "robustdeq"

[tool.flwr.app.components]
serverapp = "robustdeq.federated.apps:serverapp"
clientapp = "robustdeq.federated.apps:clientapp"

[tool.flwr.app.config]
{config}
"""


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid TOML basic string


def write_flower_app(app_dir: Union[str, Path], config: Union[FederatedConfig, Mapping[str, Any]],
                     out_dir: Union[str, Path], *, node_wait: float = 300.0) -> Path:
    """Write a Flower App folder that runs ``config`` on a deployment (``flwr run APP_DIR CONN``).

    The app's ``pyproject.toml`` names the apps of :mod:`robustdeq.federated.apps` and carries
    the run config (``robustdeq-config``: the JSON config; ``out-dir``: where the server writes
    its checkpoint and reports). robustdeq (with its ``federated`` extra) must be installed where
    the SuperLink and the SuperNodes run; start each SuperNode with
    ``--node-config "partition-id=K num-partitions=N"``.
    """
    cfg = FederatedConfig.from_dict(config)
    d = Path(app_dir)
    d.mkdir(parents=True, exist_ok=True)
    entries = "\n".join([f"robustdeq-config = {_toml_str(cfg.to_json())}",
                         f"out-dir = {_toml_str(str(Path(out_dir).resolve()))}",
                         f"node-wait = {float(node_wait)}"])
    (d / "pyproject.toml").write_text(_PYPROJECT.format(config=entries))
    (d / "README.md").write_text("Flower App generated by robustdeq.federated.write_flower_app.\n")
    return d
