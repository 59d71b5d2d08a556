"""Typed configuration: frozen dataclasses and enums.

Every config class accepts a mapping through :func:`from_dict`, which rejects unknown keys and
coerces enum values from strings, so a typo such as ``stop_mode`` vs ``f_stop_mode`` is an error
rather than silently ignored (a trap of other DEQ libraries).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Tuple, Type, TypeVar, Union

from .errors import ConfigError, reject_unknown

T = TypeVar("T")


class StopMode(str, enum.Enum):
    """How the residual ``||f(z) - z||`` is compared to the tolerance."""

    ABS = "abs"
    REL = "rel"


class Select(str, enum.Enum):
    """Which iterate a solve returns: the lowest-residual one, or the last one evaluated."""

    BEST = "best"
    LAST = "last"


class SolverName(str, enum.Enum):
    """The built-in solvers. A solver added with :func:`robustdeq.deq.solvers.register_solver`
    is named by a :class:`RegisteredSolverName` instead (a ``str`` with the same ``.value``)."""

    FIXED_POINT = "fixed_point"
    ANDERSON = "anderson"
    BROYDEN = "broyden"


class RegisteredSolverName(str):
    """The name of a registered (not built-in) solver: a plain ``str`` that, like a
    :class:`SolverName`, offers ``.value`` (itself), so ``config.name.value`` works for both."""

    @property
    def value(self) -> str:
        """The name itself, as a plain ``str``."""
        return str(self)


def solver_name(value: Any, what: str = "SolverConfig.name") -> "SolverName | RegisteredSolverName":
    """``value`` as a :class:`SolverName` (built-in) or a :class:`RegisteredSolverName` (a name
    in :data:`robustdeq.registry.SOLVERS`); a ConfigError naming the known solvers otherwise."""
    if isinstance(value, (SolverName, RegisteredSolverName)):
        return value
    if isinstance(value, str):
        try:
            return SolverName(value)
        except ValueError:
            pass
        from .registry import SOLVERS
        if value in SOLVERS:
            return RegisteredSolverName(value)
        raise ConfigError(f"unknown solver {value!r} ({what}); known solvers: {', '.join(SOLVERS.names())}")
    raise ConfigError(f"{what} must be a solver name (str), got {type(value).__name__} {value!r}")


class Norm(str, enum.Enum):
    """Threat model norm."""

    LINF = "Linf"
    L2 = "L2"


def coerce_enum(enum_cls: Type[enum.Enum], value: Any, name: str) -> enum.Enum:
    """Return ``enum_cls(value)`` or raise a :class:`ConfigError` listing the allowed values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"unknown {name} {value!r}; expected one of {allowed}") from None


def _check_type(cls_name: str, fname: str, ftype: Any, value: Any) -> Any:
    origin = typing.get_origin(ftype)
    if isinstance(ftype, type) and issubclass(ftype, enum.Enum):
        return coerce_enum(ftype, value, f"{cls_name}.{fname}")
    if ftype is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if ftype is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if ftype is bool and isinstance(value, bool):
        return value
    if ftype is str and isinstance(value, str):
        return value
    if ftype in (int, float, bool, str):
        raise ConfigError(
            f"{cls_name}.{fname} must be {ftype.__name__}, got {type(value).__name__} {value!r}")
    if origin is typing.Union:  # Optional[...] and unions: accept None or any member
        args = typing.get_args(ftype)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(cls_name, fname, a, value)
            except ConfigError as e:  # try the next member
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (tuple, list) and isinstance(value, (tuple, list)):
        return tuple(value) if origin is tuple else list(value)
    return value


def from_dict(cls: Type[T], data: Mapping[str, Any] | T | None) -> T:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    reject_unknown(data, fields, cls.__name__)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(cls.__name__, k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def make_config(cls: Type[T], config: Any = None, **options) -> T:
    """A ``cls`` instance from an instance or a mapping (or None: the defaults), with ``options``
    overriding its fields; unknown keys raise :class:`ConfigError`."""
    if isinstance(config, cls):
        return dataclasses.replace(config, **options) if options else config
    if config is None:
        return cls(**options)
    if isinstance(config, Mapping):
        return from_dict(cls, {**config, **options})
    raise ConfigError(f"config must be a {cls.__name__} or a mapping, got {type(config).__name__}")


def strict_init(cls: Type[T]) -> Type[T]:
    """Make the dataclass constructor reject unknown options and wrong types with a
    :class:`ConfigError` (the generated ``__init__`` raises a bare ``TypeError``)."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    hints: dict = {}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if len(args) > len(names):
            raise ConfigError(f"{cls.__name__} takes at most {len(names)} positional options "
                              f"({', '.join(names)}), got {len(args)}")
        reject_unknown(kwargs, names, cls.__name__)
        given = dict(zip(names, args))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise ConfigError(f"{cls.__name__} got option(s) {', '.join(twice)} twice")
        given.update(kwargs)
        if not hints:
            hints.update(typing.get_type_hints(cls))
        init(self, **{k: _check_type(cls.__name__, k, hints[k], v) for k, v in given.items()})

    cls.__init__ = __init__
    return cls


def to_dict(obj: Any) -> dict:
    """A JSON-friendly dict of a config dataclass (enums become their values)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, enum.Enum):
            v = v.value
        elif isinstance(v, str):
            v = str(v)  # a str subclass (RegisteredSolverName) becomes a plain string
        elif dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)  # SolverOptions -> a plain dict
        out[f.name] = v
    return out


class SolverOptions(dict):
    """The options of one solver (:attr:`SolverConfig.options`): a read-only, hashable dict."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))

    def _read_only(self, *args, **kwargs):
        raise TypeError("SolverConfig.options is read-only; use config.replace(options={...})")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _read_only  # type: ignore

    def __reduce__(self):
        return (SolverOptions, (dict(self),))


def _solver_options(cfg: "SolverConfig") -> SolverOptions:
    """``cfg.options`` checked against the options its solver declares (``Solver.OPTIONS``)."""
    options = cfg.options
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ConfigError(f"SolverConfig.options must be a mapping of option names to values, got {options!r}")
    if options:
        from .registry import SOLVERS  # the solver's class (imports the backbone only when options are given)
        solver = SOLVERS.get(cfg.name.value)
        declared = getattr(solver, "OPTIONS", {})
        reject_unknown(options, declared, f"solver {cfg.name.value!r} (SolverConfig.options)")
        check = getattr(solver, "check_options", None)
        if callable(check):
            check(dict(options))
    return SolverOptions(options)


@strict_init
@dataclass(frozen=True)
class SolverConfig:
    """Settings of a fixed-point solve (forward or adjoint).

    Defaults: Anderson, memory 5, lambda 1e-4, relative tolerance 1e-3,
    30 iterations, return the lowest-residual iterate.

    ``options``: settings of the named solver beyond the common fields, for a registered solver
    that declares them (``Solver.OPTIONS``, name -> default; ``Solver.check_options`` validates
    the values). An option the solver does not declare is a ConfigError; the built-in solvers
    take their settings from the fields below and declare none.
    """

    name: Union[SolverName, str] = SolverName.ANDERSON  # a built-in, or a registered solver's name
    max_iter: int = 30          # evaluations of f at most: iterates z_0 .. z_{max_iter-1} (solvers' docstring)
    tol: float = 1e-3
    stop_mode: StopMode = StopMode.REL
    select: Select = Select.BEST
    damping: float = 1.0        # fixed-point iteration: z <- (1 - tau) z + tau f(z)
    m: int = 5                   # Anderson memory
    lam: float = 1e-4            # Anderson regularisation
    beta: float = 1.0            # Anderson mixing
    safeguard: float = 1.0       # Anderson: restart a sample when an extrapolated ||g_k|| > safeguard min_j ||g_j|| (0: off)
    memory: int = 0              # Broyden low-rank memory (0: max_iter)
    eps: float = 1e-9            # denominator guard of the relative residual
    divergence_factor: float = 1e6  # residual > factor * initial residual counts as divergence
    options: Mapping[str, Any] = field(default_factory=SolverOptions)

    def __post_init__(self):
        object.__setattr__(self, "name", solver_name(self.name))
        object.__setattr__(self, "options", _solver_options(self))
        for name, enum_cls in (("stop_mode", StopMode), ("select", Select)):
            object.__setattr__(self, name, coerce_enum(enum_cls, getattr(self, name),
                                                       f"SolverConfig.{name}"))
        if self.max_iter < 1:
            raise ConfigError(f"SolverConfig.max_iter must be >= 1, got {self.max_iter}")
        if not self.tol >= 0:
            raise ConfigError(f"SolverConfig.tol must be >= 0, got {self.tol}")
        if not 0 < self.damping <= 1:
            raise ConfigError(f"SolverConfig.damping must be in (0, 1], got {self.damping}")
        if self.m < 1:
            raise ConfigError(f"SolverConfig.m must be >= 1, got {self.m}")
        if self.lam < 0:
            raise ConfigError(f"SolverConfig.lam must be >= 0, got {self.lam}")
        if not 0 < self.beta <= 1:
            raise ConfigError(f"SolverConfig.beta must be in (0, 1], got {self.beta}")
        if not self.safeguard >= 0:
            raise ConfigError(f"SolverConfig.safeguard must be >= 0 (0 turns it off), got {self.safeguard}")
        if self.memory < 0:
            raise ConfigError(f"SolverConfig.memory must be >= 0, got {self.memory}")

    def replace(self, **changes) -> "SolverConfig":
        """A copy with the fields ``changes`` replaced, checked again (an unknown field or a bad
        value is a ``ConfigError``)."""
        return from_dict(SolverConfig, {**to_dict(self), **changes})


BACKWARD_DEFAULT = SolverConfig(max_iter=30, tol=1e-6)

_DEVICE = __import__("re").compile(r"^(cpu|mps|cuda(:\d+)?)$")


@strict_init
@dataclass(frozen=True)
class TrainConfig:
    """Settings of the trainer."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    grad_clip: float = 0.0
    seed: int = 0
    log_every: int = 10
    device: Union[str, None] = None  # "cpu", "cuda", "cuda:K", "mps"; None: where the model is

    def __post_init__(self):
        if self.device is not None and not _DEVICE.match(str(self.device)):
            raise ConfigError(f"TrainConfig.device must be 'cpu', 'cuda', 'cuda:K' or 'mps' (or None: "
                              f"where the model is), got {self.device!r}")
        if self.epochs < 1:  # 0 epochs would train nothing and return an empty history
            raise ConfigError(f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"TrainConfig.lr (learning rate) must be a finite number > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"TrainConfig.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.optimizer not in ("adam", "sgd", "adamw"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; expected 'adam', 'adamw' or 'sgd'")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; expected 'cosine' or 'constant'")


def check_radius(value: Any, name: str = "eps", *, positive: bool = False) -> float:
    """One radius of a threat model (an attack's eps, a certified radius) as a float: a real
    number (not a bool) that is finite and >= 0, or > 0 with ``positive``. Anything else is a
    :class:`ConfigError` naming ``name``. Every radius the package takes is checked by this rule."""
    import numbers
    op = ">" if positive else ">="
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
            or float(value) < 0 or (positive and float(value) == 0)):
        raise ConfigError(f"{name} must be a finite number {op} 0, got {value!r}")
    return float(value)


def check_radii(values: Any, name: str = "eps", *, positive: bool = False, distinct: bool = False,
                required: bool = False) -> Tuple[float, ...]:
    """``values`` (None, one radius or a sequence of them) as a tuple of floats, each checked by
    :func:`check_radius`; ``required``: at least one; ``distinct``: no value twice."""
    if values is None or (isinstance(values, (list, tuple)) and not values):
        if required:
            raise ConfigError(f"{name} is required: a number {'>' if positive else '>='} 0 or a non-empty "
                              "list of them")
        return ()
    seq = list(values) if isinstance(values, (list, tuple)) else [values]
    out = tuple(check_radius(v, name, positive=positive) for v in seq)
    if distinct and len(set(out)) != len(out):
        raise ConfigError(f"{name} values must be distinct, got {list(out)}")
    return out


__all__ = [
    "check_radius", "check_radii",
    "StopMode", "Select", "SolverName", "RegisteredSolverName", "solver_name", "Norm", "SolverConfig", "SolverOptions",
    "TrainConfig", "BACKWARD_DEFAULT",
    "from_dict", "to_dict", "make_config", "coerce_enum", "strict_init", "field",
]
