"""``DEQFusion``: a Flower (Message API) strategy with pluggable fusion weights and update checks.

It sends the global model and the run's config to every connected node, then fuses the replies
with :mod:`robustdeq.federated.fusion`: replies carrying an error (a client that raised) are
dropped, updates that fail :func:`~robustdeq.federated.fusion.check_update` (NaN/inf, wrong
shapes or names, bad sample counts) are rejected, and the rest are averaged with weights
``n_k q_k / sum_j n_j q_j``. What happened in the latest round is in :attr:`DEQFusion.last_round`.

Evaluation of the global model is done centrally by the server loop
(:func:`robustdeq.federated.server.run_rounds`) with the robustdeq harness, so
:meth:`configure_evaluate` sends nothing.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ._flwr import require_flwr

require_flwr()

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .report import ANSI as _ANSI, one_line  # noqa: E402
from .fusion import (ClientUpdate, Rule, check_update, fuse, fusion_weights,  # noqa: E402
                     quality_factors, summarize_weights)

logger = logging.getLogger(__name__)

__all__ = ["DEQFusion", "RoundOutcome", "CONFIG_KEY", "wait_for_nodes", "one_line"]

CONFIG_KEY = "robustdeq-config"


@dataclass
class RoundOutcome:
    """What the strategy saw in one round."""

    server_round: int
    sent_to: List[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    dropped: List[Dict[str, Any]] = field(default_factory=list)    # errors and time-outs
    rejected: List[Dict[str, Any]] = field(default_factory=list)   # failed the update checks
    clients: List[Dict[str, Any]] = field(default_factory=list)    # fused: n_k, q_k, w_k, stats
    fused: bool = False


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> List[int]:
    """Node ids once at least ``n`` nodes are connected (``ConfigError`` after ``timeout`` s)."""
    t0 = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() - t0 > timeout:
            raise ConfigError(f"only {len(nodes)} of the {n} expected clients connected within "
                              f"{timeout:.0f} s")
        time.sleep(0.1)


def _metric(rec: MetricRecord, key: str, default: float = math.nan) -> float:
    v = rec.get(key, default)
    return float(v) if isinstance(v, (int, float)) else default


class DEQFusion(Strategy):
    """Weighted-average fusion of DEQ clients (FedAvg, quality-weighted or a custom rule).

    Args:
        fusion: ``"fedavg"``, ``"quality"``, ``"accuracy"`` or a callable ``rule(updates) -> q``
            (see :mod:`robustdeq.federated.fusion`).
        quality_floor: lower bound of the quality factors of the built-in rules.
        min_nodes: nodes that must be connected before a round starts.
        node_wait: seconds to wait for them.
        config: extra entries of the ``ConfigRecord`` sent with the model (the server loop puts
            the run's JSON config under ``"robustdeq-config"``).
    """

    def __init__(self, fusion: Rule = "fedavg", *, quality_floor: float = 0.05, min_nodes: int = 1,
                 node_wait: float = 120.0, config: Optional[Dict[str, Any]] = None):
        if isinstance(fusion, str):
            quality_factors([], fusion)  # unknown names are a ConfigError now, not mid-run
        self.fusion = fusion
        self.quality_floor = float(quality_floor)
        self.min_nodes = int(min_nodes)
        self.node_wait = float(node_wait)
        self.config = dict(config or {})
        self.last_round: Optional[RoundOutcome] = None
        self._reference: Optional[Dict[str, Any]] = None

    def summary(self) -> None:
        """Log the strategy's settings (Flower calls it when the run starts)."""
        logger.info("DEQFusion: fusion=%s quality_floor=%g min_nodes=%d",
                    self.fusion if isinstance(self.fusion, str) else "custom", self.quality_floor,
                    self.min_nodes)

    # -- training ----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The training messages of round ``server_round``: the global ``arrays`` and the
        config (with ``server-round``) sent to every connected node, once ``min_nodes`` are
        connected (a ``ConfigError`` after ``node_wait`` seconds otherwise)."""
        nodes = wait_for_nodes(grid, self.min_nodes, self.node_wait)
        self._reference = arrays.to_torch_state_dict()
        cfg = ConfigRecord({**self.config, **dict(config), "server-round": server_round})
        content = RecordDict({"arrays": arrays, "config": cfg})
        size = arrays.count_bytes()
        self.last_round = RoundOutcome(server_round, sent_to=list(nodes), bytes_down=size * len(nodes))
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]

    def _parse(self, msg: Message) -> Tuple[Optional[ClientUpdate], int, Optional[str]]:
        """(update, bytes, problem) of one reply without an error."""
        content = msg.content
        node = int(msg.metadata.src_node_id)
        arrays = content.array_records.get("arrays") if hasattr(content, "array_records") else None
        metrics = content.metric_records.get("metrics") if hasattr(content, "metric_records") else None
        if arrays is None or metrics is None:
            return None, 0, "reply lacks the 'arrays' or 'metrics' record"
        size = arrays.count_bytes()
        try:
            state = arrays.to_torch_state_dict()
        except Exception as exc:  # noqa: BLE001 - any undecodable payload is a rejected update
            return None, size, f"arrays cannot be decoded: {exc}"
        n = metrics.get("num_examples", metrics.get("num-examples"))
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        client = _metric(metrics, "client", -1.0)
        stats = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and k not in ("client", "num_examples", "num-examples")}
        upd = ClientUpdate(client=int(client) if math.isfinite(client) else -1, num_examples=n,
                           state=state, stats=stats, node_id=node)
        return upd, size, None

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """The fused global model and the weighted client metrics of round ``server_round``, or
        ``(None, None)`` when no update is acceptable. Replies with an error are recorded as
        dropped, updates that fail :func:`~robustdeq.federated.fusion.check_update` as rejected
        (in ``last_round``); the rest are fused with the strategy's weights in a fixed order."""
        replies = list(replies)
        out = self.last_round if (self.last_round is not None
                                  and self.last_round.server_round == server_round) \
            else RoundOutcome(server_round)
        self.last_round = out
        reference = self._reference
        accepted: List[ClientUpdate] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                reason = one_line(msg.error.reason)
                out.dropped.append({"node": node, "client": None, "reason": f"client error: {reason}"})
                logger.warning("round %d: node %d dropped (%s); the client's error:\n%s", server_round,
                               node, reason, _ANSI.sub("", str(msg.error.reason)))
                continue
            err = msg.content.config_records.get("error") if hasattr(msg.content, "config_records") else None
            if err is not None:
                metrics = msg.content.metric_records.get("metrics")
                cid = metrics.get("client") if metrics is not None else None
                client = int(cid) if isinstance(cid, (int, float)) else None
                reason = one_line(f"{err.get('type', 'Error')}: {err.get('message', '')}")
                out.dropped.append({"node": node, "client": client, "reason": reason})
                logger.warning("round %d: client %s dropped (%s); its traceback:\n%s", server_round,
                               client if client is not None else f"on node {node}", reason,
                               err.get("traceback", ""))
                continue
            upd, size, problem = self._parse(msg)
            out.bytes_up += size
            if problem is None and reference is None:
                problem = "no global model to check the update against"
            if problem is None:
                problem = check_update(upd, reference)
            if problem is not None:
                out.rejected.append({"node": node, "client": None if upd is None else upd.client,
                                     "reason": problem})
                logger.warning("round %d: update of node %d rejected: %s", server_round, node, problem)
                continue
            accepted.append(upd)
        if not accepted:
            logger.warning("round %d: no acceptable update; the global model is unchanged", server_round)
            return None, None
        # fixed order (client id, then node id): the fused parameters do not depend on arrival order
        accepted.sort(key=lambda u: (u.client, u.node_id or 0))
        q = quality_factors(accepted, self.fusion, floor=self.quality_floor)
        w = fusion_weights(accepted, self.fusion, floor=self.quality_floor)
        fused = fuse(accepted, w, reference)
        out.clients = summarize_weights(accepted, w, q)
        for row, u in zip(out.clients, accepted):
            row["node"] = u.node_id
        out.fused = True
        agg: Dict[str, float] = {"num-examples": float(sum(u.num_examples for u in accepted)),
                                 "clients-fused": float(len(accepted))}
        for k in ("mean_steps", "converged_fraction", "mean_residual", "state_error", "val_accuracy"):
            vals = [(u.num_examples, u.stats[k]) for u in accepted if k in u.stats]
            if vals:
                agg[k] = sum(n * v for n, v in vals) / sum(n for n, _ in vals)
        return ArrayRecord(fused), MetricRecord(agg)

    def note_timeouts(self, server_round: int, replied_nodes: Iterable[int],
                      known_clients: Optional[Dict[int, int]] = None, timeout: float = math.nan) -> None:
        """Record the nodes that were sent the model but did not answer in time as dropped."""
        out = self.last_round
        if out is None or out.server_round != server_round:
            return
        got = set(int(n) for n in replied_nodes)
        for n in out.sent_to:
            if n not in got:
                out.dropped.append({"node": n, "client": (known_clients or {}).get(n),
                                    "reason": f"no reply within {timeout:g} s (timed out)"})
                logger.warning("round %d: node %d dropped (timed out)", server_round, n)

    # -- evaluation: central, by the server loop -----------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No client-side evaluation: the server loop evaluates the global model itself."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """None: there is no client-side evaluation to aggregate."""
        return None
