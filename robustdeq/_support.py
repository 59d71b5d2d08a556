"""Small helpers shared across robustdeq: warnings that point at the user's call, progress
reports from inside long units of work, JSON figures without float32 noise and plain-text tables.

Nothing here imports torch: the command line's start-up stays fast.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import struct
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _internal_prefixes() -> tuple:
    prefixes = [_PACKAGE_DIR]
    for name in ("torch", "torchattacks", "pyautoattack"):
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None) if mod is not None else None
        if path:
            prefixes.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(prefixes)


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first frame outside robustdeq
    (and torch, torchattacks, pyautoattack, which call back into models): the user's call.

    Call it from the function that calls ``warnings.warn``. When no such frame exists (a hook run
    by a thread of the autograd engine), the level of the caller itself is returned.
    """
    prefixes = _internal_prefixes()
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(prefixes) and not filename.startswith("<frozen "):
            return level
        frame = frame.f_back
        level += 1
    return 1


# -- progress ----------------------------------------------------------------------------------------
_REPORTER: contextvars.ContextVar[Optional[Callable[[Dict[str, Any]], None]]] = \
    contextvars.ContextVar("robustdeq_progress", default=None)


@contextlib.contextmanager
def progress_reporter(fn: Callable[[Dict[str, Any]], None]) -> Iterator[None]:
    """Within the block, long units of work call ``fn(status)`` as they advance.

    ``status`` holds ``stage`` (e.g. ``"apgd-t"``), ``done`` and ``total`` (samples).
    """
    token = _REPORTER.set(fn)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def report_progress(**status: Any) -> None:
    """Tell the active :func:`progress_reporter` (if any) where a long unit of work stands."""
    fn = _REPORTER.get()
    if fn is not None:
        fn(status)


# -- JSON figures ------------------------------------------------------------------------------------
def _f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def tidy_float(value: float, digits: int = 6) -> float:
    """``value`` without float32 noise: a float that is exactly a float32 (``float(tensor)`` of a
    float32 tensor, e.g. 0.9800000190734863) is rounded to ``digits`` significant digits (0.98).
    Other floats (float64 results such as eps = 8/255) and non-finite values are unchanged."""
    if not math.isfinite(value) or value == 0.0:
        return value
    try:
        if _f32(value) != value:
            return value
    except OverflowError:  # beyond float32's range: not a float32
        return value
    return float(f"{value:.{digits}g}")


def round_floats(obj: Any, digits: int = 6) -> Any:
    """``obj`` with every float rounded to ``digits`` significant digits (recursively through
    dicts, lists and tuples, which become lists); for JSON summaries written for people."""
    if isinstance(obj, bool) or isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def text_table(rows: List[List[Any]], header: List[str]) -> str:
    """``rows`` under ``header`` as a Markdown table with padded columns."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


__all__ = ["user_stacklevel", "progress_reporter", "report_progress", "round_floats", "tidy_float", "text_table"]
