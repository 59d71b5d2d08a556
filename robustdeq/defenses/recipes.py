"""Named hardening recipes for the CLI and the benchmarks: ``recipe(name, **options)``.

A recipe is the pair (architecture override, training objective). ``options`` go to the
objective (the adversarial ones take ``eps``, ``steps``, ``norm``...); in the lyadeq recipes
``weight``, ``radius``, ``condition``, ``samples``, ``floor`` and ``penalty_steps`` (its
``steps``) go to the Lyapunov-stability penalty, the others to its base objective (``steps``:
PGD-AT's), and ``seed`` seeds both. Unknown
names or options are ``ConfigError``s.

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
``ibp``                      IBP certified training, Linf (Gowal et al. 2018; through the
                             DEQ's interval fixed point, Wei & Kolter 2022)
``lipschitz-margin``         Lipschitz-margin certified training, L2 (Tsuzuku et al. 2018)
===========================  ===============================================================

:func:`register_recipe` adds a named recipe (``robustdeq.registry.RECIPES``; the command line's
``--defense`` reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .. import registry as _registry
from ..errors import ConfigError


@dataclass
class Recipe:
    """A hardening recipe: its ``name``, the zoo architecture it requires (``model``; None keeps
    the user's) and its training ``objective`` ``(model, x, y) -> (loss, scalars)``."""

    name: str
    model: Optional[str]          # zoo architecture the recipe requires (None: keep the user's)
    objective: Callable


def register_recipe(name: str, builder: Optional[Callable[..., Recipe]] = None, *, replace: bool = False):
    """Make ``recipe(name, **options)`` (and ``robustdeq train --defense name``) call
    ``builder(**options) -> Recipe``. Without ``builder``, a decorator. Re-registering a name (a
    built-in included) is a ConfigError unless ``replace=True``."""
    return _registry.RECIPES.register(name, builder, replace=replace)


def recipe(name: str, **options) -> Recipe:
    """The recipe ``name`` (:data:`robustdeq.registry.RECIPES`) with ``options`` for its objective."""
    out = _registry.RECIPES.get(name)(**options)
    if not isinstance(out, Recipe):
        raise ConfigError(f"the recipe builder {name!r} returned {type(out).__name__}, not a Recipe")
    return out


# -- the built-in recipes ---------------------------------------------------------------------------
def _none(**options) -> Recipe:
    return Recipe("none", None, _make_objective("ce", **options))


def _gaussian_noise(**options) -> Recipe:
    return Recipe("gaussian-noise", None, _make_objective("gaussian_noise", **options))


#: the lyadeq recipes' options of the Lyapunov-stability penalty -> its parameter (the others go
#: to the base objective, whose ``steps`` are PGD-AT's; ``seed`` seeds both: the penalty's draws
#: and the base's attack starts)
_LYAPUNOV_OPTIONS = {"weight": "weight", "radius": "radius", "condition": "condition",
                     "samples": "samples", "penalty_steps": "steps", "floor": "floor"}


def _lyadeq_recipe(name: str, base: str, options: dict) -> Recipe:
    from .lyapunov import LyapunovStability
    lya = {param: options.pop(k) for k, param in _LYAPUNOV_OPTIONS.items() if k in options}
    if options.get("seed") is not None:
        lya["seed"] = options["seed"]
    return Recipe(name, "lyadeq", LyapunovStability(_make_objective(base, **options), **lya))


def _lyadeq(**options) -> Recipe:
    return _lyadeq_recipe("lyadeq", "ce", options)


def _lyadeq_at(**options) -> Recipe:
    return _lyadeq_recipe("lyadeq-at", "pgd_at", options)


def _adversarial(name: str, objective: str, random_state: bool, options: dict) -> Recipe:
    if random_state:
        if options.get("state", "random") != "random":
            raise ConfigError(f"recipe {name!r} trains on random intermediate states (state='random'); "
                              f"got state={options['state']!r}: use {name.replace('-random-state', '')!r} "
                              "for the loss at the fixed point")
        options = {"state": "random", **options}
    return Recipe(name, None, _make_objective(objective, **options))


def _pgd_at(**options) -> Recipe:
    return _adversarial("pgd-at", "pgd_at", False, options)


def _pgd_at_random_state(**options) -> Recipe:
    return _adversarial("pgd-at-random-state", "pgd_at", True, options)


def _trades(**options) -> Recipe:
    return _adversarial("trades", "trades", False, options)


def _trades_random_state(**options) -> Recipe:
    return _adversarial("trades-random-state", "trades", True, options)


def _jiio_at(**options) -> Recipe:
    return _adversarial("jiio-at", "jiio_at", False, options)


def _ibp(**options) -> Recipe:
    return Recipe("ibp", None, _make_objective("ibp", **options))


def _lipschitz_margin(**options) -> Recipe:
    return Recipe("lipschitz-margin", None, _make_objective("lipschitz_margin", **options))


def _make_objective(spec, **options):
    from .objectives import make_objective
    return make_objective(spec, **options)


__all__ = ["Recipe", "recipe", "register_recipe"]
