"""Moved to :mod:`robustdeq.deq.shrink` (the shrinking-batch solve is part of the DEQ's own
warm-started solves, :mod:`robustdeq.deq.warm`); re-exported here."""
from ..deq.shrink import MakeF, ShrinkResult, solve_shrinking

__all__ = ["solve_shrinking", "ShrinkResult", "MakeF"]
