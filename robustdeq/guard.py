"""Evaluations never change the model they look at.

An attack, an evaluation suite or a certificate may switch a model to eval mode, freeze its
parameters or run a third-party library that flips flags (torchattacks' ``set_model_training_mode``
calls ``model.train()`` afterwards); a spectrally normalised weight runs, and stores, a power
iteration on every forward in train mode. :func:`preserve_model` makes the model bit-identical
after the block to what it was before: every submodule's ``training`` flag, every parameter's
``requires_grad`` flag, and the values of all parameters and buffers (restored in place where
something changed them, with a log record naming what changed).

:func:`model_snapshot` / :func:`snapshot_diff` are the same comparison as a value, for tests and
for callers that want to check rather than restore.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_MODES = ("eval", "train", "keep")


@dataclass
class ModelSnapshot:
    """Flags and tensor values of a set of modules at one moment."""

    modules: List[Tuple[nn.Module, bool]]
    requires_grad: List[Tuple[Tensor, bool]]
    tensors: Dict[int, Tuple[str, Tensor, Tensor]]  # id(tensor) -> (name, live tensor, copy)


def _roots(models: Union[nn.Module, Iterable[nn.Module]]) -> List[nn.Module]:
    if isinstance(models, nn.Module):
        return [models]
    return [m for m in models if isinstance(m, nn.Module)]


def model_snapshot(models: Union[nn.Module, Iterable[nn.Module]], *, values: bool = True) -> ModelSnapshot:
    """Record the ``training`` flag of every submodule, ``requires_grad`` of every parameter and
    (``values=True``) a copy of every parameter and buffer of ``models``."""
    roots = _roots(models)
    seen_m, seen_t = set(), set()
    mods: List[Tuple[nn.Module, bool]] = []
    rg: List[Tuple[Tensor, bool]] = []
    tensors: Dict[int, Tuple[str, Tensor, Tensor]] = {}
    for root in roots:
        for m in root.modules():
            if id(m) not in seen_m:
                seen_m.add(id(m))
                mods.append((m, m.training))
        for name, p in root.named_parameters(remove_duplicate=True):
            if id(p) in seen_t:
                continue
            seen_t.add(id(p))
            rg.append((p, p.requires_grad))
            if values:
                tensors[id(p)] = (name, p, p.detach().clone())
        for name, b in root.named_buffers(remove_duplicate=True):
            if b is None or id(b) in seen_t:
                continue
            seen_t.add(id(b))
            if values:
                tensors[id(b)] = (name, b, b.detach().clone())
    return ModelSnapshot(mods, rg, tensors)


def snapshot_diff(snap: ModelSnapshot) -> List[str]:
    """What changed since ``snap`` was taken (empty when the modules are bit-identical)."""
    out: List[str] = []
    for m, flag in snap.modules:
        if m.training != flag:
            out.append(f"{type(m).__name__}.training {flag} -> {m.training}")
    for p, flag in snap.requires_grad:
        if p.requires_grad != flag:
            out.append(f"requires_grad {flag} -> {p.requires_grad} on a parameter of shape {tuple(p.shape)}")
    for name, live, copy in snap.tensors.values():
        if live.shape != copy.shape or not torch.equal(live.detach(), copy):
            out.append(f"value of {name}")
    return out


def restore(snap: ModelSnapshot) -> List[str]:
    """Put the modules back to ``snap``; returns what had changed."""
    changed = snapshot_diff(snap)
    if not changed:
        return changed
    for m, flag in snap.modules:
        m.training = flag
    for p, flag in snap.requires_grad:
        p.requires_grad_(flag)
    with torch.no_grad():
        for _, live, copy in snap.tensors.values():
            if live.shape == copy.shape and not torch.equal(live.detach(), copy):
                live.copy_(copy)
    return changed


@contextlib.contextmanager
def preserve_model(models: Union[nn.Module, Iterable[nn.Module]], mode: str = "keep", *,
                   values: bool = True, who: str = "an evaluation") -> Iterator[None]:
    """Run the block with ``models`` in ``mode`` ("eval", "train" or "keep") and leave them exactly
    as they were: flags, ``requires_grad`` and (``values=True``) parameter and buffer values.

    A change made inside the block is undone on exit and logged at INFO level (train-mode forwards
    of spectral normalisation update its buffers: expected when ``mode="train"``)."""
    if mode not in MODEL_MODES:
        raise ConfigError(f"unknown model mode {mode!r}; expected one of {', '.join(MODEL_MODES)}")
    roots = _roots(models)
    snap = model_snapshot(roots, values=values)
    try:
        for m in roots:
            if mode == "eval":
                m.eval()
            elif mode == "train":
                m.train()
        yield
    finally:
        changed = restore(snap)
        if changed and values:
            shown = "; ".join(c for c in changed if c.startswith("value"))[:300]
            if shown:
                logger.info("%s changed the model it looked at; restored (%s)", who, shown)


__all__ = ["MODEL_MODES", "ModelSnapshot", "model_snapshot", "snapshot_diff", "restore", "preserve_model"]
