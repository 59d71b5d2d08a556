"""The Flower apps: ``clientapp`` (local DEQ training) and ``serverapp`` (the round loop).

Both are module-level objects, so that Flower can load them by reference: the simulation engine
ships ``clientapp`` to its workers, and a deployment names them in a Flower App's
``pyproject.toml`` (``robustdeq.federated.apps:clientapp`` / ``:serverapp``; see
:func:`robustdeq.federated.run.write_flower_app`).

The client learns the run's settings from the server (the JSON :class:`FederatedConfig` in the
message's ``ConfigRecord``) and its identity from its node config: ``partition-id`` (its client id
and data shard) and ``num-partitions``; optional ``max-iter``, ``solver`` and ``tol`` set its own
solver budget (a device that can afford more or fewer iterations says so itself). The deployed
server reads the settings from its run config: ``robustdeq-config`` (JSON) and ``out-dir``.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Dict, Optional

from ._flwr import require_flwr

require_flwr()

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .config import FederatedConfig  # noqa: E402
from .local import train_client  # noqa: E402
from .plugins import REGISTRATIONS_KEY, install  # noqa: E402
from .strategy import CONFIG_KEY  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["clientapp", "serverapp", "make_server_app", "client_identity"]


def client_identity(cfg: FederatedConfig, node_config) -> Dict[str, Any]:
    """Client id, number of clients and solver overrides from a SuperNode's node config."""
    if "partition-id" not in node_config:
        raise ConfigError("the SuperNode has no 'partition-id' in its node config "
                          "(start it with --node-config \"partition-id=K num-partitions=N\")")
    ident: Dict[str, Any] = {"client": int(node_config["partition-id"]),
                             "num_clients": int(node_config.get("num-partitions", cfg.clients))}
    if ident["num_clients"] != cfg.clients:
        raise ConfigError(f"node config says num-partitions={ident['num_clients']} but the run has "
                          f"{cfg.clients} clients")
    if "max-iter" in node_config:
        ident["budget"] = int(node_config["max-iter"])
    if "solver" in node_config:
        ident["solver"] = str(node_config["solver"])
    if "tol" in node_config:
        ident["tol"] = float(node_config["tol"])
    return ident


clientapp = ClientApp()


@clientapp.train()
def _train(msg: Message, context: Context) -> Message:
    """Local training; a failure is answered with the client's partition id and a one-line reason
    (``ConfigRecord`` ``"error"``: type, message and the full traceback for the server's log)."""
    torch.set_num_threads(int(context.node_config.get("threads", 1)))
    config = msg.content["config"]
    client = context.node_config.get("partition-id")
    try:
        if REGISTRATIONS_KEY in config:
            install(str(config[REGISTRATIONS_KEY]))
        cfg = FederatedConfig.from_json(str(config[CONFIG_KEY]))
        ident = client_identity(cfg, context.node_config)
        state = msg.content["arrays"].to_torch_state_dict()
        res = train_client(cfg, ident.pop("client"), state, int(config["server-round"]), **ident)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which drops this client
        logger.exception("client %s failed", client)
        err = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        metrics = MetricRecord({"client": int(client)} if client is not None else {})
        return Message(content=RecordDict({"metrics": metrics, "error": ConfigRecord(err)}), reply_to=msg)
    content = RecordDict({"arrays": ArrayRecord(res.state),
                          "metrics": MetricRecord({**res.metrics, "num-examples": res.num_examples})})
    return Message(content=content, reply_to=msg)


def make_server_app(cfg: FederatedConfig, out_dir=None, *, progress: bool = False, resume: bool = True,
                    on_round_end: Optional[Callable[[dict], None]] = None,
                    holder: Optional[dict] = None, node_wait: float = 120.0) -> ServerApp:
    """A ``ServerApp`` running :func:`~robustdeq.federated.server.run_rounds` with ``cfg``; the
    :class:`~robustdeq.federated.server.FederatedResult` is put in ``holder["result"]`` (an
    exception of the round loop in ``holder["error"]``)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        from .server import run_rounds
        if holder is None:
            run_rounds(grid, cfg, out_dir, progress=progress, resume=resume,
                       on_round_end=on_round_end, node_wait=node_wait)
            return
        try:
            holder["result"] = run_rounds(grid, cfg, out_dir, progress=progress, resume=resume,
                                          on_round_end=on_round_end, node_wait=node_wait)
        except BaseException as exc:  # noqa: BLE001 - raised again by the caller, outside Flower
            holder["error"] = exc

    return app


serverapp = ServerApp()


@serverapp.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    from .server import run_rounds
    rc = context.run_config
    if CONFIG_KEY not in rc:
        raise ConfigError(f"the run config has no {CONFIG_KEY!r} entry (the JSON FederatedConfig)")
    cfg = FederatedConfig.from_json(str(rc[CONFIG_KEY]))
    out_dir = str(rc["out-dir"]) if rc.get("out-dir") else None
    run_rounds(grid, cfg, out_dir, resume=True, node_wait=float(rc.get("node-wait", 300.0)))
