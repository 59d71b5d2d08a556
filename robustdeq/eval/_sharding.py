"""The evaluation harness on several processes (:mod:`robustdeq.distributed`).

Exactness: every built-in attack draws its random numbers from a generator (or the global RNG)
seeded with the unit's seed *at every call*, so the examples of one batch depend only on that
batch's samples, their order and the seed. The harness therefore keeps the single-process batches
(``batch_size`` consecutive attacked samples), seeds the global RNG with the unit's seed before
each batch, and shares the batches out over the ranks; the examples are merged (each row
comes from exactly one rank, so the merge is an exact copy) and every rank then judges all samples
the same way, in the same batches, as one process would: the report equals the single-process
report flag for flag, whichever rank attacked a batch (the ranks claim batches as they
become free). Clean margins, trajectory statistics and checks are computed on every rank
(one inference per sample each, cheap next to the attacks).

Rank 0 alone reads and writes ``out_dir`` (``partial/`` units, report, TensorBoard); the finished
units it reads back on resume are broadcast to the other ranks, so a run killed on any rank
resumes like a single-process one and the ranks need no shared file system.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from ..distributed import (DistContext, all_gather_object, all_reduce, broadcast_object, claim, context,
                           run_on_main)
from ..errors import ConfigError


def owned_batches(starts: Sequence[int], ctx: Optional[DistContext]) -> Iterator[int]:
    """The batch starts this rank attacks. The ranks take the next unclaimed batch from a shared
    counter in the process group's store as they finish one (:func:`robustdeq.distributed.claim`:
    robust samples cost an attack far more than broken ones, so a fixed split leaves ranks idle);
    the results do not depend on which rank attacks a batch."""
    if ctx is None:
        return iter(starts)
    return claim(starts, ctx)


def merge_rows(x_adv: Tensor, mine: Tensor, ctx: Optional[DistContext]) -> Tensor:
    """``x_adv`` with the rows each rank computed (``mine``: (N,) bool, the ranks' masks
    disjoint) taken from that rank, exactly; rows nobody computed keep ``x_adv``'s value."""
    if ctx is None:
        return x_adv
    view = (-1,) + (1,) * (x_adv.dim() - 1)
    part = torch.where(mine.view(view), x_adv, torch.zeros_like(x_adv))
    all_reduce(part, "sum")
    owner = all_reduce(mine.to(torch.int32), "sum") > 0
    return torch.where(owner.view(view), part, x_adv)


def sum_int(value: int, ctx: Optional[DistContext], device) -> int:
    """``value`` summed over the ranks of ``ctx`` (``value`` itself without a group)."""
    if ctx is None:
        return int(value)
    return int(all_reduce(torch.tensor([int(value)], dtype=torch.long, device=device), "sum"))


def check_same_config(config_hash: str, ctx: Optional[DistContext]) -> None:
    """Every rank must evaluate the same model on the same data with the same settings."""
    if ctx is None:
        return
    hashes = all_gather_object(config_hash)
    if len(set(hashes)) > 1:
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise ConfigError(
            f"the processes evaluate different configurations (ranks {bad} differ from rank 0 in "
            "model parameters, data, threat, eps, suite, steps, seed or batch size): a sharded "
            "evaluation needs the same model and data on every rank (load them identically, or run "
            "inside robustdeq.distributed.single_process() to evaluate each rank's data alone)")


class MainOnlyStore:
    """The partial-unit store as seen by every rank: rank 0 holds the real store; loads are
    broadcast from it, saves and removal happen on rank 0 only."""

    def __init__(self, inner: Any, ctx: DistContext):
        self.inner = inner
        self.ctx = ctx

    def load(self, ei: int, ui: int, key: str, **expect):
        """Rank 0's stored unit ``(ei, ui)`` (or None), broadcast to every rank."""
        found = self.inner.load(ei, ui, key, **expect) if self.ctx.is_main else None
        return broadcast_object(found)

    def save(self, *args, **kwargs) -> None:
        """Save a finished unit (on rank 0 only)."""
        if self.ctx.is_main:
            self.inner.save(*args, **kwargs)

    def remove(self) -> None:
        """Delete the store's folder (on rank 0 only)."""
        if self.ctx.is_main:
            self.inner.remove()


def open_store(make: Callable[[], Any], out_dir, ctx: Optional[DistContext]):
    """``make()`` (the single-process store) or, in a group, a :class:`MainOnlyStore` around the
    store rank 0 opened (its error, e.g. a partial evaluation of another configuration, is raised
    on every rank). ``None`` without ``out_dir``."""
    if out_dir is None:
        return None
    if ctx is None:
        return make()
    return MainOnlyStore(run_on_main(make, ctx), ctx)


__all__: List[str] = ["context", "owned_batches", "merge_rows", "sum_int", "check_same_config", "MainOnlyStore",
                      "open_store"]
