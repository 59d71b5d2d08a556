"""One trainer for every objective: standard, adversarial (PGD-AT, TRADES, random intermediate
states, JIIO-AT; see :mod:`robustdeq.defenses.objectives`, which also owns the Jacobian
regularisation option) or any callable ``objective(model, x, y) -> (loss, scalars)``.

It logs scalars to TensorBoard, shows tqdm progress when asked, evaluates clean accuracy and solver
statistics after each epoch, writes a checkpoint every epoch (weights, optimizer, scheduler,
history) atomically, and resumes from it.

Several processes (``torchrun``, or any initialised process group; :mod:`robustdeq.distributed`):
every epoch draws the same shuffled batches of ``batch_size`` samples as one process would, and
each rank takes a contiguous slice of every batch (a distributed sampler reshuffled per epoch,
with ``batch_size`` the global batch). Each rank runs the objective on its slice (adversarial
examples included, with its own seed: rank 0 keeps ``seed``, the others derive theirs), then one
coalesced all-reduce averages the gradients weighted by the samples per rank, so a step equals the
single-process step on the whole batch. This explicit all-reduce after ``backward`` replaces
``DistributedDataParallel``'s wrapper on purpose: the objectives call the model through
``run``/``solve``/``f``/``readout`` (not ``forward``), run inner attacks with frozen parameters,
take ``autograd.grad`` inside the implicit-backward hook and the Jacobian penalty, and may leave
parameters unused; DDP's reducer is armed by ``forward`` only and would need
``find_unused_parameters``. Here a parameter without a gradient on a rank contributes zeros, and
keeps ``None`` when no rank produced one. Rank 0's floating-point buffers are broadcast after
every step in which they moved on some rank (as DDP's ``broadcast_buffers``; a flag in the
gradient all-reduce says so, so a step costs one collective when they did not, and no step has a
barrier). Rank 0 alone writes the checkpoint, ``history.json`` and TensorBoard and reads the
checkpoint to resume (its weights, optimizer and scheduler state go to the other ranks); the epoch
record (losses, validation accuracy, solver statistics) is reduced over all ranks once per epoch.
Each process should use one torch thread per CPU core it owns (``torchrun`` sets
``OMP_NUM_THREADS=1``; :func:`robustdeq.distributed.init` warns when the processes of a machine
ask for more threads than it has cores).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import TrainConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError, InputError, TrainingError

logger = logging.getLogger(__name__)

Objective = Callable[[nn.Module, Tensor, Tensor], Tuple[Tensor, Dict[str, float]]]


@torch.no_grad()
def evaluate_clean(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> dict:
    """Clean accuracy and mean solver statistics (model put in eval mode, mode restored; the
    batches go to the model's device)."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    correct, stats = 0, []
    first = next(iter(model.parameters()), None)
    dev = first.device if first is not None else x.device
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
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


def _brief(model_config: dict) -> str:
    """``name`` and options of a model config, in a line."""
    opts = model_config.get("options") or {}
    shown = ", ".join(f"{k}={v}" for k, v in sorted(opts.items()) if k not in ("in_shape",))
    return f"{model_config.get('name')!r}" + (f" with {shown}" if shown else "")


class Trainer:
    """Train ``model`` with ``objective`` (default cross-entropy).

    Args:
        model: any ``nn.Module`` ``x -> logits`` (DEQs, weight-tied and feed-forward models).
        objective: ``objective(model, x, y) -> (loss, scalars)``.
        config: :class:`TrainConfig` or a dict of its options.
        out_dir: folder for ``checkpoint.pt``, ``history.json`` and TensorBoard logs (``tb/``);
            ``None`` keeps everything in memory.
        progress: show tqdm progress bars.
        tensorboard: log scalars to TensorBoard under ``out_dir/tb/`` (with an ``out_dir``).
        model_config: how to rebuild the model (defaults to ``model.robustdeq_config``).
        metadata: extra entries of the checkpoint's metadata (e.g. the dataset's name).
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
        self._rng_states: Dict[str, Tensor] = {}  # every rank's generator states, set by fit()

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        """``out_dir/checkpoint.pt``, or None without an ``out_dir``."""
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def _objective_name(self) -> str:
        d = getattr(self.objective, "describe", None)
        return json.dumps(d() if callable(d) else {"name": type(self.objective).__name__}, sort_keys=True, default=str)

    def save(self, epoch: int) -> None:
        """Write the checkpoint of epoch ``epoch`` to :attr:`checkpoint_path` (nothing without an
        ``out_dir``): the model, the optimizer and scheduler states, the history, the training
        settings and the random generators' states, so that :meth:`fit` can resume. :meth:`fit`
        calls it after every epoch; a ``CheckpointError`` without ``model_config``."""
        from .checkpoint import save_checkpoint
        if self.checkpoint_path is None:
            return
        if self.model_config is None:
            raise CheckpointError("cannot checkpoint a model without model_config (build it with the zoo "
                                  "or pass model_config={'name': ..., 'options': {...}})")
        extra = {"epoch": epoch, "history": json.dumps(self.history),
                 "train_config": json.dumps(to_dict(self.config)), "objective": self._objective_name()}
        extra.update(self._rng_states or self._own_rng())  # outside fit(): this process's
        if self.scheduler is not None:
            extra["scheduler"] = json.dumps(self.scheduler.state_dict())
        meta = dict(self.metadata)
        if self.history:
            meta["metrics"] = self.history[-1]
        save_checkpoint(self.checkpoint_path, self.model, model_config=self.model_config,
                        metadata=meta, optimizer=self.optimizer, extra_state=extra)

    # -- random number generators ----------------------------------------------------------------
    def _own_rng(self) -> Dict[str, Tensor]:
        """This process's generator states: torch's global CPU generator (and CUDA's, when used)
        and the private generators of the objective and of the objectives it wraps
        (:meth:`_objective_chain`), where they have one."""
        out = {"rng_torch": torch.get_rng_state()}
        for key, obj in self._objective_chain():
            gen = getattr(obj, "_gen", None)
            if isinstance(gen, torch.Generator):
                out[key] = gen.get_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["rng_cuda"] = torch.cuda.get_rng_state()
        return out

    def _objective_chain(self) -> List[Tuple[str, object]]:
        """``(checkpoint key, objective)`` for the objective and every objective it wraps through
        ``base`` (e.g. :class:`~robustdeq.defenses.lyapunov.LyapunovStability` around PGD-AT):
        ``rng_objective``, ``rng_objective_base``, ... Each may draw from a private generator."""
        out, obj, key, seen = [], self.objective, "rng_objective", set()
        while obj is not None and id(obj) not in seen:
            seen.add(id(obj))
            out.append((key, obj))
            obj, key = getattr(obj, "base", None), key + "_base"
        return out

    def _collect_rng(self) -> None:
        """Every rank's generator states (in rank order), kept for the next checkpoint: a resumed
        run draws the same random numbers (attack starts, sampled states) as an uninterrupted one."""
        own = self._own_rng()
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            self._rng_states = own
            return
        from .distributed import all_gather_object
        states = all_gather_object({k: v.clone() for k, v in own.items()})
        self._rng_states = {f"{k}_rank{r}": v for r, st in enumerate(states) for k, v in st.items()}
        self._rng_states["rng_world"] = len(states)

    def _restore_rng(self, states: Dict[str, Tensor]) -> None:
        ctx = getattr(self, "_ctx", None)
        suffix = ""
        if ctx is not None:
            if states.get("rng_world") != ctx.world_size:
                logger.warning("the checkpoint's random generator states are of %s processes, this run "
                               "has %d: the random draws after the resume differ from an uninterrupted "
                               "run", states.get("rng_world", 1), ctx.world_size)
                return
            suffix = f"_rank{ctx.rank}"
        elif "rng_world" in states:
            logger.warning("the checkpoint's random generator states are of several processes: the "
                           "random draws after the resume differ from an uninterrupted run")
            return
        if f"rng_torch{suffix}" in states:
            torch.set_rng_state(states[f"rng_torch{suffix}"])
        for key, obj in self._objective_chain():
            gen = getattr(obj, "_gen", None)
            if isinstance(gen, torch.Generator) and f"{key}{suffix}" in states:
                gen.set_state(states[f"{key}{suffix}"])
        if f"rng_cuda{suffix}" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states[f"rng_cuda{suffix}"])

    def _try_resume(self) -> None:
        from .checkpoint import load_checkpoint
        path = self.checkpoint_path
        if path is None or not path.exists():
            return
        ck = load_checkpoint(path)
        extra = ck.extra_state or {}
        if self.model_config is not None and ck.model_config != json.loads(json.dumps(self.model_config)):
            raise CheckpointError(
                f"{path} holds a different model ({_brief(ck.model_config)}) than the one being "
                f"trained ({_brief(self.model_config)}); use another out_dir (--out) or "
                "resume=False (--no-resume) to overwrite it")
        try:
            saved = json.loads(extra.get("train_config", "null"))
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path} has no readable training config; use another out_dir or "
                                  "resume=False")
        current = to_dict(self.config)
        differ = sorted(k for k in set(saved) | set(current)
                        if k not in ("epochs", "device") and saved.get(k) != current.get(k))
        if differ:
            raise CheckpointError(
                f"{path} was written with a different training config ("
                + ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differ)
                + "); use another out_dir or resume=False (only epochs may change: a finished run "
                "is extended)")
        if extra.get("objective") != self._objective_name():
            raise CheckpointError(f"{path} was written with a different objective; "
                                  "use another out_dir or resume=False")
        try:
            self.model.load_state_dict(ck.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path} holds weights that do not fit the model being trained "
                f"({str(exc).splitlines()[0][:200]}); use another out_dir (--out) or resume=False "
                "(--no-resume) to overwrite it") from None
        if ck.optimizer_state:
            self.optimizer.load_state_dict(ck.optimizer_state)
        self.history = json.loads(extra.get("history", "[]"))
        self.start_epoch = int(extra.get("epoch", -1)) + 1
        if self.start_epoch > self.config.epochs:  # its model is trained past what is asked
            raise CheckpointError(
                f"{path} holds a run of {self.start_epoch} epochs, more than the {self.config.epochs} "
                f"asked for; use another out_dir (--out), resume=False (--no-resume) to overwrite it, "
                f"or epochs >= {self.start_epoch}")
        if self.scheduler is not None and "scheduler" in extra:
            if int(saved.get("epochs", -1)) == self.config.epochs:
                self.scheduler.load_state_dict(json.loads(extra["scheduler"]))
            elif self.start_epoch < self.config.epochs:
                # more (or fewer) epochs than planned: the cosine restarts from the base learning
                # rate over the remaining epochs (a warm restart, Loshchilov & Hutter, "SGDR",
                # ICLR 2017), which a fresh scheduler over those steps is
                for group in self.optimizer.param_groups:
                    group["lr"] = group.get("initial_lr", self.config.lr)
                self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                    self.optimizer, T_max=max(1, (self.config.epochs - self.start_epoch) * self._steps_per_epoch))
                logger.info("%s: %d epochs planned there, %d now: the cosine schedule restarts for "
                            "epochs %d..%d", path, saved.get("epochs"), self.config.epochs,
                            self.start_epoch, self.config.epochs - 1)
        self._resumed_rng = {k: v for k, v in extra.items() if k.startswith("rng_")}
        logger.info("resumed from %s at epoch %d", path, self.start_epoch)

    # -- logging --------------------------------------------------------------------------------
    def _log(self, tag: str, value: float, step: int) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is not None and not ctx.is_main:  # TensorBoard is written by rank 0 only
            return
        if self._writer is None and self.tensorboard and self.out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            # a resumed run hides the events a killed one logged from its restart on (the steps of
            # the epoch it redoes); the epoch/ tags' steps (epochs) stay below that step
            start = getattr(self, "start_epoch", 0)
            purge = start * self._steps_per_epoch if start > 0 else None
            self._writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge)
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    # -- several processes ----------------------------------------------------------------------
    def _open_out_dir(self, resume: bool) -> None:
        from . import runlock
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"out_dir {self.out_dir} is an existing file; it must name a folder")
        # one run per folder (released when fit returns or raises)
        self._lock = (self.out_dir, runlock.acquire(self.out_dir))
        if resume:
            self._try_resume()

    def _sync_from_main(self, failure: Optional[Exception]) -> None:
        """Rank 0 opened the out_dir and resumed (the other ranks need no shared file system):
        its error, weights, buffers, optimizer/scheduler state and history go to every rank."""
        from .distributed import broadcast_module, broadcast_object
        ctx = self._ctx
        err = broadcast_object(failure if ctx.is_main else None)
        if err is not None:
            raise err
        broadcast_module(self.model)
        resumed = broadcast_object(
            {"start_epoch": self.start_epoch, "history": self.history,
             "optimizer": self.optimizer.state_dict() if self.start_epoch > 0 else None,
             "scheduler": self.scheduler.state_dict() if self.scheduler is not None and self.start_epoch > 0
             else None} if ctx.is_main else None)
        if not ctx.is_main:
            self.start_epoch, self.history = resumed["start_epoch"], resumed["history"]
            if resumed["optimizer"] is not None:
                self.optimizer.load_state_dict(resumed["optimizer"])
            if resumed["scheduler"] is not None and self.scheduler is not None:
                self.scheduler.load_state_dict(resumed["scheduler"])

    def _evaluate_val(self, x_val: Tensor, y_val: Tensor) -> dict:
        """:func:`evaluate_clean`; in a group each rank takes a contiguous shard and the counts
        and solver statistics are reduced over the ranks."""
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            return evaluate_clean(self.model, x_val, y_val)
        from .distributed import reduce_stats, shard_indices
        idx = shard_indices(x_val.shape[0], ctx.rank, ctx.world_size)
        sums: Dict[str, float] = {"n": float(len(idx))}
        if idx:
            part = evaluate_clean(self.model, x_val[idx[0]:idx[-1] + 1], y_val[idx[0]:idx[-1] + 1])
            for k, v in part.items():
                sums[k] = v if k == "max_residual" else v * len(idx)
        tot = reduce_stats(sums, maxima=("max_residual",))
        n = max(1.0, tot.pop("n"))
        return {k: (v if k == "max_residual" else v / n) for k, v in tot.items()}

    def _num_classes(self, x: Tensor) -> Optional[int]:
        """The model's number of classes: its config's ``num_classes``, else the width of its
        logits on one sample (eval mode, no gradient; the mode is restored)."""
        opts = (self.model_config or {}).get("options") or {}
        n = opts.get("num_classes", getattr(self.model, "num_classes", None))
        if isinstance(n, int) and not isinstance(n, bool):
            return int(n)
        from .attacks.base import model_mode
        try:
            with model_mode(self.model, "eval"), torch.no_grad():
                out = self.model(x[:1])
        except Exception:  # noqa: BLE001 - the training itself will report a model that fails
            return None
        return int(out.shape[1]) if isinstance(out, Tensor) and out.dim() == 2 else None

    def _check_labels(self, y: Tensor, name: str, x: Tensor) -> None:
        """InputError for labels outside ``0..num_classes-1`` (cross-entropy would fail with an
        IndexError mid-epoch, or train on garbage on some devices)."""
        if y.numel() == 0:
            return
        lo, hi = int(y.min()), int(y.max())
        n = self._num_classes(x)
        if lo < 0 or (n is not None and hi >= n):
            rng = f"0..{n - 1}" if n is not None else "0 or more"
            raise InputError(f"{name} holds labels outside the class range {rng} (min {lo}, max {hi})")

    # -- training -------------------------------------------------------------------------------
    def fit(self, x: Tensor, y: Tensor, x_val: Optional[Tensor] = None, y_val: Optional[Tensor] = None,
            *, resume: bool = True) -> List[dict]:
        """Train for ``config.epochs`` epochs (continuing a saved run when ``resume``).

        With an ``out_dir``, the process writing it (rank 0) owns the folder while it trains
        (:mod:`robustdeq.runlock`): another run on the same folder is refused meanwhile."""
        from . import runlock
        self._lock = None
        try:
            return self._fit(x, y, x_val, y_val, resume=resume)
        finally:
            if self._lock is not None:
                runlock.release(*self._lock)
                self._lock = None

    def _fit(self, x: Tensor, y: Tensor, x_val: Optional[Tensor], y_val: Optional[Tensor], *,
             resume: bool) -> List[dict]:
        from .data import validate_inputs
        validate_inputs(x, expected_shape=getattr(self.model, "input_shape", None), name="x_train")
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.long:
            raise InputError(f"y_train must be int64 of shape ({x.shape[0]},), got {tuple(y.shape)} {y.dtype}")
        self._check_labels(y, "y_train", x)
        if y_val is not None:
            self._check_labels(y_val, "y_val", x)
        cfg = self.config
        if cfg.device is not None:  # the model, its optimizer state and the data on that device
            dev = torch.device(cfg.device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"device {cfg.device!r}: CUDA is not available on this machine (use 'cpu')")
            if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
                raise ConfigError(f"device {cfg.device!r}: MPS is not available on this machine (use 'cpu')")
            self.model.to(dev)
            x, y = x.to(dev), y.to(dev)
            if x_val is not None:
                x_val, y_val = x_val.to(dev), y_val.to(dev)
        steps_per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
        self._steps_per_epoch = steps_per_epoch
        self._resumed_rng: Dict[str, Tensor] = {}
        self._rng_states: Dict[str, Tensor] = {}
        if cfg.schedule == "cosine" and self.scheduler is None:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max(1, cfg.epochs * steps_per_epoch))
        from .distributed import check_agreement, context, rank_seed
        self._ctx = ctx = context()
        if ctx is not None:  # before any collective: ranks launched differently fail now, by name
            check_agreement({"epochs": cfg.epochs, **{k: v for k, v in to_dict(cfg).items()
                                                      if k not in ("epochs", "device")},  # a GPU per rank
                             "objective": self._objective_name(), "model": self.model_config,
                             "train samples": list(x.shape), "validation samples":
                             None if x_val is None else list(x_val.shape),
                             "resume": bool(resume)}, "training", ctx)
        main = ctx is None or ctx.is_main
        if ctx is not None and self.out_dir is not None and self.model_config is None:
            # raised by every rank now, not by rank 0 alone after the first epoch
            raise CheckpointError("cannot checkpoint a model without model_config (build it with the zoo "
                                  "or pass model_config={'name': ..., 'options': {...}})")
        failure: Optional[Exception] = None
        if self.out_dir is not None and main:
            try:
                self._open_out_dir(resume)
            except Exception as e:  # in a group every rank raises it (below)
                if ctx is None:
                    raise
                failure = e
        if ctx is not None:
            self._sync_from_main(failure)
        torch.manual_seed(cfg.seed if ctx is None else rank_seed(cfg.seed, ctx.rank))
        if ctx is not None and ctx.rank > 0:  # each seeded objective (a wrapped one too) per rank
            for _, obj in self._objective_chain():
                if getattr(obj, "seed", None) is not None and hasattr(obj, "reseed_generator"):
                    obj.reseed_generator(rank_seed(obj.seed, ctx.rank))
        if ctx is not None:
            resumed = self._resumed_rng if ctx.is_main else None
            from .distributed import broadcast_object
            self._resumed_rng = broadcast_object(resumed) or {}
        if self._resumed_rng:
            self._restore_rng(self._resumed_rng)
        bar = None
        if self.progress and main:
            from tqdm.auto import tqdm
            bar = tqdm(total=(cfg.epochs - self.start_epoch) * steps_per_epoch, desc="train", leave=False)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                rec = self._epoch(epoch, x, y, bar)
                if x_val is not None:
                    ev = self._evaluate_val(x_val, y_val)
                    rec.update({f"val_{k}": v for k, v in ev.items()})
                self.history.append(rec)
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self._log(f"epoch/{k}", float(v), epoch)
                logger.info("epoch %d: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
                self._collect_rng()  # every rank takes part (a collective in a group)
                if not main:
                    continue
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

    def _nonfinite_loss(self, epoch: int, batch: int) -> str:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        why = (f"the parameters are already non-finite ({', '.join(bad[:3])})" if bad else
               "the parameters are finite")
        return (f"non-finite training loss at epoch {epoch}, batch {batch}: {why}; the training "
                f"diverged (learning rate {self.config.lr:g}: try a smaller one) and was stopped "
                "(the last checkpoint, if any, is unchanged)")

    def _epoch(self, epoch: int, x: Tensor, y: Tensor, bar) -> dict:
        from .data import make_loader
        cfg = self.config
        ctx = getattr(self, "_ctx", None)
        self.model.train()
        if ctx is None:
            loader = make_loader(x, y, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        else:  # the single-process batches of indices (same shuffle), each split over the ranks
            loader = make_loader(torch.arange(x.shape[0]), y, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        sums: Dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(loader):
            self.optimizer.zero_grad(set_to_none=True)
            buffers_moved = False
            set_step = getattr(self.objective, "set_train_step", None)
            if callable(set_step):  # schedules of the objective (e.g. the radius warm-up)
                set_step(epoch * len(loader) + i)
            if ctx is None:
                loss, scalars = self.objective(self.model, xb, yb)
                scalars = dict(scalars)
                if not torch.isfinite(loss):
                    raise TrainingError(self._nonfinite_loss(epoch, i))
                loss.backward()
                scalars["loss"] = float(loss.detach())
            else:
                xb, yb, scalars, buffers_moved = self._distributed_step(ctx, epoch, i, x, y, xb)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            if ctx is not None and buffers_moved:
                self._sync_buffers()
            step = epoch * len(loader) + i
            if i % max(1, cfg.log_every) == 0:
                for k, v in scalars.items():
                    self._log(f"train/{k}", v, step)
            for k, v in scalars.items():
                if k != "global_loss":
                    sums[k] = sums.get(k, 0.0) + v * xb.shape[0]
            n += xb.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{scalars.get('global_loss', scalars['loss']):.3f}")
        seconds = time.perf_counter() - t0
        if ctx is not None:  # sample-weighted means over every rank; the slowest rank's time
            from .distributed import reduce_stats
            tot = reduce_stats({**sums, "__n": float(n), "__time": seconds}, maxima=("__time",))
            n, seconds = int(tot.pop("__n")), tot.pop("__time")
            sums = tot
        rec = {"epoch": epoch, "epoch_time_s": seconds}
        rec.update({k: v / max(1, n) for k, v in sums.items()})
        return rec

    def _distributed_step(self, ctx, epoch: int, i: int, x: Tensor, y: Tensor, idx: Tensor):
        """This rank's part of one global batch (a contiguous slice of its indices): objective,
        backward, then the gradients of all ranks averaged with weights = samples per rank (the
        gradient of the mean loss over the global batch). Returns ``(xb, yb, scalars,
        buffers_moved)``; the scalars are this rank's, plus ``global_loss`` (the mean over the
        global batch); ``buffers_moved``: some rank's floating-point buffers changed in the step."""
        from .distributed import average_gradients, shard_indices
        total = idx.shape[0]
        part = shard_indices(total, ctx.rank, ctx.world_size)
        sel = idx[part[0]:part[-1] + 1] if part else idx[:0]
        xb, yb = x[sel], y[sel]
        nb = xb.shape[0]
        scalars: Dict[str, float] = {}
        loss_sum, bad = 0.0, 0.0
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        before = [b.detach().clone() for b in buffers]
        if nb:
            loss, scalars = self.objective(self.model, xb, yb)
            scalars = dict(scalars)
            if torch.isfinite(loss):
                loss.backward()
                loss_sum = float(loss.detach()) * nb
                scalars["loss"] = float(loss.detach())
            else:  # every rank must reach the all-reduce below before raising
                bad = 1.0
        # buffers that moved in this step's forwards (e.g. spectral-norm power iterations) are
        # re-synchronised from rank 0 after the step; the flag rides on the gradient all-reduce
        changed = float(any(not torch.equal(b, b0) for b, b0 in zip(buffers, before)))
        extra = torch.tensor([loss_sum, bad, changed], dtype=torch.float64)
        red = average_gradients(list(self.model.parameters()), float(nb), float(total), extra)
        if float(red[1]) > 0:
            raise TrainingError(self._nonfinite_loss(epoch, i) +
                                f" (on {int(red[1])} of {ctx.world_size} processes)")
        scalars["global_loss"] = float(red[0]) / total
        return xb, yb, scalars, float(red[2]) > 0

    def _sync_buffers(self) -> None:
        """Rank 0's floating-point buffers (e.g. spectral-norm power-iteration vectors, which
        advance with every training forward) on every rank, as DDP's ``broadcast_buffers``, in
        one coalesced broadcast per dtype; called after a step in which a rank's buffers moved."""
        from .distributed import broadcast_tensors
        broadcast_tensors([b for b in self.model.buffers() if b.is_floating_point()], src=0)


def train_model(model_name: str, model_options: dict, train_options: dict, *, dataset: str = "digits",
                root: Optional[str] = None, out_dir=None, objective=None, progress: bool = False,
                seed: int = 0, resume: bool = True):
    """Build ``model_name`` from the zoo (its input shape and classes from ``dataset``, then
    ``model_options``) with ``torch.manual_seed(seed)``, and train it on the dataset's train
    split with :class:`Trainer` (``objective``, ``train_options``; ``out_dir``: checkpoints,
    history and TensorBoard log, resumed with ``resume``), validating on the test split.

    Returns:
        ``(model, history, (x_test, y_test))``.
    """
    from .data import dataset_info, load_dataset
    from .deq import zoo
    info = dataset_info(dataset)
    opts = {"in_shape": list(info["shape"]), "num_classes": info["num_classes"], **model_options}
    torch.manual_seed(seed)
    model = zoo.build(model_name, **opts)
    x, y = load_dataset(dataset, "train", root=root)
    xt, yt = load_dataset(dataset, "test", root=root)
    trainer = Trainer(model, objective, {"seed": seed, **train_options}, out_dir=out_dir,
                      progress=progress, metadata={"dataset": dataset})
    hist = trainer.fit(x, y, xt, yt, resume=resume)
    return model, hist, (xt, yt)


__all__ = ["Trainer", "evaluate_clean", "train_model"]
