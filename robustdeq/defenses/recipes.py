"""Named hardening recipes for the CLI and the benchmarks: ``recipe(name, **options)``.

A recipe is the pair (architecture override, training objective). ``options`` go to the
objective (the adversarial ones take ``eps``, ``steps``, ``norm``...); unknown names or options are
``ConfigError``s.

===========================  ===============================================================
``none``                     cross-entropy on the model as given
``pgd-at``                   PGD adversarial training (Madry et al.)
``pgd-at-random-state``      PGD-AT with the loss on random intermediate states (RIS)
``trades``                   TRADES (beta = 6)
``trades-random-state``      TRADES on random intermediate states (Yang et al. 2023)
``jiio-at``                  adversarial training with the JIIO inner maximisation
``lyadeq``                   LyaDEQ architecture + cross-entropy + Lyapunov-stability penalty
``lyadeq-at``                LyaDEQ + PGD-AT + Lyapunov-stability penalty
``gaussian-noise``           Gaussian noise augmentation (``sigma``) for randomized smoothing
===========================  ===============================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import ConfigError


@dataclass
class Recipe:
    name: str
    model: Optional[str]          # zoo architecture the recipe requires (None: keep the user's)
    objective: Callable


RECIPES = ("none", "pgd-at", "pgd-at-random-state", "trades", "trades-random-state", "jiio-at",
           "lyadeq", "lyadeq-at", "gaussian-noise")


def recipe(name: str, **options) -> Recipe:
    from .objectives import make_objective
    if name not in RECIPES:
        raise ConfigError(f"unknown defense {name!r}; expected one of {', '.join(RECIPES)}")
    if name == "none":
        return Recipe(name, None, make_objective("ce", **options))
    if name == "gaussian-noise":
        return Recipe(name, None, make_objective("gaussian_noise", **options))
    if name in ("lyadeq", "lyadeq-at"):
        from .lyapunov import LyapunovStability
        lya = {k: options.pop(k) for k in ("weight", "radius", "condition") if k in options}
        base = make_objective("pgd_at", **options) if name == "lyadeq-at" else make_objective("ce", **options)
        return Recipe(name, "lyadeq", LyapunovStability(base, **lya))
    random_state = name.endswith("-random-state")
    base = {"pgd-at": "pgd_at", "trades": "trades", "jiio-at": "jiio_at"}[name.replace("-random-state", "")]
    if random_state:
        options = {"state": "random", **options}
    return Recipe(name, None, make_objective(base, **options))


__all__ = ["Recipe", "RECIPES", "recipe"]
