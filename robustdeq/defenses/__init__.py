"""Defenses: inference-time wrappers (``x -> logits`` modules that declare ``randomized``,
``dynamic``, ``differentiable`` and offer ``adaptive_views()``), robust architectures (LyaDEQ) and
training objectives ``(model, x, y) -> (loss, scalars)``.

Every name is imported on first use (module ``__getattr__``), so ``import robustdeq.defenses`` is
cheap and a submodule is only loaded when one of its names is needed.
"""
from __future__ import annotations

import importlib

_LAZY = {
    # lyapunov.py: LyaDEQ
    "LyaDEQ": ".lyapunov", "LyapunovFunction": ".lyapunov", "ICNN": ".lyapunov",
    "SeparationHead": ".lyapunov", "LyapunovStability": ".lyapunov", "LyapunovTrace": ".lyapunov",
    "lyapunov_trace": ".lyapunov", "project_dynamics": ".lyapunov", "rehu": ".lyapunov",
    # entropy.py: input-entropy reduction
    "EntropyDefense": ".entropy", "EntropyResult": ".entropy", "prediction_entropy": ".entropy",
    # objectives.py: adversarial training objectives (JIIO-AT's engine is robustdeq.deq.jiio)
    "PGDAT": ".objectives", "TRADES": ".objectives", "RandomStateObjective": ".objectives",
    "JIIOAT": ".objectives", "CrossEntropy": ".objectives", "make_objective": ".objectives",
    "recipe": ".recipes", "Recipe": ".recipes", "register_recipe": ".recipes",
    "register_objective": ".objectives",
    # certified.py: certified training (IBP, Lipschitz margin)
    "IBPTraining": ".certified", "LipschitzMargin": ".certified",
    # wrappers.py: a registered inference-time defense by name
    "wrap": ".wrappers",
}



def register_wrapper(name: str, defense, *, replace: bool = False) -> None:
    """Make ``defense`` (a class ``defense(model, **options) -> nn.Module``: an inference-time
    defense with ``.model``, ideally ``adaptive_views()``) available as ``--wrap name`` and
    ``robustdeq.defenses.wrap(model, name, options)``. An existing name is an error unless
    ``replace=True``."""
    from ..errors import ConfigError
    from ..registry import WRAPPERS
    if not callable(defense):
        raise ConfigError(f"the inference-time defense {name!r} must be a class or factory, "
                          f"got {type(defense).__name__}")
    WRAPPERS.register(name, defense, replace=replace)


__all__ = sorted(list(_LAZY) + ["register_wrapper"])


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
