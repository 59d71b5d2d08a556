"""One trainer for every objective: standard, adversarial (PGD-AT, TRADES, random intermediate
states, JIIO-AT; see :mod:`robustdeq.defenses.objectives`, which also owns the Jacobian
regularisation option) or any callable ``objective(model, x, y) -> (loss, scalars)``.

It logs scalars to TensorBoard, shows tqdm progress when asked, evaluates clean accuracy and solver
statistics after each epoch, writes a checkpoint every epoch (weights, optimizer, scheduler,
history) atomically, and resumes from it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError, InputError

logger = logging.getLogger(__name__)

Objective = Callable[[nn.Module, Tensor, Tensor], Tuple[Tensor, Dict[str, float]]]


@torch.no_grad()
def evaluate_clean(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> dict:
    """Clean accuracy and mean solver statistics (model put in eval mode, mode restored)."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    correct, stats = 0, []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if hasattr(model, "run"):
                eq = model.run(xb)
                logits = eq.logits
                stats.append((xb.shape[0], eq.stats.summary()))
            else:
                logits = model(xb)
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        for m, t in was.items():
            m.training = t
    out = {"accuracy": correct / max(1, x.shape[0])}
    if stats:
        n = sum(b for b, _ in stats)
        for key in ("mean_steps", "converged_fraction", "mean_residual"):
            out[key] = sum(b * s[key] for b, s in stats) / n
        out["max_residual"] = max(s["max_residual"] for _, s in stats)
    return out


class Trainer:
    """Train ``model`` with ``objective`` (default cross-entropy).

    Args:
        model: any ``nn.Module`` ``x -> logits`` (DEQs, weight-tied and feed-forward models).
        objective: ``objective(model, x, y) -> (loss, scalars)``.
        config: :class:`TrainConfig` or a dict of its options.
        out_dir: folder for ``checkpoint.pt``, ``history.json`` and TensorBoard logs (``tb/``);
            ``None`` keeps everything in memory.
        progress: show tqdm progress bars.
        model_config: how to rebuild the model (defaults to ``model.robustdeq_config``).
    """

    def __init__(self, model: nn.Module, objective: Optional[Objective] = None,
                 config: Union[TrainConfig, dict, None] = None, *, out_dir=None,
                 progress: bool = False, tensorboard: bool = True,
                 model_config: Optional[dict] = None, metadata: Optional[dict] = None):
        self.model = model
        if objective is None:
            from .defenses.objectives import CrossEntropy
            objective = CrossEntropy()
        self.objective = objective
        self.config = from_dict(TrainConfig, config)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.tensorboard = tensorboard
        self.model_config = model_config or getattr(model, "robustdeq_config", None)
        self.metadata = dict(metadata or {})
        self.history: List[dict] = []
        self.start_epoch = 0
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = None  # built in fit(), once the number of steps is known
        self._writer = None

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def _objective_name(self) -> str:
        d = getattr(self.objective, "describe", None)
        return json.dumps(d() if callable(d) else {"name": type(self.objective).__name__}, sort_keys=True, default=str)

    def save(self, epoch: int) -> None:
        from .checkpoint import save_checkpoint
        if self.checkpoint_path is None:
            return
        if self.model_config is None:
            raise CheckpointError("cannot checkpoint a model without model_config (build it with the zoo "
                                  "or pass model_config={'name': ..., 'options': {...}})")
        extra = {"epoch": epoch, "history": json.dumps(self.history),
                 "train_config": json.dumps(to_dict(self.config)), "objective": self._objective_name()}
        if self.scheduler is not None:
            extra["scheduler"] = json.dumps(self.scheduler.state_dict())
        meta = dict(self.metadata)
        if self.history:
            meta["metrics"] = self.history[-1]
        save_checkpoint(self.checkpoint_path, self.model, model_config=self.model_config,
                        metadata=meta, optimizer=self.optimizer, extra_state=extra)

    def _try_resume(self) -> None:
        from .checkpoint import load_checkpoint
        path = self.checkpoint_path
        if path is None or not path.exists():
            return
        ck = load_checkpoint(path)
        extra = ck.extra_state or {}
        if extra.get("train_config") != json.dumps(to_dict(self.config)):
            raise CheckpointError(f"{path} was written with a different training config; "
                                  "use another out_dir or resume=False")
        if extra.get("objective") != self._objective_name():
            raise CheckpointError(f"{path} was written with a different objective; "
                                  "use another out_dir or resume=False")
        self.model.load_state_dict(ck.state_dict)
        if ck.optimizer_state:
            self.optimizer.load_state_dict(ck.optimizer_state)
        if self.scheduler is not None and "scheduler" in extra:
            self.scheduler.load_state_dict(json.loads(extra["scheduler"]))
        self.history = json.loads(extra.get("history", "[]"))
        self.start_epoch = int(extra.get("epoch", -1)) + 1
        logger.info("resumed from %s at epoch %d", path, self.start_epoch)

    # -- logging --------------------------------------------------------------------------------
    def _log(self, tag: str, value: float, step: int) -> None:
        if self._writer is None and self.tensorboard and self.out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out_dir / "tb"))
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    # -- training -------------------------------------------------------------------------------
    def fit(self, x: Tensor, y: Tensor, x_val: Optional[Tensor] = None, y_val: Optional[Tensor] = None,
            *, resume: bool = True) -> List[dict]:
        """Train for ``config.epochs`` epochs (continuing a saved run when ``resume``)."""
        from .data import make_loader, validate_inputs
        validate_inputs(x, expected_shape=getattr(self.model, "input_shape", None), name="x_train")
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.long:
            raise InputError(f"y_train must be int64 of shape ({x.shape[0]},), got {tuple(y.shape)} {y.dtype}")
        cfg = self.config
        steps_per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
        if cfg.schedule == "cosine" and self.scheduler is None:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max(1, cfg.epochs * steps_per_epoch))
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self._try_resume()
        torch.manual_seed(cfg.seed)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=(cfg.epochs - self.start_epoch) * steps_per_epoch, desc="train", leave=False)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                rec = self._epoch(epoch, x, y, bar)
                if x_val is not None:
                    ev = evaluate_clean(self.model, x_val, y_val)
                    rec.update({f"val_{k}": v for k, v in ev.items()})
                self.history.append(rec)
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self._log(f"epoch/{k}", float(v), epoch)
                logger.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
                self.save(epoch)
                if self.out_dir is not None:
                    tmp = self.out_dir / "history.json.tmp"
                    tmp.write_text(json.dumps(self.history, indent=1))
                    os.replace(tmp, self.out_dir / "history.json")
        finally:
            if bar is not None:
                bar.close()
            if self._writer is not None:
                self._writer.flush()
        return self.history

    def _epoch(self, epoch: int, x: Tensor, y: Tensor, bar) -> dict:
        from .data import make_loader
        cfg = self.config
        self.model.train()
        loader = make_loader(x, y, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        sums: Dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(loader):
            self.optimizer.zero_grad(set_to_none=True)
            loss, scalars = self.objective(self.model, xb, yb)
            scalars = dict(scalars)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite training loss at epoch {epoch}, batch {i}")
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            scalars["loss"] = float(loss.detach())
            step = epoch * len(loader) + i
            if i % max(1, cfg.log_every) == 0:
                for k, v in scalars.items():
                    self._log(f"train/{k}", v, step)
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v * xb.shape[0]
            n += xb.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{scalars['loss']:.3f}")
        rec = {"epoch": epoch, "epoch_time_s": time.perf_counter() - t0}
        rec.update({k: v / max(1, n) for k, v in sums.items()})
        return rec


__all__ = ["Trainer", "evaluate_clean"]
