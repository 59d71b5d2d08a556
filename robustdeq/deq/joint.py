"""A joint forward / adjoint / input iteration for attacks on a DEQ (JIIO-style PGD).

Exact PGD on a DEQ solves, at every step, the forward fixed point ``z = f(z, u(x))`` and the
adjoint ``mu = J_z^T mu + g`` to tolerance. :class:`JointInputGradient` instead carries ``z`` and
``mu`` from one PGD step to the next, and per step does only

- at most ``fwd_iters`` iterations from the carried ``z`` (fewer once every sample's residual is
  within the model's solver tolerance): the model's solver restarted from ``z``
  (``fwd_solver="model"``) or plain iterations ``z <- f(z, u)`` (``"picard"``: cheaper per
  iteration on tiny models, where Anderson's bookkeeping is most of the cost, but weaker on a
  conv DEQ whose solves do not converge; benchmarks/bench_attacks.py compares them);
  ``"auto"`` (the default) takes plain iterations when the first call's full solve converged
  for every sample of the batch, the model's solver otherwise; the first call is the model's
  full solve from its initial state, as its inference starts;
- ``adj_iters`` adjoint sweeps ``mu <- g + J_z^T mu`` from the carried ``mu``, the last one in the same
  vector-Jacobian product as the input gradient ``J_x^T mu`` (one ``autograd.grad`` call with
  cotangent ``mu`` on ``f(z, u(x))`` gives both, as in JIIO); the sweeps before it use the cell's
  closed-form vector-Jacobian product where it has one (``MLPCell.vjp_at``), else autograd.

This is a different algorithm from exact PGD (a joint iteration over ``(z, mu, x)``, not a
sequence of converged solves), so its iterates are never taken at face value: the attack that
drives it (``PGD(method="joint")``) judges its final examples by the model's own (cold) inference.
The carried state is a state of this iteration, not a warm start of the model's solves: nothing
here is used to start the model's inference.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]


def supports_joint(model: nn.Module) -> bool:
    """Whether ``model`` exposes the pieces the joint iteration needs (a fixed-point model with
    ``inject``, ``f``, ``readout``, ``init_state``, ``solver_config``)."""
    return all(hasattr(model, n) for n in ("inject", "f", "readout", "init_state", "solver_config"))


class JointInputGradient:
    """``(x, y, loss_fn) -> d loss / dx`` by the joint iteration; call :meth:`reset` per batch and
    :meth:`select` when the batch shrinks. ``last_logits`` are the logits at the carried state
    (the iteration's own estimate, not the model's inference)."""

    def __init__(self, model: nn.Module, fwd_iters: int = 3, adj_iters: int = 3,
                 first_adj_iters: int = 8, fwd_solver: str = "auto"):
        if not supports_joint(model):
            raise ConfigError(f"the joint iteration needs a fixed-point model (inject, f, readout, "
                              f"init_state, solver_config); got {type(model).__name__}")
        for name, v in (("fwd_iters", fwd_iters), ("adj_iters", adj_iters),
                        ("first_adj_iters", first_adj_iters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if fwd_solver not in ("auto", "model", "picard"):
            raise ConfigError(f"fwd_solver must be 'model' (the model's solver, restarted each step), "
                              f"'picard' (plain iteration z <- f(z, u)) or 'auto', got {fwd_solver!r}")
        self.fwd_solver = fwd_solver
        self.model = model
        self._solvers = {}
        self.fwd_iters, self.adj_iters, self.first_adj_iters = fwd_iters, adj_iters, first_adj_iters
        self.reset()

    def reset(self) -> None:
        """Forget the carried ``z`` and ``mu`` and zero the statistics: the next call starts with
        the model's full solve (call it for every new batch)."""
        self.z: Optional[Tensor] = None
        self.mu: Optional[Tensor] = None
        self._picard = self.fwd_solver == "picard"
        self.last_logits: Optional[Tensor] = None
        self.last_converged: Optional[Tensor] = None
        self.stats: Dict[str, int] = {"calls": 0, "forward_nfe": 0, "backward_nfe": 0,
                                      "forward_work": 0, "backward_work": 0,
                                      "forward_unconverged": 0, "backward_unconverged": 0}

    def select(self, keep: Tensor) -> None:
        """Keep only the samples ``keep`` (indices or a bool mask into the current batch) of the
        carried ``z`` and ``mu``."""
        if self.z is not None:
            self.z = self.z[keep]
        if self.mu is not None:
            self.mu = self.mu[keep]

    def __call__(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        from .solvers import get_solver, iterate_map
        model = self.model
        b = x.shape[0]
        self.stats["calls"] += 1
        first = self.z is None or self.z.shape[0] != b
        with parametrize.cached():
            if hasattr(model, "prepare"):
                model.prepare()
            xr = x.detach().requires_grad_(True)
            u = model.inject(xr)
            ud = u.detach()
            cfg = model.solver_config
            if first:
                z0 = model.init_state(ud)
                self.mu = None
            else:
                z0 = self.z
            with torch.no_grad():
                fmap = model.f_bound(ud) if hasattr(model, "f_bound") else (lambda z: model.f(z, ud))
                if first or not self._picard:
                    key = (cfg, first)
                    if key not in self._solvers:  # reuse the solver while (config, first) is unchanged
                        self._solvers = {key: get_solver(cfg if first else
                                                         cfg.replace(max_iter=self.fwd_iters))}
                    res = self._solvers[key].solve(fmap, z0.detach())
                    nfe, z_star, conv = res.nfe, res.z.detach(), res.converged.detach()
                    if first and self.fwd_solver == "auto":
                        self._picard = bool(conv.all())
                else:
                    z_star, _, nfe = iterate_map(fmap, z0.detach(), cfg, self.fwd_iters)
                    conv = torch.zeros(b, dtype=torch.bool, device=x.device)
            self.stats["forward_nfe"] += nfe
            self.stats["forward_work"] += nfe * b
            self.last_converged = conv
            z_leaf = z_star.requires_grad_(True)
            z_out = model.f(z_leaf, u)
            logits = model.readout(z_out)
            cost = loss_fn(logits, y)
            g = torch.autograd.grad(cost, z_out, retain_graph=True)[0].detach()
            mu = g if first or self.mu is None or self.mu.shape != g.shape else self.mu
            sweeps = self.first_adj_iters if first else self.adj_iters
            if sweeps > 1 and getattr(model, "closed_form_vjp", False):
                vjp = model.cell.vjp_at(z_star, ud)   # the cell's closed form: no autograd pass
                for _ in range(sweeps - 1):
                    mu = vjp(mu, g)
            else:
                for _ in range(sweeps - 1):
                    mu = g + torch.autograd.grad(z_out, z_leaf, mu, retain_graph=True)[0]
            gz, gx = torch.autograd.grad(z_out, (z_leaf, xr), mu)
            self.stats["backward_nfe"] += sweeps
            self.stats["backward_work"] += sweeps * b
            mu = g + gz
            # a diverging Neumann sweep (a non-contractive cell) is restarted from the upstream
            # gradient rather than carried
            bad = ~torch.isfinite(mu.reshape(b, -1)).all(dim=1)
            if bool(bad.any()):
                mu = torch.where(bad.view((-1,) + (1,) * (mu.dim() - 1)), g, mu)
            self.mu = mu.detach()
            self.z = z_star.detach()
            self.last_logits = logits.detach()
        return gx.detach()


__all__ = ["JointInputGradient", "supports_joint"]
