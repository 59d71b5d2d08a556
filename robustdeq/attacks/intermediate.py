"""Intermediate-state attacks (Yang, Pang, Liu 2022, "A Closer Look at the Adversarial
Robustness of Deep Equilibrium Models", NeurIPS 2022, Sec. 4).

A DEQ's solver passes through states ``z_1, z_2, ...`` whose read-outs ``readout(z_k)`` are
predictions in their own right (early exit, ensembles of states). :class:`StateAttack` runs PGD on
``CE(readout(z_k), y)`` for chosen states ``k``, with the input gradient

- ``mode="unroll"``: straight-through unrolling (value ``readout(z_k)`` of the solver's own
  state, gradient through ``unroll`` steps of ``f`` from ``z_{k-unroll}``), as
  :func:`robustdeq.deq.views.state_logits`; for weight-tied models the layers are the states;
- ``mode="adjoint"``: the simultaneous adjoint (:func:`simultaneous_adjoint`), an adjoint
  recursion run forward in time alongside the state iteration, giving at every step ``n`` an
  approximate input gradient ``g_n`` that converges to the implicit (IFT) gradient.

Several states, ``ensemble=False``: one PGD per state; per sample the first ``x_adv`` that fools
the judge (default: the model's final read-out) is kept, otherwise the one with the judge's
largest loss. ``ensemble=True``: one PGD on the sum of the cross-entropies over the states.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._tensor import correct, default_alpha
from ..errors import ConfigError
from .base import (Attack, check_int, check_labels, check_num_classes, check_number,
                   cross_entropy, has_trajectory, is_deq)
from ..deq.views import unroll_solver_steps
from .pgd import pgd_loop

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
MODES = ("unroll", "adjoint")


# -- the states' logits with unrolled gradients ---------------------------------------------------
def states_logits(model: nn.Module, x: Tensor, states: Sequence[int], unroll: int = 5
                  ) -> Dict[int, Tensor]:
    """``{k: readout(z_k)}`` for every ``k`` in ``states`` from ONE solve (or one pass of a
    weight-tied model), each with the straight-through gradient of
    :func:`robustdeq.deq.views.state_logits` (unroll ``min(unroll, k)`` of the solver's steps
    from ``z_{k - unroll}``, :func:`robustdeq.deq.views.unroll_solver_steps`)."""
    states = sorted(set(int(k) for k in states))
    x = model.check_input(x)
    u = model.inject(x)
    starts = {k: max(k - unroll, 0) for k in states}
    record = sorted(set(states) | set(starts.values()))
    if hasattr(model, "solve"):
        res = model.solve(u, record=record)
        traj = {t.step: t.z for t in res.trajectory}
    else:
        with torch.no_grad():
            eq = model.run(x, record=record, grad="none")
        traj = {t.step: t.z for t in eq.trajectory}
    missing = [k for k in record if k not in traj]
    if missing:
        raise ConfigError(f"states {missing} were not recorded by {type(model).__name__}")
    out = {}
    for k in states:
        s = starts[k]
        if hasattr(model, "solve"):
            z_hat = unroll_solver_steps(model, u, traj[s], s, k, res)
        else:
            z_hat = model.unroll(u, traj[s].detach(), k - s, start=s)
        z = traj[k].detach() + (z_hat - z_hat.detach())
        out[k] = model.readout(z)
    return out


# -- the simultaneous adjoint ---------------------------------------------------------------------
def simultaneous_adjoint(model: nn.Module, x: Tensor, y: Tensor, steps: int, *,
                         beta_z: float = 1.0, beta_mu: float = 1.0,
                         loss_fn: Optional[LossFn] = None,
                         states: Optional[Sequence[int]] = None) -> List[Tuple[int, Tensor]]:
    """Input gradients at every state from an adjoint recursion run alongside the forward one.

    With ``x`` fixed, ``u = inject(x)``, ``z_0 = init_state(u)``, ``mu_0 = 0``, for n = 0, 1, ...::

        (a_n, b_n) = (grad_z l(readout(z_n), y) + J_z(z_n)^T mu_n,  J_u(z_n)^T mu_n)   # one VJP
        g_n        = (d inject / dx)^T b_n                                             # to x
        mu_{n+1}   = mu_n + beta_mu (a_n - mu_n)
        z_{n+1}    = z_n + beta_z (f(z_n, u) - z_n)

    ``beta_z = beta_mu = 1`` is the undamped variant, ``beta_z = 0.8, beta_mu = 0.6`` JIIO's
    damping (Gurumurthy et al. 2021). At a fixed point ``mu`` solves ``(I - J^T) mu = grad_z l`` and
    ``g_n`` is the exact implicit input gradient of ``l(readout(z*))``; at a finite ``n`` it is the
    intermediate-state gradient of Yang et al. 2022 §4.1 (not the gradient of the n-step unrolled
    network).

    Args:
        model: a DEQ (``inject``, ``f``, ``readout``, ``init_state``); its mode is left as is.
        x: (B, ...) inputs; y: (B,) labels (targets of ``loss_fn``).
        steps: the last state ``n`` returned.
        loss_fn: ``(logits, y) -> scalar`` (default: mean cross-entropy).
        states: the ``n`` to return (default ``1..steps``).

    Returns:
        ``[(n, g_n)]`` in increasing ``n``, ``g_n`` of the shape of ``x``.
    """
    if not is_deq(model):
        raise ConfigError(f"the simultaneous adjoint needs a DEQ with a fixed-point cell; "
                          f"{type(model).__name__} has none (use mode='unroll')")
    steps = check_int(steps, "steps", low=1)
    beta_z = check_number(beta_z, "beta_z", strict=True)
    beta_mu = check_number(beta_mu, "beta_mu", strict=True)
    if beta_z > 1 or beta_mu > 1:
        raise ConfigError(f"beta_z and beta_mu must be in (0, 1], got {beta_z}, {beta_mu}")
    wanted = set(range(1, steps + 1)) if states is None else {int(k) for k in states}
    bad = [k for k in wanted if not 1 <= k <= steps]
    if bad:
        raise ConfigError(f"states {sorted(bad)} outside 1..{steps}")
    loss_fn = loss_fn or cross_entropy
    x = model.check_input(x).detach().requires_grad_(True)
    y = check_labels(y, x)
    if hasattr(model, "prepare"):
        model.prepare()
    with torch.enable_grad():
        u = model.inject(x)
    ud = u.detach().requires_grad_(True)
    z = model.init_state(ud).detach()
    mu = torch.zeros_like(z)
    out: List[Tuple[int, Tensor]] = []
    last = max(wanted)
    for n in range(last + 1):
        zl = z.detach().requires_grad_(True)
        with torch.enable_grad():
            fz = model.f(zl, ud)
            if n < last:
                loss = loss_fn(model.readout(zl), y)
                a_n, b_n = torch.autograd.grad([loss, fz], [zl, ud],
                                               grad_outputs=[torch.ones_like(loss), mu])
            else:  # the last state only needs J_u^T mu
                b_n = torch.autograd.grad(fz, ud, mu)[0]
        if n in wanted:
            g = torch.autograd.grad(u, x, b_n, retain_graph=True)[0]
            out.append((n, g.detach()))
        if n < last:
            mu = mu + beta_mu * (a_n.detach() - mu)
            z = z + beta_z * (fz.detach() - z)
    return out


# -- the attack -----------------------------------------------------------------------------------
class StateAttack(Attack):
    """PGD on the read-out of intermediate states (Yang, Pang, Liu 2022).

    Args:
        eps, alpha, steps, norm, random_start, targeted, seed: as :class:`~robustdeq.attacks.PGD`.
        states: "all" (every state ``1..max_iter-1`` of a DEQ, ``1..depth`` of a weight-tied
            model), an int, or a list of ints.
        ensemble: one PGD on the sum of the states' cross-entropies instead of one per state.
        mode: "unroll" (straight-through unrolled gradient, ``unroll`` steps) or "adjoint"
            (simultaneous adjoint; DEQs only; its states are those of the damped fixed-point
            iteration ``z <- z + beta_z (f(z) - z)`` from ``z_0``, which coincide with the
            solver's only when the model's solver is that iteration).
        judge: the model whose prediction decides which ``x_adv`` to keep (default the model's
            final read-out); the harness may pass an early-exit view.
        beta_z, beta_mu: damping of the simultaneous adjoint.
    """

    supports_targeted = True

    def __init__(self, model: nn.Module, *, eps: float, alpha: Optional[float] = None,
                 steps: int = 10, states: Union[str, int, Sequence[int]] = "all",
                 ensemble: bool = False, mode: str = "unroll", unroll: int = 5,
                 norm: str = "Linf", random_start: bool = True, judge: Optional[nn.Module] = None,
                 targeted: bool = False, seed: Optional[int] = None, beta_z: float = 1.0,
                 beta_mu: float = 1.0):
        super().__init__(model, eps=eps, norm=norm, targeted=targeted, seed=seed)
        if not has_trajectory(model):
            raise ConfigError(f"{type(model).__name__} has no intermediate states (it needs run, "
                              "readout, inject and unroll: a DEQClassifier or WeightTied model)")
        self.deq = is_deq(model)
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == "adjoint" and not self.deq:
            raise ConfigError(f"mode='adjoint' needs a DEQ with a fixed-point cell; "
                              f"{type(model).__name__} is explicit (use mode='unroll')")
        self.mode = mode
        self.steps = check_int(steps, "steps", low=1)
        self.alpha = default_alpha(self.eps, self.steps) if alpha is None else check_number(alpha, "alpha")
        self.unroll = check_int(unroll, "unroll", low=1)
        if not isinstance(random_start, bool) or not isinstance(ensemble, bool):
            raise ConfigError("random_start and ensemble must be bools")
        self.random_start, self.ensemble = random_start, ensemble
        self.beta_z = check_number(beta_z, "beta_z", strict=True)
        self.beta_mu = check_number(beta_mu, "beta_mu", strict=True)
        if self.beta_z > 1 or self.beta_mu > 1:
            raise ConfigError("beta_z and beta_mu must be in (0, 1]")
        if judge is not None and not isinstance(judge, nn.Module):
            raise ConfigError(f"judge must be an nn.Module x -> logits, got {type(judge).__name__}")
        self.judge = judge if judge is not None else model
        self.max_state = (model.solver_config.max_iter - 1 if self.deq else int(model.depth))
        self.states = self._parse_states(states)
        self.states_spec = states if isinstance(states, str) else list(self.states)
        what = ("all states" if states == "all" else
                f"z_{self.states[0]}" if len(self.states) == 1 else f"states {list(self.states)}")
        self.name = (f"State-PGD{'-L2' if self.norm == 'L2' else ''}-{self.steps} "
                     f"({'ensemble of ' if ensemble and len(self.states) > 1 else ''}{what}, "
                     f"{mode if mode == 'adjoint' else f'unroll {self.unroll}'})")

    def _parse_states(self, states) -> List[int]:
        if isinstance(states, str):
            if states != "all":
                raise ConfigError(f"states must be 'all', an int or a list of ints, got {states!r}")
            ks = list(range(1, self.max_state + 1))
        elif isinstance(states, int) and not isinstance(states, bool):
            ks = [states]
        elif isinstance(states, (list, tuple)) and states and all(
                isinstance(k, int) and not isinstance(k, bool) for k in states):
            ks = list(dict.fromkeys(states))
        else:
            raise ConfigError(f"states must be 'all', an int or a non-empty list of ints, got {states!r}")
        bad = [k for k in ks if not 1 <= k <= self.max_state]
        if bad:
            raise ConfigError(
                f"states {bad} outside 1..{self.max_state} (state 0 is the initial state, which "
                f"does not depend on x; the last recordable state of {type(self.model).__name__} "
                f"is {self.max_state})")
        if not ks:
            raise ConfigError("no state to attack")
        return ks

    def params(self) -> Dict[str, Any]:
        """The settings reported by :meth:`describe`: step size, steps, random start, states,
        ensemble, gradient mode, unroll, the adjoint dampings and the judge."""
        return {"alpha": self.alpha, "steps": self.steps, "random_start": self.random_start,
                "states": self.states_spec, "ensemble": self.ensemble, "mode": self.mode,
                "unroll": self.unroll, "beta_z": self.beta_z, "beta_mu": self.beta_mu,
                "judge": "model" if self.judge is self.model else type(self.judge).__name__}

    def guarded_models(self) -> List[nn.Module]:
        """The model and, when another one judges success, the judge."""
        return [self.model] if self.judge is self.model else [self.model, self.judge]

    # -- gradients --------------------------------------------------------------------------------
    def _grad_fn(self, states: Sequence[int]):
        loss_fn = self.loss_fn(cross_entropy)
        checked = []

        def unroll_grad(xa: Tensor, ya: Tensor) -> Tensor:
            xr = xa.detach().requires_grad_(True)
            logits = states_logits(self.model, xr, states, self.unroll)
            if not checked:
                check_num_classes(ya, next(iter(logits.values())))
                checked.append(True)
            cost = sum(loss_fn(lg, ya) for lg in logits.values())
            g = (torch.autograd.grad(cost, xr, allow_unused=True)[0] if cost.requires_grad
                 else None)
            # None: every sample's solve stopped at or before the unroll's start z_{k - unroll},
            # so no unrolled step depends on x and the straight-through gradient is zero
            # (robustdeq.deq.views.unroll_solver_steps), not an autograd error
            return torch.zeros_like(xr) if g is None else g

        def adjoint_grad(xa: Tensor, ya: Tensor) -> Tensor:
            if not checked:
                with torch.no_grad():
                    check_num_classes(ya, self.model.readout(
                        self.model.init_state(self.model.inject(xa[:1]))))
                checked.append(True)
            gs = simultaneous_adjoint(self.model, xa, ya, max(states), beta_z=self.beta_z,
                                      beta_mu=self.beta_mu, loss_fn=loss_fn, states=states)
            return sum(g for _, g in gs)

        return unroll_grad if self.mode == "unroll" else adjoint_grad

    def _pgd(self, x, y, states, gen) -> Tensor:
        return pgd_loop(x, y, self._grad_fn(states), eps=self.eps, alpha=self.alpha,
                        steps=self.steps, norm=self.norm, random_start=self.random_start, gen=gen)

    def _judge(self, x_adv: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """(fooled (B,) bool, judge cost (B,)) under the judge, without gradient."""
        with torch.no_grad():
            logits = self.judge(x_adv)
            ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        if self.targeted:  # targeted: the prediction (argmax) is the target
            return logits.argmax(dim=1) == y, -ce
        return ~correct(logits, y), ce  # untargeted: a tie is wrong (the evaluation's rule)

    def _perturb(self, x, y, gen):
        if self.ensemble or len(self.states) == 1:
            return self._pgd(x, y, self.states, gen)
        x_out = x.clone()
        best = torch.full((x.shape[0],), float("-inf"), dtype=torch.float64, device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)
        self.last_stats = {"fooled_by_state": {}}
        for k in self.states:
            if todo.numel() == 0:
                break
            xa = self._pgd(x[todo], y[todo], [k], gen)
            fooled, score = self._judge(xa, y[todo])
            score = score.double()
            take = fooled | (score > best[todo])
            x_out[todo[take]] = xa[take]
            best[todo] = torch.maximum(best[todo], score)
            self.last_stats["fooled_by_state"][k] = int(fooled.sum())
            todo = todo[~fooled]
        return x_out


__all__ = ["StateAttack", "simultaneous_adjoint", "states_logits"]
