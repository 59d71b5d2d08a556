"""The finished inputs of a smoothing certification kept on disk, so that a killed run resumes.

With an ``out_dir``, :func:`robustdeq.certify.certify_checkpoint` appends each input's result to
``out_dir/partial_smoothing.jsonl`` as soon as it is certified (one JSON line, flushed). The
first line names the configuration: a hash of the smoothing settings, the model parameters and
the data (inputs and labels). A later run of the same configuration takes the results it finds
and certifies only the other inputs: the noise of an input depends only on the seed and its
index, so these are the results an uninterrupted run computes (only their seconds differ). A file
of another configuration is discarded with a warning (the run starts clean); a line that cannot be
read (a torn last line of a killed run, a damaged file) is dropped with a warning and its input
certified again. The file is removed once ``certificate.json`` is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..._tensor import model_sha256, tensors_sha256
from ...config import to_dict
from .config import SmoothingConfig
from .report import SmoothingResult, _json_safe

logger = logging.getLogger(__name__)

PARTIAL_FILE = "partial_smoothing.jsonl"


def config_hash(cfg: SmoothingConfig, model: nn.Module, x: Tensor, y: Optional[Tensor]) -> str:
    """SHA-256 of the settings, the model's parameters and the data."""
    data = tensors_sha256(x, y if y is not None else torch.empty(0, dtype=torch.long))
    text = json.dumps({"config": to_dict(cfg), "model": model_sha256(model), "data": data,
                       "labels": y is not None}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class PartialResults:
    """``out_dir/partial_smoothing.jsonl``: ``done`` (index -> result) read back, :meth:`add`
    appends a result, :meth:`remove` deletes the file."""

    def __init__(self, out_dir, config_hash: str, n: int):
        self.path = Path(out_dir) / PARTIAL_FILE
        self.hash = config_hash
        self.done: Dict[int, SmoothingResult] = {}
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
            logger.warning("cannot read %s (%s); its inputs are certified again", self.path, e)
            return
        try:
            head = json.loads(lines[0]) if lines else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("config_hash") != self.hash:
            logger.warning("%s holds results of another configuration (smoothing settings, model or data) "
                           "or is malformed; they are discarded and every input is certified", self.path)
            return
        bad = 0
        for line in lines[1:]:
            r = self._parse(line, n)
            if r is None:
                bad += 1
            else:
                self.done[r.index] = r
        if bad:
            logger.warning("%s: %d unreadable line(s) dropped (a run killed while writing?); those inputs "
                           "are certified again", self.path, bad)
        if self.done:
            logger.info("%s: resuming with %d of %d inputs certified", self.path, len(self.done), n)

    @staticmethod
    def _parse(line: str, n: int) -> Optional[SmoothingResult]:
        try:
            d: Any = json.loads(line)
            r = SmoothingResult(**d)
        except (ValueError, TypeError):
            return None
        if isinstance(r.index, bool) or not isinstance(r.index, int) or not 0 <= r.index < n:
            return None
        return r

    @staticmethod
    def _line(r: SmoothingResult) -> str:
        return json.dumps(_json_safe(dataclasses.asdict(r)), allow_nan=False)

    def add(self, r: SmoothingResult) -> None:
        self._fh.write(self._line(r) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def remove(self) -> None:
        self.close()
        if self.path.is_file():
            self.path.unlink()


__all__ = ["PartialResults", "config_hash", "PARTIAL_FILE"]
