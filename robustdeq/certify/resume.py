"""The finished work of a certification kept on disk, so that a killed run resumes.

A :class:`PartialResults` is one JSONL file in the output folder. Its first line names the run,
``{"config_hash": ...}``: a hash of the settings, the model's parameters, the data (inputs and
labels), the device type and the versions of robustdeq and torch (:func:`run_hash`). Each later
line is one finished unit of work (an input for randomized smoothing, a batch of inputs for the
deterministic certificates), appended and flushed as soon as it is computed. A later run of the
same configuration takes the units it finds and computes only the others; the units are
independent and deterministic, so it ends with the results of an uninterrupted run. A file of
another configuration is discarded with a warning (the run starts clean); a line that cannot be
read (a torn last line of a killed run, a damaged file) is dropped with a warning and its unit
computed again. The file is removed once the report is written.

Deterministic certificates (:func:`robustdeq.certify.certify_checkpoint` with ``out_dir``) keep
each batch of ``batch_size`` inputs in ``out_dir/partial_certify.jsonl`` (:func:`certify_partial`,
one :class:`BatchResults` per line); smoothing keeps each input in ``partial_smoothing.jsonl``
(:mod:`robustdeq.certify.smoothing.resume`).

In a process group (``torchrun``; :mod:`robustdeq.distributed`) each rank keeps the units it
computes in its own file, ``partial_certify.rank<R>-of-<W>.jsonl`` (``partial_smoothing....``;
:func:`partial_file`), whose hash also covers the world size ``W``: a rerun of the same command
reads each rank's own file back and computes only the missing units, so the gathered report is
that of an uninterrupted run. Each rank removes its own file once rank 0 has written the report.
Files of another process layout, which a run would never read, are discarded with a warning
before any rank reads its own file (:func:`discard_other_worlds`): under torchrun the one-process
file and the per-rank files of another world size, in one process the per-rank files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generic, List, Mapping, Optional, Tuple, TypeVar

import torch
from torch import Tensor, nn

from .._tensor import model_sha256, tensors_sha256
from ..errors import ConfigError
from .report import CertResult, _dec, _enc

logger = logging.getLogger(__name__)

#: the deterministic certificates' file (one batch a line)
PARTIAL_FILE = "partial_certify.jsonl"

T = TypeVar("T")


def partial_file(file: str, ctx) -> str:
    """The partial file's name: ``file`` itself in one process (``ctx`` None), else
    ``<stem>.rank<R>-of-<W><suffix>`` for rank ``R`` of ``W`` (a
    :class:`~robustdeq.distributed.DistContext`)."""
    if ctx is None:
        return file
    stem, suffix = os.path.splitext(file)
    return f"{stem}.rank{ctx.rank}-of-{ctx.world_size}{suffix}"


def discard_other_worlds(out_dir, file: str, ctx) -> None:
    """Remove (with a warning naming each file and why) the partial files of ``file`` in
    ``out_dir`` that a run of another process layout wrote, whose units this run never reads
    (they were shared out otherwise; they are computed again): in a process group (``ctx``, a
    :class:`~robustdeq.distributed.DistContext`) the one-process file and the per-rank files of
    another world size, in one process (``ctx`` None) the per-rank files of any process group.
    In a group rank 0 alone removes them and every rank waits until it has (an error there is
    raised on every rank), so no rank reads its own file before: every rank must call it."""
    if ctx is None:
        _discard_other_layouts(out_dir, file, None)
        return
    from ..distributed import run_on_main
    run_on_main(lambda: _discard_other_layouts(out_dir, file, ctx), ctx)


def _discard_other_layouts(out_dir, file: str, ctx) -> None:
    """The removal of :func:`discard_other_worlds` (in a group: rank 0's part)."""
    if not Path(out_dir).is_dir():
        return
    stem, suffix = os.path.splitext(file)
    per_rank = re.compile(re.escape(stem) + r"\.rank(\d+)-of-(\d+)" + re.escape(suffix) + r"(\.tmp)?")
    for p in sorted(Path(out_dir).iterdir()):
        if not p.is_file():
            continue
        m = per_rank.fullmatch(p.name)
        if m and ctx is None:
            logger.warning("%s holds partial results of rank %s of a run on %s processes (this run is one "
                           "process, which reads %s alone); they are discarded", p, m.group(1), m.group(2), file)
        elif m and int(m.group(2)) != ctx.world_size:
            logger.warning("%s holds partial results of a run on %s processes (this run has %d); they are "
                           "discarded", p, m.group(2), ctx.world_size)
        elif ctx is not None and p.name in (file, file + ".tmp"):
            logger.warning("%s holds partial results of a run in one process (this run has %d processes, "
                           "each of which reads its own per-rank file); they are discarded", p, ctx.world_size)
        else:
            continue
        p.unlink(missing_ok=True)


def run_hash(settings: Mapping[str, Any], model: nn.Module, x: Tensor, y: Optional[Tensor]) -> str:
    """SHA-256 of the settings (a JSON-able mapping), the model's parameters, the data, the
    device type and the versions of robustdeq and torch."""
    from .. import __version__
    data = tensors_sha256(x, y if y is not None else torch.empty(0, dtype=torch.long))
    text = json.dumps({"config": dict(settings), "model": model_sha256(model), "data": data,
                       "labels": y is not None, "device": x.device.type, "robustdeq": __version__,
                       "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class PartialResults(Generic[T]):
    """``out_dir/<file>``: ``done`` (key -> result) read back, :meth:`add` appends a result,
    :meth:`remove` deletes the file.

    Args:
        out_dir: the output folder (created if needed).
        config_hash: the run's identity (:func:`run_hash`); a file of another one is discarded.
        n: the number of inputs; keys are ints in ``[0, n)``.
        file: the file name in ``out_dir``.
        encode: result -> a JSON-able object (written with ``allow_nan=False``).
        decode: ``(object, n)`` -> ``(key, result)``, or None (or ValueError, TypeError,
            KeyError, AttributeError, ConfigError) for a line that is not a result: it is dropped.
        units: what a line holds, plural ("inputs", "batches"), for the messages.
        settings: what the hash covers besides model and data, for the messages.
    """

    def __init__(self, out_dir, config_hash: str, n: int, *, file: str, encode: Callable[[T], Any],
                 decode: Callable[[Any, int], Optional[Tuple[int, T]]], units: str = "inputs",
                 settings: str = "settings"):
        self.path = Path(out_dir) / file
        self.hash = config_hash
        self.units, self.settings = units, settings
        self._encode, self._decode = encode, decode
        self.done: Dict[int, T] = {}
        if self.path.is_file():
            self._read(n)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        # rewritten with the readable lines only: a torn line is not followed by new ones
        lines = [json.dumps({"config_hash": config_hash})] + [self._line(r) for r in self.done.values()]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def _read(self, n: int) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            logger.warning("cannot read %s (%s); its %s are certified again", self.path, e, self.units)
            return
        try:
            head = json.loads(lines[0]) if lines else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("config_hash") != self.hash:
            logger.warning("%s holds results of another configuration (%s, model or data) or is malformed; "
                           "they are discarded and every input is certified", self.path, self.settings)
            return
        bad = 0
        for line in lines[1:]:
            got = self._parse(line, n)
            if got is None:
                bad += 1
            else:
                self.done[got[0]] = got[1]
        if bad:
            logger.warning("%s: %d unreadable line(s) dropped (a run killed while writing?); those %s "
                           "are certified again", self.path, bad, self.units)
        if self.done:
            logger.info("%s: resuming with %d finished %s", self.path, len(self.done), self.units)

    def _parse(self, line: str, n: int) -> Optional[Tuple[int, T]]:
        try:
            got = self._decode(json.loads(line), n)
        except (ValueError, TypeError, KeyError, AttributeError, ConfigError):
            return None
        if got is None:
            return None
        key = got[0]
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < n:
            return None
        return got

    def _line(self, r: T) -> str:
        return json.dumps(self._encode(r), allow_nan=False)

    def add(self, r: T) -> None:
        self._fh.write(self._line(r) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def remove(self) -> None:
        self.close()
        if self.path.is_file():
            self.path.unlink()


@dataclass
class BatchResults:
    """The deterministic certificates of one batch (inputs ``start`` to ``start + len(results)``)
    and what the report counts of it: samples whose certification solve did not converge, samples
    refused (the deployed solve misses the certified fixed point), the reason IBP did not apply
    (or None) and the local-stability note (or None)."""

    start: int
    results: List[CertResult]
    unconverged: int = 0
    refused: int = 0
    ibp_reason: Optional[str] = None
    local: Optional[Dict[str, Any]] = None

    def to_dict(self) -> dict:
        return {"start": int(self.start), "results": [r.to_dict() for r in self.results],
                "unconverged": int(self.unconverged), "refused": int(self.refused),
                "ibp_reason": self.ibp_reason, "local": _enc(self.local)}

    @staticmethod
    def from_dict(d: dict, n: int, batch_size: int) -> Optional["BatchResults"]:
        """The batch of line ``d``, or None unless it is whole: it starts on a batch boundary and
        holds the results of its inputs, in order."""
        known = {"start", "results", "unconverged", "refused", "ibp_reason", "local"}
        if not isinstance(d, dict) or set(d) != known:
            return None
        start = d["start"]
        if isinstance(start, bool) or not isinstance(start, int) or start % batch_size or not 0 <= start < n:
            return None
        results = [CertResult.from_dict(r) for r in d["results"]]
        if [r.details.get("index") for r in results] != list(range(start, min(start + batch_size, n))):
            return None
        counts = (d["unconverged"], d["refused"])
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts):
            return None
        reason, local = d["ibp_reason"], _dec(d["local"])
        if not (reason is None or isinstance(reason, str)) or not (local is None or isinstance(local, dict)):
            return None
        return BatchResults(start, results, counts[0], counts[1], reason, local)


def resumable_settings(cfg) -> Optional[dict]:
    """The settings of a :class:`~robustdeq.certify.config.CertifyConfig` that its results
    depend on, as JSON (``progress`` left out), or None where one is code (a callable ``V`` or
    ``perturb``), whose identity a hash cannot capture: such a run is not resumed."""
    from ..config import to_dict
    if callable(cfg.V) or callable(cfg.perturb):
        return None
    d = to_dict(cfg)
    d.pop("progress", None)
    if isinstance(cfg.perturb, Tensor):
        d["perturb"] = {"tensor": tensors_sha256(cfg.perturb)}
    return d


def certify_partial(out_dir, cfg, model: nn.Module, x: Tensor, y: Optional[Tensor], ctx=None
                    ) -> Optional[PartialResults[BatchResults]]:
    """``out_dir/partial_certify.jsonl`` for the deterministic certification of ``model`` on
    ``(x, y)`` with the :class:`~robustdeq.certify.config.CertifyConfig` ``cfg`` (one
    :class:`BatchResults` a line), or None when the settings hold code
    (:func:`resumable_settings`): that run starts again if killed. ``ctx``: the process group's
    :class:`~robustdeq.distributed.DistContext` (None: one process); in a group this rank's
    file, :func:`partial_file`, under a hash that also covers the world size. The partial files
    of another process layout are discarded first, in either case (:func:`discard_other_worlds`:
    in a group every rank must call this function)."""
    discard_other_worlds(out_dir, PARTIAL_FILE, ctx)
    settings = resumable_settings(cfg)
    if settings is None:
        logger.info("certify: V or perturb is a callable; the run keeps no partial results (not resumable)")
        return None
    bs = cfg.batch_size
    settings = {"certify": "deterministic", **settings}
    if ctx is not None:
        settings["world_size"] = ctx.world_size
    return PartialResults(out_dir, run_hash(settings, model, x, y), x.shape[0],
                          file=partial_file(PARTIAL_FILE, ctx), encode=BatchResults.to_dict,
                          decode=lambda d, n: _keyed(BatchResults.from_dict(d, n, bs)),
                          units="batches", settings="certification settings")


def _keyed(b: Optional[BatchResults]) -> Optional[Tuple[int, BatchResults]]:
    return None if b is None else (b.start, b)


__all__ = ["PartialResults", "BatchResults", "run_hash", "certify_partial", "resumable_settings", "PARTIAL_FILE",
           "partial_file", "discard_other_worlds"]
