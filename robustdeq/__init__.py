"""robustdeq: adversarial robustness of deep equilibrium networks.

Import cost is kept low: subpackages (attacks, defenses, eval, certify) are imported on use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import SolverConfig, Select, StopMode, SolverName, Norm  # noqa: E402
from .errors import (  # noqa: E402
    RobustDEQError, ConfigError, InputError, CheckpointError, DataError,
    NonConvergenceWarning, GradientMaskingWarning, CertificationWarning,
)
from .deq.grad import (  # noqa: E402
    ImplicitGrad, PhantomGrad, UnrolledGrad, FullBackprop, NoGrad, gradient,
)
from .deq.model import DEQClassifier, Equilibrium  # noqa: E402
from .deq.solvers import get_solver, solve  # noqa: E402
from .deq.views import attack_view  # noqa: E402
from .deq import zoo  # noqa: E402

__all__ = [
    "__version__", "SolverConfig", "Select", "StopMode", "SolverName", "Norm",
    "RobustDEQError", "ConfigError", "InputError", "CheckpointError", "DataError",
    "NonConvergenceWarning", "GradientMaskingWarning", "CertificationWarning",
    "ImplicitGrad", "PhantomGrad", "UnrolledGrad", "FullBackprop", "NoGrad", "gradient",
    "DEQClassifier", "Equilibrium", "get_solver", "solve", "attack_view", "zoo",
]
