"""Joint inference and input optimisation (JIIO; Gurumurthy, Bai, Manchester, Kolter 2021).

Problem. Optimise an input ``x`` (an image, a perturbed image, a latent code) through a DEQ::

    min_{x in C}  l(h(z*), x)     s.t.  z* = f(z*, inj(x))                                 (P)

with ``h`` the read-out and ``l`` a per-sample objective (``l = -CE`` for an attack, a masked MSE
for an inverse problem). The naive method alternates, for every step on ``x``, a forward solve and
an adjoint solve. JIIO instead solves one augmented fixed point over ``v = (z, mu, x)``.

KKT conditions. With the Lagrangian ``L(z, x, mu) = l(h(z), x) + mu^T (f(z, x) - z)``, a KKT point
of (P) (``C`` convex, indicator ``i_C``) satisfies::

    (primal)  z  = f(z, x)
    (adjoint) mu = grad_z l(h(z), x) + J_z^T mu           i.e. (I - J_z)^T mu = grad_z l
    (input)   0 in grad_x l + J_x^T mu + N_C(x)           i.e. x = Proj_C(x - alpha * g_x)

where ``J_z = df/dz``, ``J_x = df/dx`` (through the injection) and ``g_x = grad_x l + J_x^T mu``.
By the implicit function theorem ``mu`` is then exactly the IFT adjoint of ``l`` at ``z*`` and
``g_x = d l(h(z*(x)), x) / dx`` is the exact total input gradient, so the input condition is the
projected-gradient stationarity of (P): ``x = Proj_C(x - alpha g_x)`` for any ``alpha > 0`` (for a
box ``C``: ``g_x,i >= 0`` where ``x_i`` sits at its lower bound, ``<= 0`` at its upper bound and
``= 0`` in the interior).

The augmented map (one evaluation of ``f`` and ONE vector-Jacobian product per iteration: a
single ``autograd.grad`` call with cotangents ``[1, mu]`` on ``[l, f(z, x)]`` gives both
``grad_z l + J_z^T mu`` and ``g_x``)::

    mu+ = mu + beta_mu (grad_z l(h(z), x) + J_z^T mu - mu)                      beta_mu = 0.6
    z+  = z  + beta_z  (f(z, x) - z)                                            beta_z  = 0.8
    x+  = Proj_C(x - alpha * d(g_x)),  d = sign (Linf attacks), g/||g||_2 (paper, L2), or g

Its fixed points are the KKT points above when ``d`` is the plain gradient, and the sign /
normalised variants have the same fixed points on the boundary of ``C`` (the sign map is
discontinuous: interior coordinates with a non-zero gradient never settle, as in PGD). The map is
solved with the backbone's solver on the stacked, flattened vector, ``iters`` iterations with no
early stop (``tol=0``): Anderson (memory 20, the paper's choice, and the default of
:func:`optimize_inputs`) or plain fixed-point iteration of the damped map (the default of the
attack and of JIIO-AT: with sign or normalised input steps Anderson's extrapolation made the
attack markedly weaker in our measurements, while on smooth problems it converges fast). ``x`` is
projected at the start of every evaluation so Anderson's affine extrapolations never leave ``C``.
After the solve ``z*`` is re-solved at the returned ``x`` with the model's own solver
(warm-started from the joint ``z``): the prediction is only as good as that re-solve.

Cost: one iteration = one cell evaluation + one VJP (see :class:`CostCounter`), so K iterations
cost about 2K cell evaluations, against k x (forward solve + adjoint solve) for PGD-k.

For attacks ``x`` is parametrised as ``x_clean + delta`` with ``delta_0 = 0``: this module works on
``x`` directly, with the constraint ``LinfBall(x_clean, eps) & Box(0, 1)``.

The engine lives in :mod:`robustdeq.deq.jiio` (a neutral module used by both the JIIO attack,
:mod:`robustdeq.attacks.jiio`, and JIIO adversarial training, ``robustdeq.defenses.objectives.JIIOAT``);
this module re-exports it under its historical path. :class:`WarmStartImplicitGrad` lives in
:mod:`robustdeq.deq.warm`.
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
