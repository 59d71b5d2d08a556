"""``CertifyConfig``: the settings of one :func:`robustdeq.certify.certify` call, typed and checked.

``certify(model, x, y, config=CertifyConfig(eps_l2=0.5))`` and ``certify(model, x, y, eps_l2=0.5)``
are the same call: the keywords build (or override the fields of) a :class:`CertifyConfig`; an
unknown key is a :class:`~robustdeq.errors.ConfigError` naming the known ones.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Union

from ..config import check_radii, strict_init, to_dict
from ..errors import ConfigError

METHODS = ("contraction", "local", "lyapunov", "lipschitz", "ibp")
LYAPUNOV_DYNAMICS = ("iteration", "solver", "stable_map")


@strict_init
@dataclass(frozen=True)
class CertifyConfig:
    """Settings of a certification (see :func:`robustdeq.certify.certify` for each one's meaning).

    ``eps_l2`` / ``eps_linf`` accept one radius or a sequence and are stored as tuples of floats;
    ``methods`` is ``"auto"`` or a tuple of :data:`METHODS`.
    """

    eps_l2: Any = (0.1, 0.25, 0.5)
    eps_linf: Any = ()
    methods: Any = "auto"
    V: Any = None                    # callable (z, z_ref) -> (B,), "quadratic" or None
    lyapunov_steps: int = 30
    perturb: Any = None
    lyapunov_dynamics: str = "iteration"
    local_method: str = "auto"
    local_iters: int = 100
    dense_max: int = 256
    ibp_iters: int = 200
    solver: Any = None               # SolverConfig | mapping | None (the model's, tightened)
    fp_tol: float = 1e-6
    spectral: str = "auto"
    batch_size: int = 256
    seed: int = 0
    progress: bool = False
    deploy_tol: float = 1e-2

    def __post_init__(self):
        object.__setattr__(self, "eps_l2", check_radii(self.eps_l2, "eps_l2", distinct=True))
        object.__setattr__(self, "eps_linf", check_radii(self.eps_linf, "eps_linf", distinct=True))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.V is not None and not (callable(self.V) or self.V == "quadratic"):
            raise ConfigError("V must be a callable (z, z_ref) -> (B,) or 'quadratic'")
        if self.lyapunov_dynamics not in LYAPUNOV_DYNAMICS:
            raise ConfigError(f"unknown lyapunov_dynamics {self.lyapunov_dynamics!r}; expected 'iteration', "
                              "'solver' or 'stable_map'")
        if not self.deploy_tol >= 0:
            raise ConfigError(f"deploy_tol must be a number >= 0, got {self.deploy_tol!r}")
        if not (self.fp_tol >= 0 and math.isfinite(self.fp_tol)):
            raise ConfigError(f"fp_tol must be a finite number >= 0, got {self.fp_tol!r}")
        if self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("lyapunov_steps", "local_iters", "ibp_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name, allowed in (("local_method", ("auto", "dense", "power")), ("spectral", ("auto", "svd", "gram"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        object.__setattr__(self, "methods", _methods(self.methods))

    def replace(self, **changes) -> "CertifyConfig":
        """A copy with the fields ``changes`` replaced, checked again (an unknown field or a bad
        value is a ``ConfigError``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The settings as a dict (objects such as ``V`` as they are): ``from_dict(CertifyConfig,
        d)`` rebuilds it."""
        return to_dict(self)


def _methods(methods: Any):
    if methods == "auto":
        return "auto"
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ConfigError("methods is empty: name at least one certification method ('auto' or a subset "
                          f"of {', '.join(METHODS)})")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown certification method(s) {unknown}; expected 'auto' or a subset of "
                          f"{', '.join(METHODS)}")
    return tuple(methods)


def make_certify_config(config: Union[CertifyConfig, Mapping[str, Any], None] = None, **options) -> CertifyConfig:
    """A :class:`CertifyConfig` from an instance or a mapping, with ``options`` overriding its
    fields; unknown keys raise :class:`ConfigError` (:func:`robustdeq.config.make_config`)."""
    from ..config import make_config
    return make_config(CertifyConfig, config, **options)


__all__ = ["CertifyConfig", "make_certify_config", "METHODS"]
