"""Running on several processes or machines: the process group and the helpers built on it.

robustdeq uses :mod:`torch.distributed` as ``torchrun`` sets it up (one process per CPU share or
GPU, on one machine or many). :func:`context` returns the group the library works in:

- a process group the caller has already initialised (``torch.distributed.init_process_group``);
- else, when torchrun's environment is present (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``), a group initialised from it by :func:`init` (backend ``gloo``
  on a machine without CUDA, ``cpu:gloo,cuda:nccl`` with CUDA, so that CPU tensors go over gloo
  and CUDA tensors over NCCL);
- else ``None``: one process, nothing changes.

An incomplete or malformed environment (``WORLD_SIZE`` without ``MASTER_ADDR``, a ``RANK``
outside ``[0, WORLD_SIZE)``, ...) is a :class:`~robustdeq.errors.ConfigError` naming the variable.
Inside :func:`single_process` the library ignores any process group (each process then works
alone, e.g. on its own data).

The helpers (``all_gather_object``, ``all_reduce``, :func:`shard_indices`, ...) are the identity
without a group, so code using them runs unchanged in one process.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError

logger = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_local = threading.local()


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# -- the environment --------------------------------------------------------------------------------
def _env_int(env: Dict[str, str], name: str, low: int, high: Optional[int] = None) -> int:
    text = env[name]
    try:
        val = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer (torchrun sets it; "
                          "launch with torchrun or unset it)") from None
    if val < low or (high is not None and val >= high):
        rng = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(f"environment variable {name}={val} must be {rng}")
    return val


def env_config(environ: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    """torchrun's variables parsed and checked: ``{"rank", "world_size", "local_rank",
    "master_addr", "master_port"}``, or ``None`` when neither ``RANK`` nor ``WORLD_SIZE`` is set.
    Raises :class:`ConfigError` naming the variable that is missing or malformed."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in env or not env[name].strip():
            other = "WORLD_SIZE" if name != "WORLD_SIZE" else "RANK"
            present = [v for v in ENV_VARS if v in env]
            raise ConfigError(
                f"environment variable {name} is not set, but {', '.join(present) or other} is: a "
                "multi-process run needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun sets "
                "them all; launch with 'torchrun --nproc-per-node N ...', or unset "
                f"{' and '.join(present)} to run in one process)")
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0, world)
    local = _env_int(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in env else rank
    port = _env_int(env, "MASTER_PORT", 1, 65536)
    return {"rank": rank, "world_size": world, "local_rank": local,
            "master_addr": env["MASTER_ADDR"].strip(), "master_port": port}


def auto_backend() -> str:
    """``cpu:gloo,cuda:nccl`` where CUDA and NCCL are available, else ``gloo``."""
    import torch.distributed as dist
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init(backend: str = "auto", timeout_s: float = 1800.0) -> Optional[DistContext]:
    """Initialise the process group from torchrun's environment if it is not initialised yet;
    returns :func:`context` (``None`` without a group or torchrun environment).

    ``backend``: "auto" (:func:`auto_backend`), "gloo", "nccl" or any string
    ``init_process_group`` accepts. With CUDA, the process's device becomes ``cuda:LOCAL_RANK``.
    """
    import torch.distributed as dist
    if not dist.is_available():
        if env_config() is not None:
            raise ConfigError("torch.distributed is not available in this build of torch; "
                              "unset RANK/WORLD_SIZE to run in one process")
        return None
    if dist.is_initialized():
        return _from_group()
    cfg = env_config()
    if cfg is None:
        return None
    chosen = auto_backend() if backend == "auto" else backend
    if "nccl" in chosen and torch.cuda.is_available():
        torch.cuda.set_device(cfg["local_rank"] % torch.cuda.device_count())
    logger.info("initialising the process group: rank %d of %d, backend %s, %s:%d", cfg["rank"],
                cfg["world_size"], chosen, cfg["master_addr"], cfg["master_port"])
    dist.init_process_group(backend=chosen, init_method="env://", rank=cfg["rank"],
                            world_size=cfg["world_size"], timeout=datetime.timedelta(seconds=timeout_s))
    check_threads()
    return _from_group()


def check_threads(environ: Optional[Dict[str, str]] = None, cores: Optional[int] = None) -> bool:
    """Warn (and return False) when this machine's processes ask for more torch CPU threads than
    it has cores: ``LOCAL_WORLD_SIZE`` (set by torchrun) x ``torch.get_num_threads()`` >
    ``cores`` (default: the CPUs this process may run on). Oversubscribed ranks slow each other
    down, and every collective waits for the slowest; ``torchrun`` sets ``OMP_NUM_THREADS=1``,
    ``robustdeq --threads`` defaults to 1, and ``torch.set_num_threads`` sets it in Python."""
    env = os.environ if environ is None else environ
    try:
        local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    if local * threads > cores:
        logger.warning("%d processes on this machine with %d torch threads each on %d CPU cores: the "
                       "ranks oversubscribe the cores and slow each other down; use %d thread(s) per "
                       "process (torch.set_num_threads, OMP_NUM_THREADS, robustdeq --threads)", local,
                       threads, cores, max(1, cores // max(1, local)))
        return False
    return True


def _from_group() -> DistContext:
    import torch.distributed as dist
    env = os.environ
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        local = rank
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=str(dist.get_backend()))


def context(auto_init: bool = True) -> Optional[DistContext]:
    """The process group the library works in, or ``None`` (one process; also inside
    :func:`single_process`). ``auto_init``: initialise the group from torchrun's environment
    when it is present and no group exists yet."""
    if getattr(_local, "disabled", 0):
        return None
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return _from_group()
    return init() if auto_init else None


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Inside this block robustdeq ignores the process group: every process works alone."""
    _local.disabled = getattr(_local, "disabled", 0) + 1
    try:
        yield
    finally:
        _local.disabled -= 1


def rank() -> int:
    ctx = context(auto_init=False)
    return ctx.rank if ctx else 0


def world_size() -> int:
    ctx = context(auto_init=False)
    return ctx.world_size if ctx else 1


def is_main() -> bool:
    """True in the process that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if context(auto_init=False) is not None:
        import torch.distributed as dist
        dist.barrier()


# -- sharding ---------------------------------------------------------------------------------------
def shard_indices(n: int, rank: Optional[int] = None, world: Optional[int] = None,
                  mode: str = "contiguous") -> List[int]:
    """The items of ``range(n)`` this rank owns: ``"contiguous"`` (blocks of sizes differing by
    at most one, the larger ones first, as ``numpy.array_split``) or ``"strided"`` (``rank,
    rank + world, ...``). Deterministic; the shards of all ranks partition ``range(n)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be an int >= 0, got {n!r}")
    r = globals()["rank"]() if rank is None else int(rank)
    w = world_size() if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ConfigError(f"rank {r} is not in [0, world size {w})")
    if mode == "strided":
        return list(range(r, n, w))
    if mode != "contiguous":
        raise ConfigError(f"unknown shard mode {mode!r}; expected 'contiguous' or 'strided'")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return list(range(start, start + base + (1 if r < extra else 0)))


_claims = itertools.count()


def claim(items: Sequence[Any], ctx: Optional[DistContext] = None) -> Iterator[Any]:
    """The items of ``items`` this rank works on, claimed one at a time as the rank becomes free
    (a shared counter in the process group's store): work of uneven cost balances itself over
    the ranks. Every rank must call it, in the same order as its other collective calls, and
    iterate to the end; which rank gets an item is not deterministic, so the caller's results
    must not depend on it (per-item seeds). Without a group: every item, in order; without a
    reachable store: every ``world_size``-th item. ``ctx``: default :func:`context` (no
    auto-initialisation)."""
    ctx = context(auto_init=False) if ctx is None else ctx
    if ctx is None:
        yield from items
        return
    key = f"robustdeq/claim/{next(_claims)}"  # every rank calls in the same order: the same key
    store = None
    try:
        from torch.distributed import distributed_c10d
        store = distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - a group without a store
        store = None
    if store is None:  # pragma: no cover
        yield from items[ctx.rank::ctx.world_size]
        return
    while True:
        j = int(store.add(key, 1)) - 1
        if j >= len(items):
            return
        yield items[j]


def gather_sharded(mine: List[Any], failure: Optional[BaseException] = None,
                   ctx: Optional[DistContext] = None) -> List[Any]:
    """Every rank's list ``mine`` concatenated in rank order, on every rank; if any rank passes a
    ``failure`` (the exception that stopped its share of the work), every rank raises the first
    one (so no rank waits for a rank that failed). Without a group: ``mine`` (``failure`` raised)."""
    ctx = context(auto_init=False) if ctx is None else ctx
    if ctx is None:
        if failure is not None:
            raise failure
        return list(mine)
    if failure is not None:
        import pickle
        try:
            pickle.dumps(failure)
        except Exception:  # an exception that does not pickle travels as its message
            failure = RuntimeError(f"{type(failure).__name__}: {failure}")
    parts = all_gather_object((list(mine), failure))
    for r, (_, err) in enumerate(parts):
        if err is not None:
            if failure is None:
                logger.error("process %d of %d failed: %s", r, ctx.world_size, err)
            raise err
    return [item for part, _ in parts for item in part]


def run_on_main(fn: Callable[[], Any], ctx: Optional[DistContext] = None) -> Any:
    """``fn()`` on rank 0 alone: its result there, None on the other ranks; an exception it
    raises is raised on every rank (so no rank goes on without what rank 0 failed to do, e.g.
    take a folder's lock). Without a group: ``fn()``."""
    ctx = context(auto_init=False) if ctx is None else ctx
    if ctx is None:
        return fn()
    out, failure = None, None
    if ctx.is_main:
        try:
            out = fn()
        except Exception as e:  # every rank raises it below
            failure = e
    failure = broadcast_object(failure)
    if failure is not None:
        raise failure
    return out


# -- collectives (the identity in one process) ------------------------------------------------------
_OPS = ("sum", "max", "min")


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """``t`` reduced over the ranks (``"sum"``, ``"max"``, ``"min"``), in place; returns it."""
    if op not in _OPS:
        raise ConfigError(f"unknown reduction {op!r}; expected one of {_OPS}")
    if context(auto_init=False) is None:
        return t
    import torch.distributed as dist
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                           "min": dist.ReduceOp.MIN}[op])
    return t


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` in one process."""
    ctx = context(auto_init=False)
    if ctx is None:
        return [obj]
    import torch.distributed as dist
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def check_agreement(settings: Dict[str, Any], what: str = "the command",
                    ctx: Optional["DistContext"] = None) -> None:
    """Every rank must run ``what`` with the same ``settings`` (JSON-like values; compared as
    their JSON text): one collective, before any work, so that ranks launched with different
    options fail at once with a :class:`~robustdeq.errors.ConfigError` naming the first
    differing option and each rank's value, instead of deadlocking or crashing in a later
    collective. Nothing to check in one process."""
    ctx = ctx if ctx is not None else context(auto_init=False)
    if ctx is None or ctx.world_size < 2:
        return
    import json
    mine = {str(k): json.dumps(v, sort_keys=True, default=repr) for k, v in settings.items()}
    every = all_gather_object(mine)
    keys = list(every[0]) + sorted(set().union(*every) - set(every[0]))  # rank 0's order first
    differ = [k for k in keys if len({e.get(k) for e in every}) > 1]
    if differ:
        k = differ[0]
        values = ", ".join(f"rank {r}: {e.get(k, '(not given)')}" for r, e in enumerate(every))
        more = f" (and {', '.join(differ[1:])})" if len(differ) > 1 else ""
        raise ConfigError(f"the processes run {what} with different settings: {k} differs ({values}){more}; "
                          "every rank must be launched with the same command and options")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the others pass anything, e.g. None)."""
    if context(auto_init=False) is None:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_rows(t: Tensor) -> Tensor:
    """Per-sample tensors ``(n_r, ...)`` of every rank concatenated in rank order (the ranks may
    hold different ``n_r``; the trailing shape and dtype must agree)."""
    ctx = context(auto_init=False)
    if ctx is None:
        return t
    import torch.distributed as dist
    sizes = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(ctx.world_size)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    m = max(counts)
    pad = t.new_zeros((m,) + tuple(t.shape[1:]))
    pad[:t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in range(ctx.world_size)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def reduce_stats(sums: Dict[str, float], *, maxima: Iterable[str] = ()) -> Dict[str, float]:
    """Statistics summed over the ranks (the keys in ``maxima``: their maximum); keys missing on
    a rank count as 0 (or are ignored for maxima)."""
    gathered = all_gather_object(dict(sums))
    maxima = set(maxima)
    out: Dict[str, float] = {}
    for part in gathered:
        for k, v in part.items():
            if k in maxima:
                out[k] = v if k not in out else max(out[k], v)
            else:
                out[k] = out.get(k, 0.0) + v
    return out


def broadcast_tensors(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values into ``tensors`` (in place) on every rank, in one coalesced
    broadcast per device and dtype (the ranks pass tensors of the same shapes, in the same order)."""
    if context(auto_init=False) is None:
        return
    import torch.distributed as dist
    groups: Dict[tuple, List[Tensor]] = {}
    for t in tensors:
        groups.setdefault((str(t.device), str(t.dtype)), []).append(t)
    with torch.no_grad():
        for _, ts in sorted(groups.items(), key=lambda kv: kv[0]):
            if len(ts) == 1 and ts[0].is_contiguous():
                dist.broadcast(ts[0].data, src=src)
                continue
            flat = torch.cat([t.detach().reshape(-1) for t in ts])
            dist.broadcast(flat, src=src)
            off = 0
            for t in ts:
                k = t.numel()
                t.data.copy_(flat[off:off + k].view_as(t))
                off += k


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (coalesced:
    one broadcast per device and dtype)."""
    broadcast_tensors([t.data for t in list(module.parameters()) + list(module.buffers())], src=src)


def average_gradients(params: Sequence[nn.Parameter], weight: float, total: float,
                      extra: Optional[Tensor] = None) -> Optional[Tensor]:
    """Replace every gradient by ``sum_r weight_r * grad_r / total`` over the ranks, in one
    coalesced all-reduce per device and dtype (a rank whose parameter has no gradient contributes
    zeros; a parameter without a gradient on every rank keeps ``None``).

    With ``weight`` the rank's number of samples and ``total`` their sum, this is the gradient of
    the mean loss over the concatenated batch. ``extra`` (a 1-D float tensor) is summed over the
    ranks in the same call and returned."""
    params = [p for p in params if p.requires_grad]
    if context(auto_init=False) is None:
        if weight != total:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(weight / total)
        return extra
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    extra_out = None
    for gi, ((device, dtype), ps) in enumerate(sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))):
        flat = [(p.grad.detach().reshape(-1) * weight) if p.grad is not None
                else torch.zeros(p.numel(), device=device, dtype=dtype) for p in ps]
        flags = torch.tensor([p.grad is not None for p in ps], device=device, dtype=dtype)
        pieces = flat + [flags]
        if gi == 0 and extra is not None:
            pieces.append(extra.to(device=device, dtype=dtype).reshape(-1))
        buf = all_reduce(torch.cat(pieces), "sum")
        off = 0
        for p in ps:
            k = p.numel()
            chunk = buf[off:off + k]
            off += k
            if p.grad is None:
                p.grad = chunk.view_as(p).clone()
            else:
                p.grad.copy_(chunk.view_as(p))
        has = buf[off:off + len(ps)]
        off += len(ps)
        for p, h in zip(ps, has.tolist()):
            if h > 0:
                p.grad.div_(total)
            else:
                p.grad = None
        if gi == 0 and extra is not None:
            extra_out = buf[off:off + extra.numel()].to(extra.dtype).view_as(extra)
    if extra is not None and extra_out is None:  # no parameter with requires_grad
        extra_out = all_reduce(extra.clone(), "sum")
    return extra_out


def rank_seed(seed: int, rank_: int) -> int:
    """A rank's seed: ``seed`` itself on rank 0 (so one process and rank 0 draw alike), a
    well-separated derived seed on the other ranks."""
    if rank_ == 0:
        return int(seed)
    import hashlib
    h = hashlib.sha256(f"{int(seed)}/rank/{int(rank_)}".encode()).hexdigest()
    return int(h[:8], 16)


__all__ = ["DistContext", "ENV_VARS", "env_config", "auto_backend", "init", "check_threads", "context",
           "single_process", "rank", "world_size", "is_main", "barrier", "shard_indices", "claim",
           "gather_sharded", "run_on_main", "all_reduce", "all_gather_object", "broadcast_object", "all_gather_rows",
           "reduce_stats", "broadcast_tensors", "broadcast_module", "average_gradients", "rank_seed",
           "check_agreement"]
