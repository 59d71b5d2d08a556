"""Save and load models with their config and provenance; safe loading only.

A checkpoint is one file written by ``torch.save`` holding a dict of tensors, plain numbers and
strings only (the model config and the metadata are JSON text), marked ``"robustdeq_format": 1``.
It is read back with ``torch.load(..., weights_only=True)``: a file that would need arbitrary
unpickling is refused, never executed. Writes are atomic (temporary file + ``os.replace``).
"""
from __future__ import annotations

import datetime as _dt
import errno
import io
import json
import logging
import os
import pickle
import platform
import tempfile
import warnings
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
           "load_model", "safe_torch_load", "nonfinite_tensors", "require_finite"]

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
    # serialised in memory first: a failed write is then the operating system's OSError (ENOSPC:
    # "no space left"), not torch's stream writer's "unexpected pos" message
    buf = io.BytesIO()
    torch.save(payload, buf)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on device: cannot write checkpoint {path} "
                                  f"({buf.getbuffer().nbytes:,} bytes); free some space or write "
                                  "elsewhere (the previous checkpoint, if any, is unchanged)") from None
        raise
    logger.info("saved checkpoint %s (%d tensors)", path, len(state_dict))
    return path


_ZIP_MAGIC = b"PK\x03\x04"
#: the legacy (pre-1.6) torch.save format: pickle protocol 2, then a LONG1 magic number
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _pickle_globals(data: bytes, limit: int = 3) -> list[str]:
    """Names of the Python callables/classes a pickle refers to, read without unpickling it."""
    import pickletools

    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if len(names) >= limit:
                break
    except Exception:  # truncated or not a pickle: report what was found so far
        pass
    return names


def _sniff(path: Path, what: str = "checkpoint") -> tuple[str, bytes]:
    """What kind of file ``path`` is, from its first bytes: zip (torch's format), legacy
    (pre-1.6 torch), pickle (plain Python pickle), json, empty or unknown."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not head:
        return "empty", head
    if head.startswith(_ZIP_MAGIC):
        return "zip", head
    if head.startswith(_LEGACY_MAGIC):
        return "legacy", head
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle", head
    if head.lstrip()[:1] in (b"{", b"["):
        return "json", head
    return "unknown", head


def _refused(path: Path, exc: BaseException) -> CheckpointError:
    """The safe loader's refusal, said plainly (never torch's advice to load unsafely)."""
    import re

    msg = str(exc)
    found = re.findall(r"GLOBAL ([\w.]+)", msg)
    if found:
        what = f"it contains code objects ({', '.join(dict.fromkeys(found))})"
    else:
        op = re.search(r"Unsupported operand (\d+)", msg)
        what = ("it holds pickle data the safe loader does not accept"
                + (f" (opcode {op.group(1)})" if op else ""))
    return CheckpointError(
        f"{path} was refused as untrusted: {what}; nothing in it was executed. Not a robustdeq "
        "checkpoint (those hold tensors, numbers and strings only)")


def nonfinite_tensors(obj: nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """``(name, non-finite entries, entries)`` of every floating-point parameter or buffer of a
    module (or tensor of a state dict) holding NaN or infinity."""
    items = obj.state_dict().items() if isinstance(obj, nn.Module) else obj.items()
    out = []
    for name, t in items:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                out.append((name, bad, t.numel()))
    return out


def _nonfinite_message(bad: list[tuple[str, int, int]]) -> str:
    shown = ", ".join(f"{n!r} ({k} of {m} entries)" for n, k, m in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"non-finite (NaN or infinite) values in {shown}{more}"


def require_finite(model: nn.Module, what: str = "the model") -> None:
    """:class:`~robustdeq.errors.InputError` naming the tensors if a parameter or buffer of
    ``model`` holds NaN or infinity (its outputs would be meaningless: no evaluation or
    certificate is computed from them)."""
    bad = nonfinite_tensors(model)
    if bad:
        from .errors import InputError
        raise InputError(f"{what} has {_nonfinite_message(bad)}; its outputs would be meaningless "
                         "(a diverged training?)")


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: Any = "cpu"
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` with torch's safe loader.

    Raises:
        CheckpointError: the file is missing, empty, not a torch file (JSON, a plain Python
            pickle, random bytes), truncated/corrupted, refused by the safe loader (it refers to
            Python code or classes, which are never executed), foreign (no robustdeq marker), of
            an unsupported format version, or holding weights with NaN or infinity (named).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    obj = safe_torch_load(path, map_location=map_location)
    ck = _parse(path, obj)
    bad = nonfinite_tensors(ck.state_dict)
    if bad:
        raise CheckpointError(f"{path} holds {_nonfinite_message(bad)}: refused (a diverged "
                              "training? resume from an earlier checkpoint or retrain)")
    return ck


def _check_map_location(map_location: Any) -> None:
    """ConfigError for a ``map_location`` naming no device of this machine (torch's error would
    read as a corrupted file); mappings and callables are torch's to check."""
    if not isinstance(map_location, (str, torch.device)):
        return
    from .errors import ConfigError
    try:
        dev = torch.device(map_location)
    except (RuntimeError, ValueError):
        raise ConfigError(f"map_location {map_location!r} is not a device; expected e.g. 'cpu' or "
                          "'cuda:0'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"map_location {map_location!r}: CUDA is not available on this machine (use 'cpu')")


def safe_torch_load(path: str | os.PathLike[str], *, map_location: Any = "cpu",
                    what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with a :class:`CheckpointError` that says what the
    file is (empty, JSON, plain pickle, random bytes, truncated, refers to code) instead of torch's
    message, which advises unsafe loading. ``what`` names the kind of file in the messages."""
    path = Path(path)
    a_what = ("an " if what[:1] in "aeiou" else "a ") + what
    _check_map_location(map_location)
    kind, head = _sniff(path, what)
    if kind == "empty":
        raise CheckpointError(f"{path} is empty (0 bytes): not {a_what} (an interrupted copy?)")
    if kind == "json":
        raise CheckpointError(f"{path} is a JSON text file, not {a_what} (robustdeq writes torch files)")
    if kind == "unknown":
        raise CheckpointError(f"{path} is not {a_what}: it is neither a torch file nor a pickle "
                              f"(it starts with bytes {head[:8].hex(' ')})")
    if kind == "pickle":
        code = _pickle_globals(path.read_bytes())
        if code:
            raise CheckpointError(
                f"{path} is a plain Python pickle that contains code objects ({', '.join(code)}): "
                "refused, nothing in it was executed. robustdeq checkpoints are torch files "
                "written by save_checkpoint")
        raise CheckpointError(f"{path} is a plain Python pickle, not a torch checkpoint: refused "
                              "unread (robustdeq checkpoints are torch files written by save_checkpoint)")
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupted: the torch (zip) archive is "
                              "incomplete (an interrupted download or copy?)")
    try:
        with warnings.catch_warnings():
            # torch's note on pickle protocols asks to file an issue with torch: not the user's
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "weights_only" in msg:
            raise _refused(path, exc) from None
        raise CheckpointError(f"{path} is truncated or corrupted (unreadable pickle data)") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, zipfile.BadZipFile, pickle.PickleError) as exc:
        first = str(exc).splitlines()[0].split(". ")[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is truncated or corrupted ({first})"
        ) from None
    return obj


def _parse(path: Path, obj: Any) -> Checkpoint:
    """Validate the payload of a robustdeq checkpoint."""
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
