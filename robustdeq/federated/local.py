"""What one client does in a round, without Flower: load its shard, train, measure, report.

:func:`train_client` is called by the ``ClientApp`` (:mod:`robustdeq.federated.apps`) and can be
called directly. Everything is derived from the run's :class:`FederatedConfig`, the client id and
the round, so that a client's update is reproducible (the same seeds give the same parameters in
the simulation engine, in a deployment and after a resumed run).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .config import FederatedConfig, client_budget, resolve_device
from .partition import partition_indices, split_validation

logger = logging.getLogger(__name__)

__all__ = ["ClientData", "ClientResult", "client_data", "check_shards", "build_model", "model_config",
           "train_client", "derive_seed", "seed_objectives", "transferable_state", "state_error"]

_MAX_RATE = 0.99  # cap of the estimated contraction rate (the error estimate is then <= 100 r)


def derive_seed(*parts) -> int:
    """A 31-bit seed derived from ``parts`` (stable across processes and Python versions)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def seed_objectives(objective, server_round: int, client: int) -> None:
    """Give each seeded objective (``seed`` set, e.g. ``defense_options={"seed": 7}``), and each
    objective it wraps through ``base``, its own random stream for client ``client`` in round
    ``server_round``: its generator restarts from ``derive_seed(seed, "objective", server_round,
    client)``. The recipe is built afresh every round, so without this every round (and every
    client) drew the same attack starts and sampled states from ``seed`` itself; derived from the
    seed, the client and the round only, the draws of a round are those of an uninterrupted run
    after a resume. Objectives without a seed draw from torch's global generator, which the
    client's trainer seeds per (client, round)."""
    seen = set()
    obj = objective
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        seed = getattr(obj, "seed", None)
        if seed is not None and callable(getattr(obj, "reseed_generator", None)):
            obj.reseed_generator(derive_seed(int(seed), "objective", int(server_round), int(client)))
        obj = getattr(obj, "base", None)


@dataclass
class ClientData:
    """A client's shard: its training samples and its local validation samples (None without
    a validation share)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Optional[Tensor]
    y_val: Optional[Tensor]


@functools.lru_cache(maxsize=4)
def _train_split(dataset: str, root: Optional[str]) -> Tuple[Tensor, Tensor]:
    from ..data import load_dataset
    return load_dataset(dataset, "train", root=root)


def client_data(cfg: FederatedConfig, client: int, num_clients: Optional[int] = None) -> ClientData:
    """The shard of client ``client`` (train part and local validation part)."""
    k = cfg.clients if num_clients is None else int(num_clients)
    if not 0 <= client < k:
        raise ConfigError(f"client id {client} outside 0..{k - 1}")
    x, y = _train_split(cfg.dataset, cfg.data_root)
    parts = partition_indices(y.numpy(), k, cfg.partition, seed=cfg.seed,
                              min_size=cfg.min_client_samples)
    tr, va = split_validation(parts[client], cfg.val_fraction, seed=derive_seed(cfg.seed, "val", client))
    tr_t = torch.from_numpy(tr)
    if va is None:
        return ClientData(x[tr_t], y[tr_t], None, None)
    va_t = torch.from_numpy(va)
    return ClientData(x[tr_t], y[tr_t], x[va_t], y[va_t])


def check_shards(cfg: FederatedConfig) -> None:
    """Raise ``ConfigError`` now if some client would get no training samples (more clients than
    samples, a too-small Dirichlet share, or a shard used up by its validation part)."""
    x, y = _train_split(cfg.dataset, cfg.data_root)
    if y.shape[0] < cfg.clients:
        raise ConfigError(f"{cfg.clients} clients but the {cfg.dataset} training split has "
                          f"{y.shape[0]} samples: every client needs at least one")
    parts = partition_indices(y.numpy(), cfg.clients, cfg.partition, seed=cfg.seed,
                              min_size=cfg.min_client_samples)
    for k, part in enumerate(parts):
        tr, _ = split_validation(part, cfg.val_fraction, seed=derive_seed(cfg.seed, "val", k))
        if len(tr) < 1:
            raise ConfigError(f"client {k} has {len(part)} samples and keeps none for training after "
                              f"its validation share ({cfg.val_fraction:g}); use fewer clients or a "
                              "smaller val_fraction")


def model_config(cfg: FederatedConfig, *, budget: Optional[int] = None, solver: Optional[str] = None,
                 tol: Optional[float] = None) -> dict:
    """``{"name", "options"}`` of the model; with ``budget`` the solver (and the implicit
    gradient's adjoint solver, also one set in ``model_options``' ``grad_options``) is capped at
    ``budget`` iterations."""
    from ..data import dataset_info
    info = dataset_info(cfg.dataset)
    name = cfg.recipe_model
    opts = {"in_shape": list(info["shape"]), "num_classes": info["num_classes"], **cfg.model_options}
    if budget is not None and _has_solver(name, json.dumps(opts, sort_keys=True)):
        opts["solver"] = {"name": solver or cfg.solver, "max_iter": int(budget),
                          "tol": float(cfg.tol if tol is None else tol)}
        if opts.get("grad", "ift") == "ift":
            # the budget caps the adjoint solve too, whatever adjoint solver the options name
            gopts = dict(opts.get("grad_options") or {})
            given = gopts.get("solver")
            if given:  # the adjoint solver's own max_iter (its default when not set), capped
                from ..config import SolverConfig, from_dict
                adj = dict(given)
                adj["max_iter"] = min(int(from_dict(SolverConfig, adj).max_iter), int(budget))
            else:
                adj = {"max_iter": int(budget), "tol": 1e-6}
            opts["grad_options"] = {**gopts, "solver": adj}
    return {"name": name, "options": opts}


@functools.lru_cache(maxsize=16)
def _has_solver(name: str, options_json: str) -> bool:
    """Whether the zoo model ``name`` is a DEQ with a solver (and a gradient estimator option)."""
    from ..deq import zoo
    from ..deq.model import DEQClassifier
    return isinstance(zoo.build(name, **json.loads(options_json)), DEQClassifier)


def build_model(cfg: FederatedConfig, **budget) -> nn.Module:
    """A fresh model built from the zoo as :func:`model_config` describes it (``budget``,
    ``solver``, ``tol``: a client's solver budget)."""
    from ..deq import zoo
    mc = model_config(cfg, **budget)
    return zoo.build(mc["name"], **mc["options"])


def transferable_state(model: nn.Module) -> Dict[str, Tensor]:
    """The tensors a client and the server exchange: the whole state dict, detached, on CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def state_error(model: nn.Module, x: Tensor, tol: float, batch_size: int = 256) -> Dict[str, float]:
    """Estimated distance of the model's solver output from the true equilibrium, on ``x``.

    For every sample the solver's residual history ``r_0, ..., r_s`` (relative residuals, as the
    solver measures them) gives its observed rate of convergence ``rho = (r_s / r_0)^(1/s)``
    (capped at 0.99); for an iteration that converges linearly at rate ``rho`` the remaining
    distance to the limit is about ``r_s / (1 - rho)`` (the geometric tail of the remaining
    steps), relative to the state. ``state_error`` is the mean over samples of
    ``max(0, r_s - tol) / (1 - rho)``: the error beyond the tolerance the solve aimed at, i.e.
    how far from the equilibrium the states the client trained on and its implicit gradient
    assumed were. 0 for a model without a solver (nothing to converge) and for samples that
    reached ``tol``.

    Returns ``{"state_error", "contraction"}`` (``contraction``: the mean of ``rho``).
    """
    if not hasattr(model, "run") or x.shape[0] == 0:
        return {"state_error": 0.0, "contraction": 0.0}
    was = {m: m.training for m in model.modules()}
    model.eval()
    errs, rates = [], []
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size]
                p = next(iter(model.parameters()), None)
                eq = model.run(xb if p is None else xb.to(p.device), record="all")
                steps = [t.step for t in eq.trajectory]
                if not steps:
                    continue
                res = torch.stack([t.residual.double().cpu() for t in eq.trajectory])  # (K, B)
                step = torch.tensor(steps, dtype=torch.float64)
                seen = torch.isfinite(res)
                # r_0: the first evaluated residual; r_s: the lowest one (the iterate a solver
                # with select="best" returns; the last one for a monotone solve)
                i0 = seen.double().argmax(0)
                r0 = res.gather(0, i0.unsqueeze(0)).squeeze(0)
                ib = torch.where(seen, res, torch.inf).argmin(0)
                rs = res.gather(0, ib.unsqueeze(0)).squeeze(0)
                span = step[ib] - step[i0]
                ratio = rs.clamp_min(1e-300) / r0.clamp_min(1e-300)
                rho = torch.where((span > 0) & (r0 > 0), ratio ** (1.0 / span.clamp_min(1.0)),
                                  torch.zeros_like(rs)).clamp(0.0, _MAX_RATE)
                errs.append((rs - float(tol)).clamp_min(0.0) / (1.0 - rho))
                rates.append(rho)
    finally:
        for m, t in was.items():
            m.training = t
    if not errs:
        return {"state_error": 0.0, "contraction": 0.0}
    e, r = torch.cat(errs), torch.cat(rates)
    return {"state_error": float(e.mean()), "contraction": float(r.mean())}


@dataclass
class ClientResult:
    """What :func:`train_client` returns: the client's id, its number of training samples, its
    trained state (on the CPU) and the metrics it reports to the server."""

    client: int
    num_examples: int
    state: Dict[str, Tensor]
    metrics: Dict[str, float]


def _apply_fault(kind: str, state: Dict[str, Tensor], cfg: FederatedConfig) -> Dict[str, Tensor]:
    """Deliberate misbehaviour (``FederatedConfig.faults``) to exercise the server's checks."""
    if kind == "raise":
        raise RuntimeError("injected client fault: the client crashed during local training")
    if kind == "hang":
        logger.warning("injected client fault: sleeping %.0f s (past the round timeout)",
                       cfg.client_timeout + 2)
        time.sleep(cfg.client_timeout + 2)
        return state
    state = dict(state)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    bad = state[key].clone()
    if kind in ("nan", "inf"):
        bad.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
        state[key] = bad
    elif kind == "shape":
        state[key] = bad.reshape(-1)[:-1].clone()
    return state


def train_client(cfg: FederatedConfig, client: int, global_state: Dict[str, Tensor], server_round: int,
                 *, num_clients: Optional[int] = None, budget: Optional[int] = None,
                 solver: Optional[str] = None, tol: Optional[float] = None) -> ClientResult:
    """Local training of client ``client`` in round ``server_round`` from ``global_state``.

    The client trains ``cfg.local_epochs`` epochs with the recipe ``cfg.defense`` and its own
    solver budget (``budget``, default ``client_budget(cfg, client)``) on ``cfg.device``
    (:func:`~robustdeq.federated.config.resolve_device`), then measures its model on its
    validation samples with that same budget; the returned state is on the CPU.

    Returns:
        :class:`ClientResult` with ``metrics``: ``client``, ``num_examples``, ``budget``, ``tol``,
        ``mean_steps``, ``converged_fraction``, ``mean_residual`` (final residual), ``max_residual``,
        ``val_accuracy``, ``state_error`` and ``contraction`` (:func:`state_error`),
        ``train_loss``, ``train_seconds``.
    """
    from ..defenses.recipes import recipe
    from ..train import Trainer, evaluate_clean

    budget = client_budget(cfg, client) if budget is None else int(budget)
    if budget < 1:
        raise ConfigError(f"client {client}: solver budget must be >= 1, got {budget}")
    tol = cfg.tol if tol is None else float(tol)
    data = client_data(cfg, client, num_clients)
    model = build_model(cfg, budget=budget, solver=solver, tol=tol)
    missing = set(model.state_dict()) ^ set(global_state)
    if missing:
        raise ConfigError(f"client {client}: the global model's tensors do not match the local "
                          f"architecture ({sorted(missing)[:5]})")
    model.load_state_dict(global_state, strict=True)
    rec = recipe(cfg.defense, **dict(cfg.defense_options))
    seed_objectives(rec.objective, server_round, client)  # a seeded objective: its own stream per round
    seed = derive_seed(cfg.seed, "train", server_round, client)
    train_cfg = {"epochs": cfg.local_epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                 "optimizer": cfg.optimizer, "schedule": "constant", "seed": seed,
                 "device": str(resolve_device(cfg.device))}  # the update still travels on the CPU
    t0 = time.perf_counter()
    hist = Trainer(model, rec.objective, train_cfg, out_dir=None, tensorboard=False).fit(
        data.x_train, data.y_train, resume=False)
    seconds = time.perf_counter() - t0
    x_val, y_val = (data.x_val, data.y_val) if data.x_val is not None else (data.x_train, data.y_train)
    ev = evaluate_clean(model, x_val, y_val)
    err = state_error(model, x_val, tol)
    metrics = {
        "client": float(client), "num_examples": float(data.x_train.shape[0]), "budget": float(budget),
        "tol": float(tol), "mean_steps": float(ev.get("mean_steps", 0.0)),
        "converged_fraction": float(ev.get("converged_fraction", 1.0)),
        "mean_residual": float(ev.get("mean_residual", 0.0)),
        "max_residual": float(ev.get("max_residual", 0.0)),
        "val_accuracy": float(ev["accuracy"]),
        "state_error": err["state_error"], "contraction": err["contraction"],
        "train_loss": float(hist[-1].get("loss", math.nan)) if hist else math.nan,
        "train_seconds": seconds,
    }
    state = transferable_state(model)
    fault = cfg.faults.get(str(client))
    if fault is not None:
        state = _apply_fault(fault, state, cfg)
    logger.info("client %d round %d: n=%d budget=%d val_acc=%.3f residual=%.2e steps=%.1f",
                client, server_round, data.x_train.shape[0], budget, metrics["val_accuracy"],
                metrics["mean_residual"], metrics["mean_steps"])
    return ClientResult(client, int(data.x_train.shape[0]), state, metrics)
