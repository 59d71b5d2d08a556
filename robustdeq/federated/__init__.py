"""Federated training of deep equilibrium models on Flower (``flwr``), with robust evaluation.

Deep equilibrium models suit federated learning (Gkillas, Ampeliotis, Berberidis, "Deep
Equilibrium Models Meet Federated Learning", EUSIPCO 2023, arXiv:2305.18646): a DEQ's parameters
are those of one layer, so the uplink is small, and every edge device can run as many fixed-point
iterations as it can afford, so one model serves devices of very different compute. The server
fuses the client models with a weighted average that accounts for the different quality of models
coming from heterogeneous devices.

What this package provides (Flower's Message API: ``ClientApp``, ``ServerApp``, a ``Strategy``):

- clients (:mod:`.apps`, :mod:`.local`) holding a shard of a dataset (IID or Dirichlet(alpha)
  label skew, :mod:`.partition`), their own solver budget (solver, max iterations, tolerance) and
  any robustdeq training recipe as local objective (cross-entropy, PGD-AT, TRADES, random
  intermediate states, JIIO-AT, LyaDEQ); each reports n_k, its solver statistics (mean
  iterations, converged fraction, final residual) and its local validation accuracy;
- a strategy (:class:`.strategy.DEQFusion`) with pluggable fusion weights (:mod:`.fusion`) that
  drops clients that fail or time out and rejects NaN/inf or wrongly shaped updates;
- a server loop (:mod:`.server`) evaluating the global model after every round with
  :func:`robustdeq.eval.evaluate`, logging to TensorBoard and checkpointing every round
  (resumable);
- :func:`federate` (Flower's simulation engine) and :func:`write_flower_app` (a Flower App for a
  deployment with a SuperLink and SuperNodes).

The quality-weighted rule
-------------------------
``w_k = n_k q_k / sum_j n_j q_j`` with ``q_k = max(q_min, min(1, sqrt(tol_k / r_k)))``, where
``r_k`` is the mean final fixed-point residual of client k's locally trained model on its own
validation samples, solved with its own budget, and ``tol_k`` the tolerance it aimed at.

Why: the paper's rule weighs clients by the quality of their models, which in a DEQ is decided by
how close the client got to the fixed point. A client whose budget stops the solver early trains
on truncated states: its forward pass is not the equilibrium the implicit gradient assumes, so
its update is biased. The achieved residual measures this directly (the budget only bounds it,
and a contractive layer may converge within a small budget, in which case the client is not
penalised). A client that reached its tolerance gets q_k = 1; one ten times above it 0.32 and one
a hundred times above it 0.1 (the square root softens the orders of magnitude residuals span, so
that a slow client still contributes its data); ``q_min`` (default 0.05) keeps every reporting
client in the average. With equal residual quality the rule is exactly FedAvg, and one client
gives back its own parameters. The exact rule of the paper was not available to us; this is our
instance of its principle (``fusion="accuracy"`` uses the local validation accuracy instead, and
any callable can be given).

Flower is an optional dependency (the ``federated`` extra, imported lazily): without it, using
:func:`federate` raises :class:`MissingExtraError`; ``import robustdeq`` never imports Flower.
"""
from __future__ import annotations

from ._flwr import INSTALL_HINT, MissingExtraError, require_flwr
from .config import FederatedConfig, client_budget, parse_budgets, parse_partition
from .fusion import ClientUpdate, check_update, fuse, fusion_weights, quality_factors
from .partition import partition_indices

__all__ = ["FederatedConfig", "client_budget", "parse_budgets", "parse_partition", "ClientUpdate",
           "check_update", "fuse", "fusion_weights", "quality_factors", "partition_indices",
           "MissingExtraError", "require_flwr", "INSTALL_HINT", "federate", "write_flower_app",
           "train_client"]


def __getattr__(name):  # lazy: these import Flower or the training stack
    if name in ("federate", "write_flower_app"):
        from . import run
        return getattr(run, name)
    if name == "train_client":
        from .local import train_client
        return train_client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
