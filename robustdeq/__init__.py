"""robustdeq: adversarial robustness of deep equilibrium networks.

=================  ===========================================================================
``deq``            the backbone: solvers, gradient estimators, cells, models, the zoo
``attacks``        PGD / FGSM / APGD / Square / state and JIIO attacks, AutoAttack, torchattacks
``defenses``       inference-time defenses, LyaDEQ, training objectives and recipes
``certify``        certificates: contraction, Lipschitz radii, IBP, Lyapunov, smoothing
``eval``           the evaluation harness and its report
``registry``       every named thing (models, attacks, suites, datasets, ...), torch-free
``federated``      federated training with Flower (optional extra)
=================  ===========================================================================

Import cost is kept low: subpackages and torch-backed names are imported on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import SolverConfig, Select, StopMode, SolverName, Norm  # noqa: E402
from .errors import (  # noqa: E402
    RobustDEQError, ConfigError, InputError, CheckpointError, DataError,
    NonConvergenceWarning, GradientMaskingWarning, CertificationWarning,
)
# torch-backed names are imported on first use (PEP 562), so that ``import robustdeq`` and the
# command line's ``--help`` stay fast
_LAZY = {
    "ImplicitGrad": "robustdeq.deq.grad", "PhantomGrad": "robustdeq.deq.grad",
    "UnrolledGrad": "robustdeq.deq.grad", "FullBackprop": "robustdeq.deq.grad",
    "NoGrad": "robustdeq.deq.grad", "gradient": "robustdeq.deq.grad",
    "DEQClassifier": "robustdeq.deq.model", "Equilibrium": "robustdeq.deq.model",
    "get_solver": "robustdeq.deq.solvers", "solve": "robustdeq.deq.solvers",
    "register_solver": "robustdeq.deq.solvers",
    "attack_view": "robustdeq.deq.views", "zoo": "robustdeq.deq.zoo",
    "adopt": "robustdeq.interop.torchdeq", "benchmark": "robustdeq.eval.card",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'robustdeq' has no attribute {name!r}")
    import importlib
    mod = importlib.import_module(module)
    value = mod if name == "zoo" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "__version__", "SolverConfig", "Select", "StopMode", "SolverName", "Norm",
    "RobustDEQError", "ConfigError", "InputError", "CheckpointError", "DataError",
    "NonConvergenceWarning", "GradientMaskingWarning", "CertificationWarning",
    "ImplicitGrad", "PhantomGrad", "UnrolledGrad", "FullBackprop", "NoGrad", "gradient",
    "DEQClassifier", "Equilibrium", "get_solver", "register_solver", "solve", "attack_view", "zoo",
    "adopt", "benchmark",
]
