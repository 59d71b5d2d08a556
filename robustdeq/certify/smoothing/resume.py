"""The finished inputs of a smoothing certification kept on disk, so that a killed run resumes.

With an ``out_dir``, :func:`robustdeq.certify.certify_checkpoint` appends each input's result to
``out_dir/partial_smoothing.jsonl`` as soon as it is certified (one JSON line, flushed), a
:class:`robustdeq.certify.resume.PartialResults` (see there for the file's rules). The first line
names the configuration: a hash of the smoothing settings, the model parameters and the data
(inputs and labels). A later run of the same configuration takes the results it finds and
certifies only the other inputs: the noise of an input depends only on the seed and its index, so
these are the results an uninterrupted run computes (only their seconds differ). A file of another
configuration is discarded with a warning (the run starts clean); a line that cannot be read (a
torn last line of a killed run, a damaged file) is dropped with a warning and its input certified
again. The file is removed once ``certificate.json`` is written. In a process group each rank
keeps the inputs it certifies in its own file, ``partial_smoothing.rank<R>-of-<W>.jsonl``, under a
hash that also covers the world size (see :mod:`robustdeq.certify.resume`); a rerun certifies
only the inputs that no rank's file holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

from torch import Tensor, nn

from ...config import to_dict
from ..resume import PartialResults, discard_other_worlds, partial_file, run_hash
from .config import SmoothingConfig
from .report import SmoothingResult, _json_safe

PARTIAL_FILE = "partial_smoothing.jsonl"


def config_hash(cfg: SmoothingConfig, model: nn.Module, x: Tensor, y: Optional[Tensor], ctx=None) -> str:
    """SHA-256 of the settings, the model's parameters and the data (:func:`run_hash`); in a
    process group (``ctx``, a :class:`~robustdeq.distributed.DistContext`) the world size too."""
    settings = to_dict(cfg)
    if ctx is not None:
        settings = {**settings, "world_size": ctx.world_size}
    return run_hash(settings, model, x, y)


def _decode(d: Any, n: int) -> Optional[Tuple[int, SmoothingResult]]:
    r = SmoothingResult(**d)
    return r.index, r


def _encode(r: SmoothingResult) -> Any:
    return _json_safe(dataclasses.asdict(r))


def smoothing_partial(out_dir, config_hash: str, n: int, ctx=None) -> PartialResults[SmoothingResult]:
    """``out_dir/partial_smoothing.jsonl``: one :class:`SmoothingResult` a line, by input index
    (in a process group, ``ctx``: this rank's file, :func:`~robustdeq.certify.resume.partial_file`)."""
    discard_other_worlds(out_dir, PARTIAL_FILE, ctx)
    return PartialResults(out_dir, config_hash, n, file=partial_file(PARTIAL_FILE, ctx), encode=_encode,
                          decode=_decode,
                          units="inputs", settings="smoothing settings")


__all__ = ["PartialResults", "smoothing_partial", "config_hash", "PARTIAL_FILE"]
