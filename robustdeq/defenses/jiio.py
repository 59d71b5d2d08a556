"""Joint inference and input optimisation (JIIO; Gurumurthy, Bai, Manchester, Kolter 2021).

The engine (the augmented fixed point over ``(z, mu, x)``, its KKT conditions, defaults and cost
model, documented there) lives in :mod:`robustdeq.deq.jiio`, a neutral module used by both the JIIO
attack (:mod:`robustdeq.attacks.jiio`) and JIIO adversarial training
(``robustdeq.defenses.objectives.JIIOAT``); this module re-exports it under its historical path.
:class:`WarmStartImplicitGrad` lives in :mod:`robustdeq.deq.warm`.
"""
from __future__ import annotations

from ..deq.jiio import (DIRECTIONS, Box, Constraint, CostCounter, InputObjective, InputOptResult,  # noqa: F401
                        Intersection, JIIOConfig, L2Ball, LinfBall, Mask, Unconstrained, _check_jiio_model,
                        cross_entropy_objective, default_direction, jiio_attack, kkt_residuals,
                        optimize_inputs, threat_constraint)
from ..deq.warm import WarmStartImplicitGrad  # noqa: F401

__all__ = [
    "Constraint", "Unconstrained", "Box", "LinfBall", "L2Ball", "Mask", "Intersection",
    "JIIOConfig", "InputOptResult", "optimize_inputs", "jiio_attack", "kkt_residuals",
    "WarmStartImplicitGrad", "CostCounter", "cross_entropy_objective", "threat_constraint",
]
