"""The server's round loop (runs inside a Flower ``ServerApp``): send, fuse, evaluate, checkpoint.

Round t: the strategy (:class:`~robustdeq.federated.strategy.DEQFusion`) sends the global model
and the run's config to every node and fuses the accepted replies; nodes that do not answer within
``client_timeout`` are dropped from the round. The power-iteration buffers of spectral norms are
then recomputed for the fused weights (:func:`~robustdeq.federated.fusion.refresh_spectral_norms`).
The new global model is evaluated with the robustdeq harness (clean accuracy on the test split,
and the chosen suite on ``eval_samples`` test samples, on ``cfg.device``), the round is logged to TensorBoard (``out_dir/tb``), and a checkpoint
(``out_dir/checkpoint.pt``: global weights, round, history, config hash; atomic, loadable with
``weights_only=True``) plus ``summary.json``, ``report.md`` and ``accuracy.png`` are written. A
later run on the same ``out_dir`` with the same settings continues after the last completed
round and ends with the same parameters as an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from ..errors import CheckpointError, TrainingError
from .config import FederatedConfig, client_budget, config_hash, resolve_device
from .fusion import refresh_spectral_norms
from .local import build_model, check_shards, model_config, transferable_state

logger = logging.getLogger(__name__)

__all__ = ["run_rounds", "FederatedResult", "evaluate_global"]


@dataclass
class FederatedResult:
    """What a run returns: the final global weights and one record per completed round."""

    state: Dict[str, torch.Tensor]
    rounds: List[Dict[str, Any]]
    summary: Dict[str, Any] = field(default_factory=dict)
    out_dir: Optional[Path] = None

    @property
    def final(self) -> Dict[str, Any]:
        """The record of the last completed round (``{}`` when none completed)."""
        return self.rounds[-1] if self.rounds else {}


def _test_data(cfg: FederatedConfig):
    from ..data import load_dataset
    return load_dataset(cfg.dataset, "test", root=cfg.data_root)


def evaluate_global(model: torch.nn.Module, cfg: FederatedConfig, x, y) -> Dict[str, Any]:
    """Clean accuracy (whole test split) and robust accuracy (``cfg.eval_suite`` on the first
    ``cfg.eval_samples`` test samples) of the global model; the model is not modified."""
    from ..train import evaluate_clean
    ev = evaluate_clean(model, x, y)
    out: Dict[str, Any] = {"accuracy": ev["accuracy"], "robust_accuracy": None, "robust_samples": 0}
    for k in ("mean_steps", "converged_fraction", "mean_residual"):
        if k in ev:
            out[f"server_{k}"] = ev[k]
    if cfg.eval_suite != "none":
        from ..eval import evaluate
        n = x.shape[0] if cfg.eval_samples == 0 else min(cfg.eval_samples, x.shape[0])
        rep = evaluate(model, x[:n], y[:n], threat=cfg.eval_threat, eps=cfg.eval_eps,
                       suite=cfg.eval_suite, steps=cfg.eval_steps, seed=cfg.seed, checks=False)
        out["robust_accuracy"] = rep.results[0].robust_accuracy
        out["robust_subset_clean_accuracy"] = rep.clean_accuracy
        out["robust_samples"] = n
    return out


def _load_resume(path: Path, cfg: FederatedConfig):
    from ..checkpoint import load_checkpoint
    ck = load_checkpoint(path)
    extra = ck.extra_state or {}
    if extra.get("config_hash") != config_hash(cfg):
        raise CheckpointError(
            f"{path} belongs to a federated run with different settings (config hash "
            f"{extra.get('config_hash')!r}, this run {config_hash(cfg)!r}); use another output "
            "folder or resume=False")
    done = int(extra.get("round", 0))
    if done > cfg.rounds:  # its global model is trained past what is asked
        raise CheckpointError(
            f"{path} holds a federated run of {done} rounds, more than the {cfg.rounds} asked for; "
            f"use another out_dir, resume=False to overwrite it, or rounds >= {done}")
    return ck.state_dict, done, json.loads(extra.get("history", "[]"))


def _fail_round(r: int, outcome, history, summary, out: Optional[Path], seconds: float) -> None:
    """A round in which no client's update was fused: record it in the reports (not in the
    checkpoint, which keeps the last fused round, so a rerun resumes from there) and stop the run
    with an error naming every client's reason."""
    from .report import one_line, write_outputs
    rows = list(outcome.dropped) + list(outcome.rejected)
    why = "; ".join(f"client {c['client']}" if c.get("client") is not None else f"node {c.get('node')}"
                    for c in rows)
    reasons = "; ".join((f"client {c['client']}" if c.get("client") is not None else f"node {c.get('node')}")
                        + f": {one_line(c.get('reason', ''))}" for c in rows) or "no client replied"
    rec = {"round": r, "accuracy": None, "robust_accuracy": None, "bytes_up": int(outcome.bytes_up),
           "bytes_down": int(outcome.bytes_down), "clients_sent": len(outcome.sent_to),
           "clients_fused": 0, "clients_dropped": outcome.dropped, "clients_rejected": outcome.rejected,
           "fused": False, "clients": [], "train_seconds": seconds, "seconds": seconds}
    if out is not None:
        write_outputs(out, {**summary, "rounds": history + [rec], "failed_round": r})
    trained = any(h.get("fused") for h in history)
    state = ("the global model keeps round %d's fused parameters (checkpoint.pt); a rerun resumes "
             "after it" % history[-1]["round"]) if trained else \
        "the global model was never updated and no checkpoint was written"
    logger.error("round %d: no client update fused (%s)", r, why or "no replies")
    raise TrainingError(f"federated round {r} failed: no client's update was fused ({reasons}); {state}")


def run_rounds(grid, cfg: FederatedConfig, out_dir: Union[str, Path, None] = None, *,
               strategy=None, progress: bool = False, resume: bool = True,
               on_round_end: Optional[Callable[[Dict[str, Any]], None]] = None,
               node_wait: float = 120.0) -> FederatedResult:
    """Run ``cfg.rounds`` rounds of federated training on the Flower ``grid``.

    Args:
        grid: the ``Grid`` a ``ServerApp`` receives (simulation or deployment).
        cfg: the run's settings. out_dir: folder of the checkpoint and outputs (``None``: memory).
        strategy: a :class:`~robustdeq.federated.strategy.DEQFusion` (default: built from ``cfg``).
        progress: tqdm bar over rounds. resume: continue from ``out_dir/checkpoint.pt``.
        on_round_end: called with each round's record after its checkpoint is written.
        node_wait: seconds to wait for ``cfg.clients`` nodes to connect.
    """
    from .. import runlock
    with runlock.hold(out_dir):  # one run per output folder (a deployed server included)
        return _run_rounds(grid, cfg, out_dir, strategy=strategy, progress=progress, resume=resume,
                           on_round_end=on_round_end, node_wait=node_wait)


def _run_rounds(grid, cfg: FederatedConfig, out_dir, *, strategy, progress, resume, on_round_end,
                node_wait) -> FederatedResult:
    from flwr.app import ArrayRecord, ConfigRecord
    from .plugins import REGISTRATIONS_KEY, user_registrations
    from .strategy import CONFIG_KEY, DEQFusion

    out = Path(out_dir) if out_dir is not None else None
    if strategy is None:
        strategy = DEQFusion(cfg.fusion, quality_floor=cfg.quality_floor, min_nodes=cfg.clients,
                             node_wait=node_wait)
    strategy.config[CONFIG_KEY] = cfg.to_json()
    # user registrations travel to the clients (or the run is refused now, before round 1)
    strategy.config[REGISTRATIONS_KEY] = user_registrations(cfg)
    check_shards(cfg)  # every client has training samples (known before round 1)
    device = resolve_device(cfg.device)  # a device this machine lacks: refused before round 1
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    mcfg = model_config(cfg)
    state = transferable_state(model)
    model.to(device)  # the per-round evaluation runs there; states and checkpoints stay on the CPU
    history: List[Dict[str, Any]] = []
    start = 1
    ck_path = out / "checkpoint.pt" if out is not None else None
    resumed_from = 0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and ck_path.exists():
            state, done, history = _load_resume(ck_path, cfg)
            history = history[:done]
            start, resumed_from = done + 1, done
            logger.info("resuming the federated run in %s after round %d", out, done)
    x_test, y_test = _test_data(cfg)
    n_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    model_bytes = int(ArrayRecord(state).count_bytes())
    summary: Dict[str, Any] = {
        "config": cfg.to_dict(), "config_hash": config_hash(cfg), "model": mcfg,
        "model_parameters": int(n_params), "model_bytes": model_bytes,
        "client_budgets": {str(k): client_budget(cfg, k) for k in range(cfg.clients)},
        "test_samples": int(x_test.shape[0]), "resumed_from": resumed_from, "rounds": history,
    }
    writer = None
    if out is not None:
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run hides the events a killed one logged for rounds it redoes (all are per round)
        writer = SummaryWriter(str(out / "tb"), purge_step=start if start > 1 else None)
    known_clients: Dict[int, int] = {}
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.rounds, initial=start - 1, desc="federated rounds", disable=not progress)
    try:
        for r in range(start, cfg.rounds + 1):
            t0 = time.perf_counter()
            arrays = ArrayRecord(state)
            messages = list(strategy.configure_train(r, arrays, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(messages, timeout=cfg.client_timeout))
            new_arrays, _ = strategy.aggregate_train(r, replies)
            strategy.note_timeouts(r, [m.metadata.src_node_id for m in replies], known_clients,
                                   cfg.client_timeout)
            outcome = strategy.last_round
            for c in outcome.clients:
                known_clients[int(c["node"])] = int(c["client"])
            if new_arrays is None:
                _fail_round(r, outcome, history, summary, out, time.perf_counter() - t0)
            if new_arrays is not None:
                state = {k: v.clone() for k, v in new_arrays.to_torch_state_dict().items()}
                model.load_state_dict(state, strict=True)
                # the averaged power-iteration buffers of spectral norms are not those of the
                # averaged weight: recompute them, so the fused DEQ layer is a contraction again
                if refresh_spectral_norms(model):
                    state = transferable_state(model)
            model.load_state_dict(state, strict=True)
            t_train = time.perf_counter() - t0
            ev = evaluate_global(model, cfg, x_test, y_test)
            rec = {"round": r, **ev, "bytes_up": int(outcome.bytes_up),
                   "bytes_down": int(outcome.bytes_down), "clients_sent": len(outcome.sent_to),
                   "clients_fused": len(outcome.clients), "clients_dropped": outcome.dropped,
                   "clients_rejected": outcome.rejected, "fused": outcome.fused,
                   "clients": outcome.clients, "train_seconds": t_train,
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            summary["robust_samples"] = ev["robust_samples"]
            if writer is not None:
                for k in ("accuracy", "robust_accuracy", "bytes_up", "bytes_down", "clients_fused"):
                    if rec.get(k) is not None:
                        writer.add_scalar(f"round/{k}", float(rec[k]), r)
                writer.add_scalar("round/clients_dropped", len(outcome.dropped) + len(outcome.rejected), r)
                for c in outcome.clients:
                    for k in ("mean_residual", "state_error", "mean_steps", "val_accuracy", "weight"):
                        if k in c:
                            writer.add_scalar(f"client_{c['client']}/{k}", float(c[k]), r)
                writer.flush()
            if out is not None:
                from ..checkpoint import save_checkpoint
                from .report import write_outputs
                # the reports first, the checkpoint last: a run killed in between redoes the round
                # and rewrites them (the other way round, a rerun finding the last round's
                # checkpoint would have nothing to do and leave the reports a round behind)
                write_outputs(out, summary)
                save_checkpoint(ck_path, state, model_config=mcfg,
                                metadata={"dataset": cfg.dataset, "federated": True, "round": r,
                                          "metrics": {"accuracy": ev["accuracy"],
                                                      "robust_accuracy": ev["robust_accuracy"]}},
                                extra_state={"round": r, "history": json.dumps(history, default=float),
                                             "config_hash": config_hash(cfg), "config": cfg.to_json()})
            logger.info("round %d: accuracy %.4f robust %s fused %d dropped %d rejected %d",
                        r, ev["accuracy"], ev["robust_accuracy"], len(outcome.clients),
                        len(outcome.dropped), len(outcome.rejected))
            bar.update(1)
            bar.set_postfix(acc=f"{ev['accuracy']:.3f}",
                            robust="n/a" if ev["robust_accuracy"] is None else f"{ev['robust_accuracy']:.3f}")
            if on_round_end is not None:
                on_round_end(rec)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return FederatedResult(state=state, rounds=history, summary=summary, out_dir=out)
