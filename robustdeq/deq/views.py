"""Attack views: plain ``nn.Module``s ``x -> logits`` over a DEQ, for any attack library.

``attack_view(model, grad=UnrolledGrad(8))`` attacks the final state with a chosen gradient;
``attack_view(model, state=k)`` attacks the prediction ``readout(z_k)`` of the intermediate state
``k`` (the early-exit read-out of Yang et al. 2022). Its value is exactly ``readout(z_k)`` of the
recorded raw iterate; its gradient unrolls ``unroll`` steps of ``f`` from the recorded state
``z_{k-unroll}`` (straight-through: value of the solver's state, gradient of the unroll; exact for
fixed-point iteration, whose steps the unroll takes with the solver's damping and up to each
sample's own stop, and for weight-tied models). ``attack_view(model, solver=...)`` solves
with another :class:`~robustdeq.config.SolverConfig` than the model's own (the model is not
changed).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..config import SolverConfig, from_dict
from ..errors import ConfigError
from .grad import GradientEstimator, gradient, make_estimator
from .protocols import SolverModel, TrajectoryModel


class ModelView(nn.Module):
    """Base of modules that look at a model they do not own (attack views, adaptive views of
    defenses, adapters for attack libraries).

    A view's ``training`` flag is the viewed model's, read-only: attack libraries record a module's
    flag and restore it with ``module.train()`` afterwards, which on a plain ``nn.Module`` wrapper
    (born with ``training=True``) would recurse into the user's model and leave it in train mode.
    ``view.train()`` / ``view.eval()`` therefore never change the viewed model; put the model itself
    in the mode you want. Subclasses name the attribute holding the viewed module in ``_viewed``.
    """

    _viewed = "model"

    @property
    def training(self) -> bool:  # type: ignore[override]
        """The viewed model's ``training`` flag (False when there is none yet); read-only."""
        inner = self.__dict__.get("_modules", {}).get(self._viewed)
        return bool(inner.training) if inner is not None else False

    @training.setter
    def training(self, value: bool) -> None:
        """Ignored: the flag mirrors the viewed module."""
        pass  # mirrors the viewed module; nn.Module.__init__ and mode restorers assign it

    def train(self, mode: bool = True) -> "ModelView":
        """Does nothing (the viewed model keeps its mode; see the class) and returns the view;
        a ``ValueError`` if ``mode`` is not a bool, as ``nn.Module.train``."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        return self


class AttackView(ModelView):
    """``x -> logits`` over a DEQ with a chosen gradient, state or solver (see module; built by
    :func:`attack_view`).

    Args:
        model: a model with ``run`` (a DEQ or a weight-tied model); it is not changed.
        state: None (the final state) or the index ``k`` of the intermediate state read out.
        grad: gradient estimator for the final state (None: the model's own).
        unroll: steps of ``f`` the gradient of an intermediate state unrolls.
        solver: a :class:`~robustdeq.config.SolverConfig` (or dict) used instead of the model's.
    """

    def __init__(self, model: nn.Module, *, state: Optional[int] = None,
                 grad: Union[GradientEstimator, str, None] = None, unroll: int = 5,
                 solver: Union[SolverConfig, dict, None] = None):
        super().__init__()
        if state is not None and (not isinstance(state, int) or state < 0):
            raise ConfigError(f"state must be a non-negative int, got {state!r}")
        if unroll < 1:
            raise ConfigError(f"unroll must be >= 1, got {unroll}")
        if not isinstance(model, TrajectoryModel):
            raise ConfigError(f"{type(model).__name__} has no run(); attack views need a DEQ model")
        self.model = model
        self.state = state
        self.grad = make_estimator(grad) if grad is not None else None
        if self.grad is not None and hasattr(model, "check_estimator"):
            model.check_estimator(self.grad)
        self.unroll = int(unroll)
        if solver is not None and not isinstance(model, SolverModel):
            raise ConfigError(f"solver= is for a DEQ solved by a solver; {type(model).__name__} has none")
        self.solver = from_dict(SolverConfig, solver) if solver is not None else None
        self.input_shape = getattr(model, "input_shape", None)

    def describe(self) -> dict:
        """The view's settings (state, unroll, gradient, solver) as a JSON-ready dict."""
        from ..config import to_dict
        return {"state": self.state, "unroll": self.unroll,
                "grad": self.grad.describe() if self.grad is not None else "model default",
                "solver": to_dict(self.solver) if self.solver is not None else "model default"}

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``x``: the final state with the view's gradient or solver, or the read-out
        of the intermediate state (:func:`state_logits`)."""
        if self.state is None:
            if self.solver is not None:
                return self.model.run(x, grad=self.grad, solver=self.solver).logits
            ctx = gradient(self.model, self.grad) if self.grad is not None else contextlib.nullcontext()
            with ctx:
                return self.model(x)
        return state_logits(self.model, x, self.state, self.unroll, solver=self.solver)


class TransferView(ModelView):
    """A surrogate ``source`` model whose adversarial examples are judged on another model: a
    transfer attack (Papernot et al. 2016). The harness adds one over the undefended base model to
    the adaptive views of every inference-time defense (a defense whose own gradients are useless
    is often broken by examples crafted on the model it wraps), and one per model named in
    ``evaluate(..., transfer_from=...)``."""

    view_kind = "transfer"

    def __init__(self, source: nn.Module, name: str = "base"):
        super().__init__()
        if not isinstance(source, nn.Module):
            raise ConfigError(f"a transfer source must be an nn.Module x -> logits, got {type(source).__name__}")
        self.model = source
        self.source_name = str(name)
        self.input_shape = getattr(source, "input_shape", None)

    def describe(self) -> dict:
        """``{"view": "transfer", "source", "source_type"}``: the surrogate's name and class."""
        return {"view": "transfer", "source": self.source_name, "source_type": type(self.model).__name__}

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the source model on ``x``."""
        return self.model(x)


def unroll_solver_steps(model: nn.Module, u: Tensor, z_from: Tensor, start: int, state: int,
                        res=None, solver: Union[SolverConfig, dict, None] = None) -> Tensor:
    """The solver's iterates from the recorded state ``z_from`` (step ``start``) to step
    ``state``, recomputed with autograd by ``model.unroll``: the steps of fixed-point iteration
    (its ``damping`` when the solve's config, ``solver`` or the model's, is ``fixed_point``; plain
    steps ``f`` otherwise), and, given the solve's result ``res``, a sample that stopped at step
    ``s < state`` (``res.steps = s + 1``: converged or diverged, so its recorded states after
    ``s`` are its frozen iterate ``z_s``) takes only its steps up to ``s``. For fixed-point
    iteration the value is the recorded state ``z_state`` itself (up to float rounding).

    A sample that stopped at or before ``start`` has no solver step in the window: its state is
    its final iterate, in which the window's straight-through gradient would see no dependence
    on the input at all. It takes the window's ``state - start`` steps from that iterate instead
    (the fixed point's unrolled gradient, as for a sample that had not stopped): a surrogate
    gradient whose value is that iterate up to the solver's tolerance."""
    n = state - start
    cfg = getattr(model, "solver_config", None) if solver is None else from_dict(SolverConfig, solver)
    damping = float(cfg.damping) if cfg is not None and cfg.name.value == "fixed_point" else 1.0
    z = z_from.detach()
    steps = None if res is None else getattr(res, "steps", None)
    if steps is None or n <= 0 or bool((steps > state).all()):
        return model.unroll(u, z, n, damping=damping) if damping != 1.0 else model.unroll(u, z, n)
    # per sample: the steps the solver took from ``start`` before the sample stopped
    todo = (torch.clamp(steps.to(z.device) - 1, max=state) - start).clamp(min=0)
    todo = torch.where(todo == 0, torch.full_like(todo, n), todo)   # stopped before the window
    view = (-1,) + (1,) * (z.dim() - 1)
    for i in range(int(todo.max())):
        z_next = model.unroll(u, z, 1, damping=damping) if damping != 1.0 else model.unroll(u, z, 1)
        z = torch.where((todo > i).view(view), z_next, z)
    return z


def state_logits(model: nn.Module, x: Tensor, state: int, unroll: int = 5,
                 solver: Union[SolverConfig, dict, None] = None) -> Tensor:
    """``readout(z_state)`` with the straight-through unrolled gradient described in the module
    (``solver``: the solve's config, default the model's; the unroll takes the solver's steps,
    :func:`unroll_solver_steps`)."""
    x = model.check_input(x)
    u = model.inject(x)
    start = max(state - unroll, 0)
    if hasattr(model, "solve"):
        res = model.solve(u, record=sorted({start, state}), solver=solver)
        traj = {t.step: t.z for t in res.trajectory}
        if state not in traj:
            raise ConfigError(f"state {state} is beyond the solver's max_iter")
        z_k, z_from = traj[state], traj[start]
        z_hat = unroll_solver_steps(model, u, z_from, start, state, res, solver)
    else:  # weight-tied: layers are the trajectory
        with torch.no_grad():
            eq = model.run(x, record=sorted({start, state}), grad="none")
        traj = {t.step: t.z for t in eq.trajectory}
        z_k, z_from = traj[state], traj[start]
        z_hat = model.unroll(u, z_from.detach(), state - start, start=start)
    z = z_k.detach() + (z_hat - z_hat.detach())
    return model.readout(z)


def attack_view(model: nn.Module, *, state: Optional[int] = None,
                grad: Union[GradientEstimator, str, None] = None, unroll: int = 5,
                solver: Union[SolverConfig, dict, None] = None) -> AttackView:
    """A module ``x -> logits`` to hand to any attack (torchattacks, pyautoattack, ours).

    ``state``: attack the intermediate state ``k``; ``grad``: the gradient estimator; ``solver``:
    the forward solves' :class:`~robustdeq.config.SolverConfig` (or mapping), default the
    model's own (e.g. a longer or exact solve, or another registered solver)."""
    return AttackView(model, state=state, grad=grad, unroll=unroll, solver=solver)


__all__ = ["ModelView", "AttackView", "TransferView", "attack_view", "state_logits",
           "unroll_solver_steps"]
