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
``w_k = n_k q_k / sum_j n_j q_j`` with ``q_k = max(q_min, 1 - e_k)``, where ``e_k`` is client k's
estimated distance from the equilibrium (:func:`.local.state_error`): on its validation samples,
solved with its own budget, ``e_k = mean_i max(0, r_i - tol_k) / (1 - rho_i)``, with ``r_i`` the
final relative residual, ``tol_k`` the tolerance it aimed at and ``rho_i`` the solver's observed
rate of convergence (``(r_s / r_0)^(1/s)``).

Why: the paper's rule weighs clients by the quality of their models, which in a DEQ is decided by
how close the client's forward passes got to the fixed point. A client whose budget stops the
solver early trains on truncated states: its forward pass is not the equilibrium the implicit
gradient assumes, so its update is biased, to first order in the distance ``||z_K - z*||``. For
an iteration converging linearly at rate ``rho``, ``||z_K - z*|| ~ ||f(z_K) - z_K|| / (1 - rho)``
(the geometric tail of the remaining steps), relative to the state when the residual is
relative. Checked against equilibria solved to 1e-12 (``tests/federated/test_federated.py``, spectral
norm 0.5 and 0.9, 2-8 iterations), it bounds the true distance from above within a factor 2.5.
``1 - e_k`` discounts the client's update by that relative error (a first-order model: the bias
of the update grows in proportion to it, with a constant of order one that we do not estimate).
It does not depend on the tolerance the user picked (only the error beyond it counts), and a
client that reached its tolerance gets ``q_k = 1`` (the budget only bounds the error: a
contractive layer that converges within a small budget is not penalised). ``q_min`` (default 0.05) keeps every reporting client in
the average. With equal quality the rule is exactly FedAvg, and one client gives back its own
parameters. The exact rule of the paper was not available to us; this is our instance of its
principle.

A client with a small budget (a few Anderson iterations) typically stops at a residual well above
the tolerance but converges at a good rate, so ``e_k`` is small and ``q_k`` near 1: its update is
mostly right. The tolerance rule
``q_k = sqrt(tol_k / r_k)`` (``fusion="tolerance"``, kept for comparison) weighs the residual
against the tolerance instead of against the state and gives those clients small weights; under
label skew that removes much of their labels from the average. With 1-iteration clients (solver
output = initial state, ``e_k = 1``) the quality rule weighs them down to ``q_min`` and can be
*less* accurate than FedAvg: they still train the input injection and the head, which the
first-order model does not credit. FedAvg stays the default (``FederatedConfig.fusion``).
``fusion="accuracy"`` uses the local validation accuracy instead, and any callable can be given.

After every fusion the power-iteration buffers of spectral normalisations are recomputed for the
fused weights (:func:`.fusion.refresh_spectral_norms`): their plain average is not the singular
pair of the averaged weight and left the fused DEQ layer far from a contraction.

Flower is an optional dependency (the ``federated`` extra, imported lazily): without it, using
:func:`federate` raises :class:`MissingExtraError`; ``import robustdeq`` never imports Flower.
"""
from __future__ import annotations

from ._flwr import INSTALL_HINT, MissingExtraError, require_flwr
from .config import FederatedConfig, client_budget, parse_budgets, parse_partition
from .fusion import (ClientUpdate, check_update, fuse, fusion_weights, quality_factors,
                     refresh_spectral_norms)
from .partition import partition_indices

__all__ = ["FederatedConfig", "client_budget", "parse_budgets", "parse_partition", "ClientUpdate",
           "check_update", "fuse", "fusion_weights", "quality_factors", "refresh_spectral_norms",
           "partition_indices",
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
