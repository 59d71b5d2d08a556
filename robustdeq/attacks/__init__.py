"""Adversarial attacks on DEQs and any ``x -> logits`` model.

Every attack is called as ``attack(x, y) -> x_adv`` (torchattacks' call shape and parameter
names), stays in the eps ball and in [0, 1], restores the model's training flags, and is
reproducible under a seed. ``describe()`` gives the provenance (implementation, settings).

=====================  ======================================================================
``FGSM``, ``PGD``      Linf / L2; gradient estimator per attack; solver warm starts on DEQs
``APGD``, ``APGDT``    Auto-PGD (CE, DLR) and APGD-T (targeted DLR), native, with EOT
``StateAttack``        PGD on intermediate states (unrolled or simultaneous-adjoint gradients)
``AutoAttack``         pyautoattack on the model or on an attack view of a DEQ
``TorchAttack``        any torchattacks attack on the model or on an attack view
``Square``             score-based Square attack (no gradients); warm-started solves on DEQs
``WorstCase``          attacks in sequence on the samples still robust; per-sample worst case
``JIIO``               joint inference and input optimisation attack (robustdeq.attacks.jiio)
=====================  ======================================================================

``build(name, model, **params)`` constructs one by its name in :data:`robustdeq.registry.ATTACKS`
("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "state", "autoattack", "torchattack", "jiio",
"square", and whatever
``registry.ATTACKS.register(name, cls)`` adds). torchattacks and pyautoattack are imported only
when used.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import ATTACKS
from .base import Attack, accuracy, predict
from .pgd import FGSM, PGD
from .apgd import APGD, APGDT
from .intermediate import StateAttack, simultaneous_adjoint
from .autoattack import AutoAttack
from .bridge import TorchAttack
from .square import Square
from .worst_case import WorstCase, WorstCaseResult


def build(name: str, model, **params) -> Attack:
    """Construct the attack ``name`` (:data:`robustdeq.registry.ATTACKS`; a built-in name in
    any case) on ``model``; unknown names or parameters are ConfigErrors."""
    if not isinstance(name, str):
        raise ConfigError(f"attack name must be a string, got {name!r}")
    key = name if name in ATTACKS else name.lower()
    cls = ATTACKS.get(key)
    try:
        return cls(model, **params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for attack {name!r}: {e}") from None


def __getattr__(name: str) -> Any:
    if name == "JIIO":  # imported on first use
        from .jiio import JIIO
        return JIIO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Attack", "FGSM", "PGD", "APGD", "APGDT", "StateAttack", "AutoAttack", "TorchAttack",
           "Square", "WorstCase",
           "WorstCaseResult", "JIIO", "simultaneous_adjoint", "predict", "accuracy", "build"]
