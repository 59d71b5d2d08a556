"""``EvalConfig``: the settings of one :func:`robustdeq.eval.evaluate` call, typed and checked.

``evaluate(model, x, y, config=EvalConfig(eps=0.1, suite="quick"))`` and
``evaluate(model, x, y, eps=0.1, suite="quick")`` are the same call: the keywords build (or
override the fields of) an :class:`EvalConfig`; an unknown key is a
:class:`~robustdeq.errors.ConfigError` naming the known ones.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Tuple, Union

from ..config import Norm, strict_init, from_dict, to_dict
from ..errors import ConfigError


@strict_init
@dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation (see :func:`robustdeq.eval.evaluate` for each one's meaning).

    ``threat`` accepts ``"Linf"`` / ``"L2"`` or a :class:`~robustdeq.config.Norm` and is stored as
    the enum (which compares equal to its string); ``eps`` (required) is stored as a tuple of
    distinct floats > 0; ``check_config`` accepts a :class:`~robustdeq.eval.checks.CheckConfig` or
    a mapping of its options.
    """

    eps: Any = None                        # one radius or a sequence (required)
    threat: Norm = Norm.LINF
    suite: Any = "quick"                   # a suite name or a list of attacks
    steps: int = 20
    seed: int = 0
    batch_size: int = 128
    out_dir: Any = None                    # str | Path | None
    resume: bool = True
    progress: bool = False
    checks: bool = True
    check_config: Any = None               # CheckConfig | mapping | None (the defaults)
    tensorboard: Any = False               # bool | str | Path
    cascade: bool = False
    callback: Any = None                   # callable(dict) | None
    transfer_from: Any = None              # nn.Module | {name: nn.Module} | None
    certify: Any = None                    # the robustness bracket (robustdeq.eval.bracket)

    def __post_init__(self):
        object.__setattr__(self, "eps", _eps_tuple(self.eps))
        if isinstance(self.suite, list):  # a list of attacks is kept as a tuple (hashable, round trips)
            object.__setattr__(self, "suite", tuple(self.suite))
        for name, lo in (("steps", 1), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if not isinstance(self.cascade, bool):
            raise ConfigError(f"cascade must be a bool, got {self.cascade!r}")
        if self.tensorboard and self.out_dir is None and not isinstance(self.tensorboard, (str, _PathLike)):
            raise ConfigError("tensorboard=True needs out_dir (or pass a log folder as tensorboard=...)")
        object.__setattr__(self, "check_config", _check_config(self.check_config))
        if self.callback is not None and not callable(self.callback):
            raise ConfigError(f"callback must be callable(dict) or None, got {type(self.callback).__name__}")

    @property
    def norm(self) -> str:
        """The threat model's norm as a string ("Linf" or "L2"), as reports write it."""
        return self.threat.value

    def replace(self, **changes) -> "EvalConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The settings as a dict (enums as strings, ``check_config`` as a dict; objects such as
        ``callback`` or ``transfer_from`` as they are): ``from_dict(EvalConfig, d)`` rebuilds it."""
        return to_dict(self)


try:  # os.PathLike covers pathlib paths without importing pathlib here
    from os import PathLike as _PathLike
except ImportError:  # pragma: no cover
    _PathLike = str


def _eps_tuple(eps: Any) -> Tuple[float, ...]:
    if eps is None:
        raise ConfigError("eps is required: a positive number or a non-empty list of them")
    eps_list = [eps] if not isinstance(eps, (list, tuple)) else list(eps)
    if not eps_list:
        raise ConfigError("eps must be a positive number or a non-empty list of them")
    out = []
    for e in eps_list:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
            raise ConfigError(f"eps values must be finite numbers > 0, got {e!r}")
        out.append(float(e))
    if len(set(out)) != len(out):
        raise ConfigError(f"eps values must be distinct, got {out}")
    return tuple(out)


def _check_config(value: Any):
    from .checks import CheckConfig
    if value is None:
        return CheckConfig()
    if isinstance(value, Mapping):
        return from_dict(CheckConfig, value)
    if not isinstance(value, CheckConfig):
        raise ConfigError(f"check_config must be a CheckConfig, got {type(value).__name__}")
    return value


def make_eval_config(config: Union[EvalConfig, Mapping[str, Any], None] = None, **options) -> EvalConfig:
    """A :class:`EvalConfig` from an instance or a mapping, with ``options`` overriding its
    fields; unknown keys raise :class:`ConfigError` (:func:`robustdeq.config.make_config`)."""
    from ..config import make_config
    return make_config(EvalConfig, config, **options)


__all__ = ["EvalConfig", "make_eval_config"]
