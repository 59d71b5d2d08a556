"""The shared DEQ backbone.

===================  =====================================================================
``solvers``          steppable batched solvers (fixed_point, anderson, broyden), get_solver
``grad``             gradient estimators (ImplicitGrad, PhantomGrad, UnrolledGrad, ...)
``cells``, ``model``  cells f(z, u), injections, heads; DEQClassifier, Equilibrium
``weight_tied``      weight-tied (unrolled) baselines
``multiscale``       MDEQ-style multiscale cells
``views``            read-only views for attacks (attack_view, TransferView)
``zoo``              ready architectures by name (``robustdeq.registry.MODELS``)
``regularizers``     Jacobian penalties
``contraction``      a cell's contraction certificate (sound float64 bounds, ``linalg``)
``noisy``            logits on noisy inputs (base classifier of randomized smoothing)
===================  =====================================================================

Internal modules (not re-exported): ``jiio``, ``joint``, ``memory``, ``shrink``, ``warm``,
``protocols``, ``linalg``. Every name below is imported from its module on first use.
"""
from __future__ import annotations

import importlib

#: public name -> the submodule defining it (imported on first use)
_LAZY = {name: module for module, names in {
    "solvers": ("TrajectoryState", "SolverState", "SolveResult", "Solver", "FixedPointIteration",
                "Anderson", "Broyden", "register_solver", "get_solver", "solve"),
    "grad": ("GradientEstimator", "ImplicitGrad", "PhantomGrad", "UnrolledGrad", "FullBackprop",
             "NoGrad", "make_estimator", "gradient"),
    "cells": ("Normalize", "ScaledLinear", "IntervalScaling", "MLPCell", "MLPInjection", "LinearHead",
              "ConvCell", "ConvInjection", "ConvHead", "MonotoneCell", "LinearCell"),
    "model": ("EquilibriumModel", "DEQClassifier", "Equilibrium", "SolverStats"),
    "weight_tied": ("WeightTied",),
    "views": ("ModelView", "AttackView", "TransferView", "attack_view", "state_logits"),
    "zoo": ("FeedForward",),  # zoo.build / zoo.register: through the module
    "multiscale": ("PackedShape", "branch_shapes", "MultiscaleInjection", "MultiscaleCell", "MultiscaleHead"),
    "regularizers": ("jacobian_penalty",),
    "contraction": ("ContractionCertificate", "contraction_certificate", "solver_guarantees"),
    "noisy": ("base_logits", "run_noisy", "to_model_dtype"),
}.items() for name in names}
_SUBMODULES = ("solvers", "grad", "cells", "model", "weight_tied", "views", "zoo", "multiscale",
               "regularizers", "contraction", "noisy", "linalg", "jiio", "joint", "memory", "shrink",
               "warm", "protocols")

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
