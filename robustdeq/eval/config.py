"""The settings of one :func:`robustdeq.eval.evaluate` call, typed and checked, in two parts:

- :class:`EvalProtocol`: what determines the numbers (threat model, radii, suite, steps, seed,
  batch size, cascade). Frozen and hashable; with the model's and data's hashes and the attack
  units it makes the report's configuration hash, so two evaluations under equal protocols of the
  same model on the same data report the same numbers, and a resumed one reuses only such units.
- :class:`RunOptions`: how the run is carried out and what else it reports (output folder,
  resume, progress, checks, TensorBoard, callback, transfer sources, the certified bracket).
  Transfer sources add attack units; the hash covers them through the unit list and the sources'
  parameter hashes.

``evaluate(model, x, y, eps=0.1, suite="quick", out_dir=...)`` takes the fields of both as
keywords (:func:`split_options`); an unknown key is a :class:`~robustdeq.errors.ConfigError`
naming the known ones.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from ..config import Norm, SolverConfig, check_radii, from_dict, strict_init, to_dict
from ..errors import ConfigError, reject_unknown


@strict_init
@dataclass(frozen=True)
class EvalProtocol:
    """What determines an evaluation's numbers (see :func:`robustdeq.eval.evaluate`).

    ``eps`` (required: one radius or a sequence) is stored as a tuple of distinct floats > 0;
    ``threat`` accepts ``"Linf"`` / ``"L2"`` or a :class:`~robustdeq.config.Norm` and is stored as
    the enum (equal to its string); ``suite`` is a registered suite's name or a tuple of attacks
    (names, :class:`~robustdeq.eval.AttackSpec`, named factories). ``batch_size`` belongs here:
    an attack draws its random starts for a whole batch, so the batching changes the examples.
    """

    eps: Tuple[float, ...] = ()
    threat: Norm = Norm.LINF
    suite: Union[str, Tuple[Any, ...]] = "quick"
    steps: int = 20
    seed: int = 0
    batch_size: int = 128
    cascade: bool = False
    solver: Optional[SolverConfig] = None

    def __post_init__(self):
        if self.solver is not None:
            object.__setattr__(self, "solver", from_dict(SolverConfig, self.solver))
        object.__setattr__(self, "eps", check_radii(self.eps, "eps", positive=True, distinct=True, required=True))
        if isinstance(self.suite, list):  # a list of attacks is kept as a tuple (hashable)
            object.__setattr__(self, "suite", tuple(self.suite))
        for name, lo in (("steps", 1), ("batch_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if not isinstance(self.cascade, bool):
            raise ConfigError(f"cascade must be a bool, got {self.cascade!r}")

    @property
    def norm(self) -> str:
        """The threat model's norm as a string ("Linf" or "L2"), as reports write it."""
        return self.threat.value

    def fingerprint(self, suite_label: Any = None) -> Dict[str, Any]:
        """The protocol as JSON data for the configuration hash; ``suite_label``: the suite as
        the report names it (the names of a list's attacks), default ``suite``."""
        return {"threat": self.norm, "eps": list(self.eps), "steps": self.steps, "seed": self.seed,
                "batch_size": self.batch_size, "cascade": self.cascade,
                "suite": self.suite if suite_label is None else suite_label,
                **({"solver": to_dict(self.solver)} if self.solver is not None else {})}

    def replace(self, **changes) -> "EvalProtocol":
        """A copy with the fields ``changes`` replaced, checked again (an unknown field or a bad
        value is a ``ConfigError``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The protocol as a dict (the enum as its string): ``from_dict(EvalProtocol, d)`` rebuilds it."""
        return to_dict(self)


@strict_init
@dataclass(frozen=True)
class RunOptions:
    """How an evaluation runs and what it reports besides the numbers (see
    :func:`robustdeq.eval.evaluate`). ``check_config`` accepts a
    :class:`~robustdeq.eval.checks.CheckConfig` or a mapping of its options; ``out_dir`` and a
    ``tensorboard`` folder are stored as paths."""

    out_dir: Optional[Path] = None
    resume: bool = True
    progress: bool = False
    checks: bool = True
    check_config: Any = None                                   # CheckConfig (a mapping or None: built)
    tensorboard: Union[bool, Path] = False
    callback: Optional[Callable[[dict], None]] = None
    transfer_from: Any = None                                  # nn.Module | {name: nn.Module} | None
    certify: Union[None, bool, str, Tuple[str, ...], Mapping[str, Any]] = None  # the bracket

    def __post_init__(self):
        if self.out_dir is not None:
            if not isinstance(self.out_dir, (str, os.PathLike)):
                raise ConfigError(f"out_dir must be a folder path or None, got {type(self.out_dir).__name__}")
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        for name in ("resume", "progress", "checks"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.tensorboard, (str, os.PathLike)):
            object.__setattr__(self, "tensorboard", Path(self.tensorboard))
        elif not isinstance(self.tensorboard, bool):
            raise ConfigError(f"tensorboard must be a bool or a log folder, got {self.tensorboard!r}")
        elif self.tensorboard and self.out_dir is None:
            raise ConfigError("tensorboard=True needs out_dir (or pass a log folder as tensorboard=...)")
        object.__setattr__(self, "check_config", _check_config(self.check_config))
        if self.callback is not None and not callable(self.callback):
            raise ConfigError(f"callback must be callable(dict) or None, got {type(self.callback).__name__}")
        if isinstance(self.certify, list):
            object.__setattr__(self, "certify", tuple(self.certify))

    def replace(self, **changes) -> "RunOptions":
        """A copy with the fields ``changes`` replaced, checked again (an unknown field or a bad
        value is a ``ConfigError``)."""
        return dataclasses.replace(self, **changes)


PROTOCOL_FIELDS = tuple(f.name for f in dataclasses.fields(EvalProtocol))
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))


def _check_config(value: Any):
    from .checks import CheckConfig
    if value is None:
        return CheckConfig()
    if isinstance(value, Mapping):
        return from_dict(CheckConfig, value)
    if not isinstance(value, CheckConfig):
        raise ConfigError(f"check_config must be a CheckConfig, got {type(value).__name__}")
    return value


def split_options(config: Union[EvalProtocol, Mapping[str, Any], None] = None,
                  **options: Any) -> Tuple[EvalProtocol, RunOptions]:
    """The protocol and the run options of one :func:`~robustdeq.eval.evaluate` call: ``config``
    (an :class:`EvalProtocol`, or a mapping of fields of either) with the keyword ``options``
    (fields of either) overriding it; an unknown key is a :class:`ConfigError`."""
    if isinstance(config, EvalProtocol):
        base: Dict[str, Any] = {f: getattr(config, f) for f in PROTOCOL_FIELDS}
    elif config is None:
        base = {}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"config must be an EvalProtocol or a mapping, got {type(config).__name__}")
    merged = {**base, **options}
    reject_unknown(merged, PROTOCOL_FIELDS + RUN_FIELDS, "evaluate")
    protocol = EvalProtocol(**{k: v for k, v in merged.items() if k in PROTOCOL_FIELDS})
    run = RunOptions(**{k: v for k, v in merged.items() if k in RUN_FIELDS})
    return protocol, run


__all__ = ["EvalProtocol", "RunOptions", "split_options", "PROTOCOL_FIELDS", "RUN_FIELDS"]
