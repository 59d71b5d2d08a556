"""Input-entropy reduction along the neural dynamics (IER; Yang, Li, Pang, Liu, ICML 2023).

An inference-time defense (Yang et al. 2023, Sec. 3): the received input is
updated *while* the DEQ is being solved, so that the intermediate states predict with low entropy::

    x_hat = x;  z = z0;  solver state = init(f(., x_hat), z0)
    for r in 1..rounds:
        solver_steps steps of the solver on f(., x_hat)          (steppable solver protocol)
        repeat inner_steps times:
            H = sum_b entropy(softmax(readout(f(z, x_hat))))     at the current state z (detached)
            x_hat <- clip_[0,1](clip_[x - radius, x + radius](x_hat - step_size * sign(grad_x_hat H)))
        re-bind f to the new x_hat; reset the solver's convergence flags (and memory, see below)
    logits = readout(z)  ("last-but-one", the paper's read-out)  or  readout(f(z, x_hat)) ("last")

Choices made here (documented because they differ from, or are unspecified by, the paper's code):

* **Solver memory after an input update** (``memory=``): ``"reset"`` (default) calls
  :meth:`Solver.reset`, clearing the quasi-Newton / Anderson memory built for the old ``f``;
  ``"keep"`` resets only the convergence flags and keeps the (stale) memory. The paper's code
  instead patches Broyden's last rank-one pair ("lifting the orbit"); neither option reproduces
  that surgery.
* **Read-out.** ``"last-but-one"`` reads the solver state after the last round's solver steps: that
  state was computed with the input as updated after round ``rounds - 1``, so the last round's input
  updates cannot influence it and are skipped (the paper computes and discards them);
  :meth:`EntropyDefense.purify` returns the input that state was computed with. ``"last"`` applies
  ``f`` once more with the input updated after the final round (the paper's final branch used the
  original input there, a bug).
* **Entropy summed over the batch**, not averaged: the update of a sample never depends on the
  batch it is in (identical to the paper's mean under ``sign``).
* ``sign=False`` replaces the sign step by the raw gradient step (a smooth variant, used to check
  the gradient of the differentiated procedure against finite differences).

Gradients and adaptive views (the paper attacked the model *without* the defense; robustdeq attacks
the defended pipeline too and reports the worse):

* the plain ``forward`` keeps autograd through the solver steps and the input updates with the update
  direction held constant. ``sign`` has zero derivative almost everywhere, so for ``sign=True`` this
  is exactly the derivative of the whole procedure (piecewise);
* ``adaptive_views()["through-updates"]`` differentiates the whole procedure, including the
  dependence of the update direction on the state and the input (``create_graph``) when
  ``sign=False``;
* ``adaptive_views()["bpda"]``: forward = the defense, backward = the gradient of the undefended
  model at the purified input, the purification ``x -> x_hat`` treated as the identity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SolverConfig, check_radius, from_dict
from ..deq.model import one_weight
from ..deq.solvers import get_solver
from ..deq.views import ModelView
from ..errors import ConfigError

logger = logging.getLogger(__name__)

_READOUTS = ("last-but-one", "last")
_MEMORY = ("reset", "keep")
_NEEDS = ("solver_config", "inject", "f", "readout", "init_state", "check_input")


def prediction_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy ``-sum_c p_c log p_c`` of ``softmax(logits)``: (B, C) -> (B,)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


@dataclass
class EntropyResult:
    """What :meth:`EntropyDefense.run` returns.

    ``logits`` (B, C); ``x_hat``: the input the read-out state was computed with; ``states``: the
    solver iterates after each solver step (z_1 .. z_{rounds*solver_steps}); ``entropy_before`` /
    ``entropy_after``: per round, the per-sample entropy of ``readout(f(z, x_hat))`` before and after
    that round's input updates (only with ``record=True``); ``x_final``: the input after every
    update (equal to ``x_hat`` for ``readout="last"``).
    """

    logits: Tensor
    x_hat: Tensor
    x_final: Tensor
    states: List[Tensor] = field(default_factory=list)
    entropy_before: List[Tensor] = field(default_factory=list)
    entropy_after: List[Tensor] = field(default_factory=list)


class EntropyDefense(nn.Module):
    """Input-entropy reduction around a :class:`~robustdeq.deq.model.DEQClassifier`.

    Args:
        model: a DEQ with a steppable solve (``solver_config``, ``inject``, ``f``, ``readout``,
            ``init_state``); ``ConfigError`` otherwise (e.g. weight-tied or feed-forward models).
        rounds: rounds of (solver steps, input updates); paper 4.
        solver_steps: solver steps per round (T_f); paper 2.
        inner_steps: input updates per round (R); paper 10.
        step_size: input step (2/255); radius: L-inf radius around the received input (8/255).
        readout: ``"last-but-one"`` (paper) or ``"last"`` (see the module docstring).
        sign: sign-gradient steps (paper) or raw gradient steps (``False``).
        solver: solver config for the defense (default: the model's ``solver_config``).
        memory: ``"reset"`` or ``"keep"`` the solver memory after an input update.
    """

    randomized = False
    dynamic = True
    differentiable = True

    def __init__(self, model: nn.Module, *, rounds: int = 4, solver_steps: int = 2, inner_steps: int = 10,
                 step_size: float = 2 / 255, radius: float = 8 / 255, readout: str = "last-but-one",
                 sign: bool = True, solver: Union[SolverConfig, dict, None] = None, memory: str = "reset"):
        super().__init__()
        missing = [a for a in _NEEDS if not hasattr(model, a)]
        if missing:
            raise ConfigError(f"EntropyDefense needs a DEQ with a steppable solver; "
                              f"{type(model).__name__} lacks {', '.join(missing)}")
        for name, v, lo in (("rounds", rounds, 1), ("solver_steps", solver_steps, 1),
                            ("inner_steps", inner_steps, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if not step_size >= 0:
            raise ConfigError(f"step_size must be >= 0, got {step_size}")
        check_radius(radius, "radius")
        if readout not in _READOUTS:
            raise ConfigError(f"unknown readout {readout!r}; expected one of {', '.join(_READOUTS)}")
        if readout == "last-but-one" and rounds < 2:
            raise ConfigError("readout='last-but-one' needs rounds >= 2: the last round's input updates "
                              "do not reach the read-out, so with one round the input is never updated")
        if memory not in _MEMORY:
            raise ConfigError(f"unknown memory option {memory!r}; expected one of {', '.join(_MEMORY)}")
        if not isinstance(sign, bool):
            raise ConfigError(f"sign must be a bool, got {sign!r}")
        self.model = model
        self.rounds, self.solver_steps, self.inner_steps = rounds, solver_steps, inner_steps
        self.step_size, self.radius = float(step_size), float(radius)
        self.readout_mode, self.sign, self.memory = readout, sign, memory
        self.solver_config = from_dict(SolverConfig, solver) if solver is not None else model.solver_config
        self.input_shape = getattr(model, "input_shape", None)
        # born in the wrapped model's mode: a wrapper in train mode around an eval model would
        # make attack libraries that restore the flag with .train() switch the model to train mode
        self.training = model.training

    def describe(self) -> dict:
        """The defense's settings as a JSON-ready dict: rounds, solver and inner steps, step
        size, radius, read-out, sign, memory option and the solver's name."""
        return {"name": "input_entropy_reduction", "rounds": self.rounds, "solver_steps": self.solver_steps,
                "inner_steps": self.inner_steps, "step_size": self.step_size, "radius": self.radius,
                "readout": self.readout_mode, "sign": self.sign, "memory": self.memory,
                "solver": self.solver_config.name.value}

    # -- the procedure ------------------------------------------------------------------------
    def _entropy_of(self, z: Tensor, x_hat: Tensor) -> Tensor:
        m = self.model
        return prediction_entropy(m.readout(m.f(z, m.inject(x_hat))))

    def _input_step(self, x: Tensor, x_hat: Tensor, z: Tensor, exact: bool) -> Tensor:
        smooth_exact = exact and not self.sign
        with torch.enable_grad():
            if smooth_exact:
                # a fresh node: the partial derivative in x_hat at fixed z, even when z was
                # itself computed from x_hat (first round: x_hat is x)
                xh = x_hat.clone() if x_hat.requires_grad else x_hat.detach().requires_grad_(True)
                zz = z
            else:
                xh, zz = x_hat.detach().requires_grad_(True), z.detach()
            H = self._entropy_of(zz, xh).sum()
            (g,) = torch.autograd.grad(H, xh, create_graph=smooth_exact)
        d = g.sign() if self.sign else g
        if not smooth_exact:
            d = d.detach()
        x_new = x_hat - self.step_size * d
        x_new = torch.min(torch.max(x_new, x - self.radius), x + self.radius)
        return x_new.clamp(0.0, 1.0)

    def run(self, x: Tensor, *, exact: bool = False, record: bool = False) -> EntropyResult:
        """The defense on a batch ``x`` (B, *input_shape) in [0, 1] -> :class:`EntropyResult`.

        ``exact``: differentiate the update directions too (the through-updates view).
        ``record``: also compute the per-round entropies before/after the input updates.

        The solver steps, the input updates and the read-out use one weight of the model
        (:func:`~robustdeq.deq.model.one_weight`: in train mode a spectrally normalised cell takes
        one power-iteration step per call, not one per evaluation of ``f``).
        """
        m = self.model
        x = m.check_input(x)
        with one_weight(m):
            return self._run(x, exact, record)

    def _run(self, x: Tensor, exact: bool, record: bool) -> EntropyResult:
        m = self.model
        if hasattr(m, "prepare"):
            m.prepare()
        solver = get_solver(self.solver_config)
        x_hat = x
        u = m.inject(x_hat)

        def bind(u_):
            return lambda z: m.f(z, u_)

        f = bind(u)
        state = solver.init(f, m.init_state(u))
        states: List[Tensor] = []
        before: List[Tensor] = []
        after: List[Tensor] = []
        x_used = x_hat
        for r in range(self.rounds):
            for _ in range(self.solver_steps):
                state = solver.step(f, state)
                states.append(state.z.view(state.shape))
            x_used = x_hat
            if r == self.rounds - 1 and self.readout_mode == "last-but-one":
                break  # these updates could not reach the read-out state
            z = state.z.view(state.shape)
            if record:
                with torch.no_grad():
                    before.append(self._entropy_of(z, x_hat))
            for _ in range(self.inner_steps):
                x_hat = self._input_step(x, x_hat, z, exact)
            if record:
                with torch.no_grad():
                    after.append(self._entropy_of(z, x_hat))
            u = m.inject(x_hat)
            f = bind(u)
            mem = state.memory
            solver.reset(state)
            if self.memory == "keep":
                state.memory = mem
        z = state.z.view(state.shape)
        if self.readout_mode == "last":
            z = m.f(z, u)
            x_used = x_hat
        logits = m.readout(z)
        return EntropyResult(logits=logits, x_hat=x_used, x_final=x_hat, states=states,
                             entropy_before=before, entropy_after=after)

    def forward(self, x: Tensor) -> Tensor:
        """The defended logits of ``x``: ``run(x).logits``."""
        return self.run(x).logits

    @torch.no_grad()
    def purify(self, x: Tensor) -> Tensor:
        """The input the read-out state was computed with (B, *input_shape), detached."""
        return self.run(x).x_hat.detach()

    def adaptive_views(self) -> Dict[str, nn.Module]:
        """Modules ``x -> logits`` an evaluation must attack besides the defense itself."""
        return {"through-updates": ThroughUpdatesView(self), "bpda": BPDAView(self)}


class _DefenseView(ModelView):
    """An adaptive view of an :class:`EntropyDefense` (its mode is the defense's); ``view_name``
    names it in ``describe()``."""

    _viewed = "defense"
    view_name = ""

    def __init__(self, defense: EntropyDefense):
        super().__init__()
        self.defense = defense
        self.input_shape = defense.input_shape

    def describe(self) -> dict:
        return {"view": self.view_name, **self.defense.describe()}


class ThroughUpdatesView(_DefenseView):
    """The defense, differentiated through the whole procedure (solver steps and input updates;
    the update directions too when ``sign=False``). Same forward value as the defense."""

    view_name = "through-updates"

    def forward(self, x: Tensor) -> Tensor:
        """The defense's logits of ``x``, differentiated through the whole procedure."""
        return self.defense.run(x, exact=True).logits


class BPDAView(_DefenseView):
    """BPDA (Athalye et al. 2018): forward = the defense's logits; backward = the input gradient of
    the undefended model at the purified input ``x_hat``, passed to ``x`` as if ``x_hat = x``.
    The model's own gradient estimator is used (``robustdeq.gradient`` overrides apply)."""

    view_name = "bpda"

    def forward(self, x: Tensor) -> Tensor:
        """The defense's logits of ``x``, with the undefended model's input gradient at the
        purified input as gradient (straight-through)."""
        with one_weight(self.defense.model):  # the defense and the surrogate: one weight
            with torch.no_grad():
                res = self.defense.run(x)
            x_st = x + (res.x_hat - x).detach()
            surrogate = self.defense.model(x_st)
            return res.logits.detach() + (surrogate - surrogate.detach())


__all__ = ["EntropyDefense", "EntropyResult", "ThroughUpdatesView", "BPDAView", "prediction_entropy"]
