"""Robustness evaluation: the harness (suites -> :class:`EvalReport`), gradient-masking and DEQ
checks, and the report (versioned JSON, Markdown, plots, TensorBoard scalars).

=================================  ============================================================
``evaluate``                       run a suite of attacks on a model (harness.py)
``EvalProtocol``, ``RunOptions``   what determines the numbers (hashable) and how the run goes
                                   (config.py)
``AttackSpec``, suites             attack specs and named suites (suites.py; registry.ATTACK_SPECS,
                                   registry.SUITES), ``register_attack_spec``, ``register_suite``
``CHECKS``, ``CheckConfig``        gradient-masking and convergence checks (checks.py)
``EvalReport``                     the report: JSON, Markdown, plots (report.py)
``unit_seed``                      the seed of one unit (store.py); resume files
=================================  ============================================================

    from robustdeq.eval import evaluate
    report = evaluate(model, x, y, threat="Linf", eps=[0.05, 0.1], suite="quick", out_dir="runs/e1")
    print(report.to_markdown()); report.fired  # names of the checks that fired
"""
from __future__ import annotations

from .checks import CHECKS, CheckConfig, CheckResult
from .config import EvalProtocol, RunOptions
from .harness import evaluate
from .store import unit_seed
from .suites import AttackSpec, SuiteContext, build_suite, register_attack_spec, register_suite
from .targets import trajectory_model, trajectory_stats
from .report import SCHEMA_VERSION, AttackResult, EpsResult, EvalReport

__all__ = [
    "evaluate", "EvalProtocol", "RunOptions", "AttackSpec", "SuiteContext", "build_suite", "register_attack_spec",
    "register_suite", "trajectory_model",
    "trajectory_stats", "unit_seed",
    "EvalReport", "EpsResult", "AttackResult", "SCHEMA_VERSION",
    "CHECKS", "CheckConfig", "CheckResult",
]
