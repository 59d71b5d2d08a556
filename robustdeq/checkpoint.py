"""Save and load models with their config and provenance; safe loading only.

A checkpoint is one file written by ``torch.save`` holding a dict of tensors, plain numbers and
strings only (the model config and the metadata are JSON text), marked ``"robustdeq_format": 1``.
It is read back with ``torch.load(..., weights_only=True)``: a file that would need arbitrary
unpickling is refused, never executed. Writes are atomic (temporary file + ``os.replace``).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import pickle
import platform
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "FORMAT_KEY", "Checkpoint", "save_checkpoint", "load_checkpoint",
           "load_model"]

FORMAT_KEY = "robustdeq_format"
FORMAT_VERSION = 1
_SCALARS = (bool, int, float, str, type(None))


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    state_dict: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    metadata: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    extra_state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _versions() -> dict[str, str]:
    try:
        from . import __version__ as rd_version
    except ImportError:  # pragma: no cover - package always defines it
        rd_version = "unknown"
    return {"robustdeq": str(rd_version), "torch": torch.__version__,
            "python": platform.python_version()}


def _check_safe(obj: Any, where: str) -> None:
    """Raise CheckpointError unless ``obj`` holds only tensors, plain scalars and containers."""
    if isinstance(obj, (torch.Tensor, *_SCALARS)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} must be str or int, got {type(k).__name__}")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} holds a {type(obj).__name__}; checkpoints may only contain tensors, numbers, "
        "strings, None and lists/dicts of those (so that they load with weights_only=True)"
    )


def _to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} is not JSON-serialisable: {exc}") from exc


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    model_config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights, its config and metadata to ``path`` atomically.

    Args:
        path: destination file (parent folders are created).
        model: a module (its ``state_dict()`` is saved) or a state dict.
        model_config: JSON-serialisable; :func:`load_model` rebuilds the model from
            ``model_config["name"]`` and ``model_config.get("options", {})``.
        metadata: JSON-serialisable; ``versions`` (robustdeq, torch, python) and ``created``
            (UTC ISO timestamp) are added.
        optimizer: an optimizer or its state dict (tensors and numbers only).
        extra_state: tensors, numbers, strings and lists/dicts of those.

    Returns:
        The path written.
    """
    path = Path(path)
    if not isinstance(model_config, Mapping):
        raise CheckpointError(f"model_config must be a dict, got {type(model_config).__name__}")
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state, Mapping):
        raise CheckpointError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
    state_dict: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        state_dict[str(k)] = v.detach().cpu()

    meta = dict(metadata or {})
    meta["versions"] = _versions()
    meta["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    payload: dict[str, Any] = {
        FORMAT_KEY: FORMAT_VERSION,
        "state_dict": state_dict,
        "model_config": _to_json(dict(model_config), "model_config"),
        "metadata": _to_json(meta, "metadata"),
    }
    if optimizer is not None:
        opt_state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else dict(optimizer)
        _check_safe(opt_state, "optimizer state")
        payload["optimizer_state"] = opt_state
    if extra_state:
        _check_safe(extra_state, "extra_state")
        payload["extra_state"] = dict(extra_state)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    logger.info("saved checkpoint %s (%d tensors)", path, len(state_dict))
    return path


def _loader_detail(exc: BaseException) -> str:
    """The informative line(s) of torch's weights_only refusal message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines[1:] if not ln.startswith(("Check the documentation", "Please file"))]
    if not lines:
        return type(exc).__name__
    return " ".join(keep)[:300] or lines[0][:300]


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: Any = "cpu"
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` with torch's safe loader.

    Raises:
        CheckpointError: the file is missing, truncated/corrupted, refused by the safe loader
            (it contains pickled objects), foreign (no robustdeq marker) or of an unsupported
            format version.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "weights_only" in msg:
            raise CheckpointError(
                f"{path} was refused as untrusted by torch's safe loader (weights_only=True): it "
                f"contains pickled objects other than tensors and plain containers, which are "
                f"never executed. Not a robustdeq checkpoint. Loader detail: {_loader_detail(exc)}"
            ) from exc
        raise CheckpointError(f"{path} is corrupted or not a torch file: {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, zipfile.BadZipFile, pickle.PickleError) as exc:
        first = str(exc).splitlines()[0].split(". ")[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is unreadable: truncated, corrupted or not a torch file ({first})"
        ) from exc

    if not isinstance(obj, dict) or FORMAT_KEY not in obj:
        raise CheckpointError(
            f"{path} is a torch file but not a robustdeq checkpoint (no {FORMAT_KEY!r} marker); "
            "save models with robustdeq.checkpoint.save_checkpoint"
        )
    version = obj[FORMAT_KEY]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has robustdeq checkpoint format {version!r}; this robustdeq reads format "
            f"{FORMAT_VERSION} only" + (" (written by a newer robustdeq?)"
                                        if isinstance(version, int) and version > FORMAT_VERSION
                                        else "")
        )

    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise CheckpointError(f"{path}: 'state_dict' is missing or holds non-tensors (corrupted)")
    parsed: dict[str, Any] = {}
    for key in ("model_config", "metadata"):
        text = obj.get(key)
        if not isinstance(text, str):
            raise CheckpointError(f"{path}: {key!r} is missing or not JSON text (corrupted)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: {key!r} is not valid JSON (corrupted): {exc}") from exc
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {key!r} must be a JSON object, got {type(value).__name__}")
        parsed[key] = value
    opt_state = obj.get("optimizer_state")
    extra = obj.get("extra_state") or {}
    if opt_state is not None and not isinstance(opt_state, dict):
        raise CheckpointError(f"{path}: 'optimizer_state' is not a dict (corrupted)")
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: 'extra_state' is not a dict (corrupted)")
    logger.debug("loaded checkpoint %s (%d tensors)", path, len(state_dict))
    return Checkpoint(state_dict=state_dict, model_config=parsed["model_config"],
                      metadata=parsed["metadata"], optimizer_state=opt_state, extra_state=extra,
                      path=path)


def _default_builder(name: str, **options: Any) -> nn.Module:
    from .deq import zoo  # lazy: the zoo imports the whole backbone

    return zoo.build(name, **options)


def _preview(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_model(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    builder: Callable[..., nn.Module] | None = None,
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild a model from a checkpoint and load its weights strictly.

    The model is built with ``builder(cfg["name"], **cfg.get("options", {}))`` (default
    ``robustdeq.deq.zoo.build``), moved to ``map_location`` and put in eval mode.

    Returns:
        ``(model, checkpoint)``.

    Raises:
        CheckpointError: any :func:`load_checkpoint` error, a config without ``name``, a model
            that cannot be built, missing/unexpected keys or mismatched shapes.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    cfg = ckpt.model_config
    name = cfg.get("name")
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: model_config has no 'name' (got keys {sorted(cfg)})")
    options = cfg.get("options", {}) or {}
    if not isinstance(options, dict):
        raise CheckpointError(f"{path}: model_config['options'] must be a dict")
    build = builder if builder is not None else _default_builder
    try:
        model = build(name, **options)
    except (ValueError, TypeError, KeyError) as exc:  # ConfigError is a ValueError
        raise CheckpointError(
            f"{path}: cannot rebuild model {name!r} with options {options}: {exc}"
        ) from exc
    expected = set(model.state_dict().keys())
    got = set(ckpt.state_dict.keys())
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        raise CheckpointError(
            f"{path}: weights do not match model {name!r} ({'; '.join(parts)})"
        )
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {name!r}: {exc}") from exc
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, ckpt
