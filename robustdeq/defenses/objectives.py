"""Training objectives for (adversarial) training of DEQs: ``objective(model, x, y) -> (loss, scalars)``.

=================  =====================================================================================
``CrossEntropy``   standard training: CE on ``model(x)``
``PGDAT``          PGD adversarial training (Madry et al., ICLR 2018): CE on PGD examples of the model itself
``TRADES``         CE(h(x), y) + beta KL(softmax h(x) || softmax h(x')), x' from ``steps`` sign steps
                   on the KL from x + 0.001 N(0, I) (Zhang et al., ICML 2019; as in Yang et al. 2023)
``JIIOAT``         inner maximisation by the JIIO augmented fixed point (robustdeq.deq.jiio),
                   CE at the fixed point re-solved at x + delta*, implicit backward warm-started
                   from the attack's adjoint mu*
``GaussianNoise``  Gaussian data augmentation for randomized smoothing (Cohen, Rosenfeld, Kolter
                   2019): CE on ``model(x + sigma e)``, ``e ~ N(0, I)``, the noisy input not
                   clipped to [0, 1] (as the smoothed classifier sees it; ``clip=True`` to clip)
=================  =====================================================================================

Random intermediate states (RIS, Yang, Li, Pang, Liu 2023; ``state="random"``): in EVERY forward of
the objective (the clean one, the adversarial one and every forward inside the attack generator)
a budget ``n ~ U{1..N}`` is drawn (one per forward call shared by the batch, ``state_sampling=
"batch"``, as in the paper's code; or one per sample, ``"sample"``), the model's solver takes exactly
``n`` steps from ``z_0`` with no early stop (``tol=0``) to its n-th iterate ``z_n`` (what a solve
with ``max_iter = n + 1``, ``select="last"`` returns: ``max_iter`` counts evaluations of ``f``), then
``phantom_steps`` damped steps ``z <- (1 - tau) z + tau f(z, u)`` with autograd
(5 and 0.5 by default), and the loss is taken on ``readout(z)`` (the paper's code applies one
undamped step ``f(z_n)`` before the damped ones; we follow the paper's Eq. for RIS and apply only the
damped steps). The draws of the latest call are kept in ``objective.sampled_states`` (a list of
(B,) int tensors, one per forward) and summarised in the scalars ``state_mean/min/max``.

``N`` (``max_state``) defaults to the forward solver's ``max_iter - 1``: the states ``z_1 ..
z_{max_iter-1}`` are those the deployed solve evaluates and can return (a solve with ``max_iter``
evaluations never returns ``z_{max_iter}``). The paper's code draws the forward threshold ``T ~
U{1..f_thres}`` and evaluates with ``T = f_thres``; its Broyden takes ``T`` steps (``T + 1``
evaluations of ``f``, ``z_0 .. z_T``) and returns one of ``z_1 .. z_T``, so its training states
are those its deployed solver visits: ``f_thres`` is our ``max_iter - 1``. (Its state is the
lowest-residual of ``z_1 .. z_T``; ours is ``z_n`` itself.)

Jacobian regularisation (``jac_reg > 0``; Bai et al. 2021): ``jac_reg * mean_b ||eps_b^T J_b||^2 / d``
with ``eps ~ N(0, I)`` (``jac_probes`` probes), a Hutchinson estimate of ``||J||_F^2 / d`` with
``J = df/dz`` at the (detached) state the loss is read from (``z*``, or the RIS state).

Radius warm-up (``eps_warmup = W > 0``, PGD-AT, TRADES, JIIO-AT): the training radius grows
linearly, ``eps * min(1, (t + 1) / W)`` at training step t, and stays at ``eps`` after W steps (the
step size, when left at its default, follows the radius). Adversarial training at a large radius
from scratch can stall at chance accuracy (MNIST at Linf 0.3 with a few epochs does); a ramp over
the first epochs is the usual remedy (e.g. Gowal et al. 2018, Wong et al. 2020). The
:class:`~robustdeq.train.Trainer` sets ``t`` before every step (so a resumed run continues the
ramp); an objective used on its own counts its calls. The radius in use is the scalar ``eps``.

Every inner attack runs with the model in eval mode and its parameters frozen; the modes of all
submodules and the ``requires_grad`` flags are restored afterwards, and the training forward uses
the mode the model had when the objective was called.

One weight per evaluation: an objective computes its loss (every training forward, RIS iterates
and phantom steps included, and the Jacobian penalty) in one
:func:`~robustdeq.deq.model.one_weight` block, so each parametrised weight of a DEQ is computed
once there, with its graph: in train mode a spectrally normalised cell takes one power-iteration
step per evaluation, and the loss and its gradient are those of one map (not of a weight that moves
at every evaluation of ``f``). The inner attack runs before, in eval mode (no power-iteration step),
with the weights of its own forwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._tensor import draw, default_alpha, seeded_generator
from ..config import Norm, check_radius, coerce_enum, from_dict
from ..deq.grad import ImplicitGrad
from ..deq.model import one_weight
from ..deq.regularizers import jacobian_penalty
from ..deq.protocols import FixedPointModel, IteratingModel
from ..deq.jiio import (JIIOConfig, cross_entropy_objective, default_direction, jiio_attack,
                        optimize_inputs, threat_constraint)
from ..deq.warm import WarmStart, WarmStartImplicitGrad, run_warm
from ..errors import ConfigError
from ..guard import preserve_model

logger = logging.getLogger(__name__)

__all__ = [
    "Objective", "CrossEntropy", "PGDAT", "TRADES", "JIIOAT", "GaussianNoise", "make_objective",
    "register_objective",
    "jacobian_penalty", "ris_forward", "inner_pgd", "preserve_modes", "RandomStateObjective",
]


# ============================================================================== helpers
@contextlib.contextmanager
def preserve_modes(model: nn.Module, *, eval: bool = False, freeze: bool = False):
    """Restore every submodule's ``training`` flag (and parameters' ``requires_grad``) on exit
    (:func:`robustdeq.guard.preserve_model`, flags only); optionally switch to eval mode and
    freeze the parameters inside the block."""
    with preserve_model(model, "eval" if eval else "keep", values=False, who="a training objective"):
        if freeze:
            for p in model.parameters():
                p.requires_grad_(False)
        yield model


def _rand(shape, like: Tensor, gen: Optional[torch.Generator], kind: str = "normal") -> Tensor:
    """Noise of ``shape`` like ``like``: from ``gen`` (drawn on the CPU), or the global RNG (None)."""
    return draw(kind, shape, like, gen)


#: the inner maximisation's loss is summed over the batch (a per-sample gradient B times the
#: attacks' batch-mean one): with ``eps_for_division`` 1e-12 in the L2 step, as before the
#: consolidation; the Linf sign step does not see the factor
_INNER_REDUCTION = "sum"
_INNER_EPS_FOR_DIVISION = 1e-12


def inner_pgd(forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, eps: float, alpha: float,
              steps: int, norm: Union[str, Norm] = "Linf", random_start: bool = True,
              generator: Optional[torch.Generator] = None, reduction: str = _INNER_REDUCTION) -> Tensor:
    """PGD on ``CE(forward(x'), y)`` inside ``B_eps(x) & [0, 1]`` (the inner loop of PGD-AT), run
    by the attacks' engine :func:`robustdeq.attacks.pgd.pgd_loop`.

    ``forward``: x -> logits (B, C). Linf: sign steps and clamp; L2: normalised steps and
    projection onto the ball (random start as torchattacks: a random direction at radius
    ``U(0, 1) eps``; none when ``eps == 0``). ``reduction``: the CE's batch reduction, "sum"
    (default, the training objectives' historical choice) or "mean" (the attacks'); the Linf
    iterates do not depend on it, the L2 ones only through the ``1e-12`` added to the gradient
    norm. Returns the detached adversarial batch, same shape as ``x``.
    """
    from ..attacks.pgd import pgd_loop
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    norm = coerce_enum(Norm, norm, "norm")

    def grad_fn(xa: Tensor, ya: Tensor) -> Tensor:
        xr = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(forward(xr), ya, reduction=reduction)
            return torch.autograd.grad(loss, xr)[0]

    return pgd_loop(x.detach(), y, grad_fn, eps=eps, alpha=alpha, steps=steps, norm=norm.value,
                    random_start=bool(random_start and eps > 0), gen=generator,
                    eps_for_division=_INNER_EPS_FOR_DIVISION, random_radius="linear").detach()


def ris_forward(model: nn.Module, x: Tensor, *, max_state: int, sampling: str = "batch",
                phantom_steps: int = 5, phantom_tau: float = 0.5,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One random-intermediate-state forward.

    Returns ``(logits (B, C), z (state the logits are read from), u, n (B,) int64)``.
    ``n ~ U{1..max_state}``, one draw shared by the batch (``"batch"``) or one per sample
    (``"sample"``); ``z_n`` is the model solver's n-th iterate from ``z_0 = init_state`` (``n``
    solver steps, no early stop: :meth:`~robustdeq.deq.model.DEQClassifier.iterates`), then
    ``phantom_steps`` damped steps with autograd. The injection, the iterates, the phantom steps
    and the read-out use one weight (:func:`~robustdeq.deq.model.one_weight`: in train mode a
    spectrally normalised cell takes one power-iteration step per call).
    """
    if not isinstance(model, IteratingModel):
        raise ConfigError(f"random intermediate states need a DEQ with a solver; {type(model).__name__} has none")
    x = model.check_input(x)
    b = x.shape[0]
    count = 1 if sampling == "batch" else b
    if generator is None:
        n = torch.randint(1, max_state + 1, (count,))
    else:
        n = torch.randint(1, max_state + 1, (count,), generator=generator)
    n = n.expand(b).clone() if count == 1 else n
    with one_weight(model):
        u = model.inject(x)
        z = model.iterates(u, n)  # the solver's n-th iterate per sample (no autograd)
        for _ in range(phantom_steps):
            fz = model.f(z, u)
            z = fz if phantom_tau == 1.0 else (1 - phantom_tau) * z + phantom_tau * fz
        return model.readout(z), z, u, n


# ============================================================================== base class
_STATES = (None, "random")
_SAMPLING = ("batch", "sample")


@dataclass
class Objective:
    """Base of the training objectives. Subclasses implement :meth:`__call__`.

    Common options: ``state`` (None: the final state / fixed point; "random": RIS),
    ``state_sampling`` ("batch" | "sample"), ``max_state`` (N; default the model's forward
    ``max_iter - 1``, the last iterate a forward solve evaluates, or 8 for a model without a
    ``solver_config``), ``phantom_steps``/``phantom_tau``, ``jac_reg``/``jac_probes``, ``seed``
    (a private generator for every random draw of the objective; None: the global RNG).
    """

    state: Optional[str] = None
    state_sampling: str = "batch"
    max_state: Optional[int] = None
    phantom_steps: int = 5
    phantom_tau: float = 0.5
    jac_reg: float = 0.0
    jac_probes: int = 1
    seed: Optional[int] = None
    sampled_states: List[Tensor] = field(default_factory=list, init=False, repr=False, compare=False)

    name = "objective"

    def __post_init__(self):
        #: training steps taken: set by the Trainer before each step (global step index, so a
        #: resumed run continues the schedule), counted by the objective's own calls otherwise
        self.train_step = 0
        if self.state not in _STATES:
            raise ConfigError(f"unknown state {self.state!r} for {type(self).__name__}; expected None or 'random'")
        if self.state_sampling not in _SAMPLING:
            raise ConfigError(f"unknown state_sampling {self.state_sampling!r}; expected 'batch' or 'sample'")
        if self.max_state is not None and (not isinstance(self.max_state, int) or self.max_state < 1):
            raise ConfigError(f"max_state must be an int >= 1 or None, got {self.max_state!r}")
        if not isinstance(self.phantom_steps, int) or self.phantom_steps < 1:
            raise ConfigError(f"phantom_steps must be an int >= 1, got {self.phantom_steps!r}")
        if not 0 < self.phantom_tau <= 1:
            raise ConfigError(f"phantom_tau must be in (0, 1], got {self.phantom_tau}")
        if not self.jac_reg >= 0:
            raise ConfigError(f"jac_reg must be >= 0, got {self.jac_reg}")
        if not isinstance(self.jac_probes, int) or self.jac_probes < 1:
            raise ConfigError(f"jac_probes must be an int >= 1, got {self.jac_probes!r}")
        self._gen = seeded_generator(self.seed)

    # -- forwards --------------------------------------------------------------------------------
    def _n_states(self, model) -> int:
        """``N`` of the RIS draws ``n ~ U{1..N}``: ``max_state``, or the forward solver's
        ``max_iter - 1`` (its last evaluated iterate ``z_{max_iter-1}``; see the module)."""
        if self.max_state is not None:
            return self.max_state
        cfg = getattr(model, "solver_config", None)
        if cfg is None:
            return 8
        if int(cfg.max_iter) < 2:
            raise ConfigError(f"random intermediate states: the forward solver's max_iter is {cfg.max_iter}, "
                              "so a solve returns only the initial state z_0; raise max_iter or pass max_state")
        return int(cfg.max_iter) - 1

    def forward_full(self, model: nn.Module, x: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(logits, z, u)``: logits in the objective's read-out (final state or RIS), with the
        (detached) state and the injection for the Jacobian penalty when available."""
        if self.state == "random":
            logits, z, u, n = ris_forward(model, x, max_state=self._n_states(model),
                                          sampling=self.state_sampling, phantom_steps=self.phantom_steps,
                                          phantom_tau=self.phantom_tau, generator=self._gen)
            self.sampled_states.append(n.detach().cpu())
            return logits, z.detach(), u
        if self.jac_reg > 0 and isinstance(model, FixedPointModel):
            eq = model.run(x)
            return eq.logits, eq.z_star, eq.u
        return model(x), None, None

    def forward(self, model: nn.Module, x: Tensor) -> Tensor:
        """Logits in the objective's read-out (used inside the attack generators too)."""
        if self.state == "random":
            return self.forward_full(model, x)[0]
        return model(x)

    def _penalty(self, model, z, u, loss, scalars) -> Tensor:
        if self.jac_reg > 0:
            if z is None or u is None:
                raise ConfigError(f"jac_reg needs a DEQ exposing its fixed point; {type(model).__name__} does not")
            r = jacobian_penalty(model, z, u, self.jac_probes, self._gen)
            scalars["jac"] = float(r.detach())
            loss = loss + self.jac_reg * r
        return loss

    def _begin(self):
        self.sampled_states = []

    def set_train_step(self, step: int) -> None:
        """The index of the training step about to run (0-based, over the whole run)."""
        self.train_step = int(step)

    @property
    def current_eps(self) -> float:
        """The radius of this training step: ``eps``, or with ``eps_warmup = W > 0`` the linear
        ramp ``eps * min(1, (t + 1) / W)`` over the first W steps (t = :attr:`train_step`), the
        usual way to adversarially train at a large radius (e.g. MNIST at Linf 0.3) that a model
        trained from scratch cannot fit at once."""
        w = getattr(self, "eps_warmup", 0)
        return float(self.eps) if not w else float(self.eps) * min(1.0, (self.train_step + 1) / w)

    def _check_warmup(self) -> None:
        w = self.eps_warmup
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"eps_warmup must be an int >= 0 (training steps), got {w!r}")

    def _end_step(self, scalars: dict) -> dict:
        """After a training step: record the radius in use (with a warm-up) and count the step."""
        if getattr(self, "eps_warmup", 0):
            scalars["eps"] = self.current_eps
        self.train_step += 1
        return scalars

    def reseed_generator(self, seed: int) -> None:
        """Restart the private generator from ``seed`` (``self.seed``, the recorded setting, is
        kept): each process of a multi-process training run draws its own random numbers."""
        self._gen = torch.Generator().manual_seed(int(seed))

    def _state_scalars(self, scalars: dict) -> dict:
        if self.state == "random" and self.sampled_states:
            n = torch.cat(self.sampled_states).float()
            scalars["state_mean"] = float(n.mean())
            scalars["state_min"] = float(n.min())
            scalars["state_max"] = float(n.max())
        return scalars

    def describe(self) -> dict:
        """The objective's name and constructor settings as a JSON-ready dict (enums by value)."""
        d = {"name": self.name}
        for f in dataclasses.fields(self):
            if f.init:
                v = getattr(self, f.name)
                d[f.name] = v.value if hasattr(v, "value") else v
        return d

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor):  # pragma: no cover - interface
        raise NotImplementedError


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.detach().argmax(dim=1) == y).float().mean())


# ============================================================================== objectives
@dataclass
class CrossEntropy(Objective):
    """Standard training: ``CE(model(x), y)`` (or on a random intermediate state)."""

    name = "ce"

    def __call__(self, model, x, y):
        self._begin()
        with one_weight(model, join=True):
            logits, z, u = self.forward_full(model, x)
            ce = F.cross_entropy(logits, y)
            scalars = {"ce": float(ce.detach()), "acc": _acc(logits, y)}
            loss = self._penalty(model, z, u, ce, scalars)
        scalars["loss"] = float(loss.detach())
        return loss, self._state_scalars(scalars)


def _check_threat(obj, steps_min: int = 1):
    obj.norm = coerce_enum(Norm, obj.norm, "norm")
    check_radius(obj.eps, "eps")
    if not isinstance(obj.steps, int) or obj.steps < steps_min:
        raise ConfigError(f"steps must be an int >= {steps_min}, got {obj.steps!r}")
    if obj.alpha is not None and not obj.alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {obj.alpha}")
    obj._check_warmup()


@dataclass
class PGDAT(Objective):
    """PGD adversarial training: CE on ``x' = PGD(x)`` (``steps`` steps of size ``alpha``,
    default ``2.5 eps / steps``, in ``B_eps(x) & [0, 1]``), attack run in eval mode with the
    model's gradient estimator (or through RIS forwards when ``state="random"``). With
    ``warm_start`` (final-state attacks on a DEQ) step t's forward solve starts from step t-1's
    fixed point and, for the implicit gradient, its adjoint solve from step t-1's adjoint."""

    eps: float = 0.1
    alpha: Optional[float] = None
    steps: int = 7
    norm: Union[str, Norm] = "Linf"
    random_start: bool = True
    warm_start: bool = True
    eps_warmup: int = 0

    name = "pgd_at"

    def __post_init__(self):
        super().__post_init__()
        _check_threat(self)

    @property
    def step_size(self) -> float:
        """The attack's step: ``alpha``, or by default ``2.5 * eps / steps`` at this step's
        radius (:attr:`current_eps`)."""
        return self.alpha if self.alpha is not None else default_alpha(self.current_eps, self.steps)

    def generate(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The adversarial batch (model in eval mode, frozen parameters, modes restored)."""
        with preserve_modes(model, eval=True, freeze=True):
            if self.state is None and self.warm_start and isinstance(model, FixedPointModel):
                # the model's warm starts (robustdeq.deq.warm): forward solve from the previous
                # step's fixed point, implicit backward from its adjoint, per converged sample
                state = WarmStart(adjoint=True)
                forward = lambda xi: run_warm(model, xi, state).logits  # noqa: E731
            else:
                forward = lambda xi: self.forward(model, xi)  # noqa: E731
            return inner_pgd(forward, x, y, eps=self.current_eps, alpha=self.step_size,
                             steps=self.steps, norm=self.norm, random_start=self.random_start,
                             generator=self._gen)

    def loss_at(self, model, x_adv, y):
        """The outer loss on a given adversarial batch: ``(loss, scalars)`` (one weight for the
        forward and the penalty: :func:`~robustdeq.deq.model.one_weight`)."""
        with one_weight(model, join=True):
            logits, z, u = self.forward_full(model, x_adv)
            ce = F.cross_entropy(logits, y)
            scalars = {"ce_adv": float(ce.detach()), "acc_adv": _acc(logits, y)}
            loss = self._penalty(model, z, u, ce, scalars)
        scalars["loss"] = float(loss.detach())
        return loss, scalars

    def __call__(self, model, x, y):
        self._begin()
        x_adv = self.generate(model, x, y)
        loss, scalars = self.loss_at(model, x_adv, y)
        return loss, self._state_scalars(self._end_step(scalars))


@dataclass
class TRADES(Objective):
    """TRADES (Zhang et al., ICML 2019): ``CE(h(x), y) + beta * KL(softmax h(x) || softmax h(x'))``
    (KL summed over classes, averaged over the batch, gradient through both terms), ``x'`` from
    ``steps`` ascent steps on the KL (to the detached clean prediction, eval mode) starting at
    ``clip(x + 0.001 N(0, I), 0, 1)``; step ``alpha`` default ``2.5 eps / steps`` (= 2/255 at 8/255
    and 10 steps)."""

    beta: float = 6.0
    eps: float = 0.1
    alpha: Optional[float] = None
    steps: int = 10
    norm: Union[str, Norm] = "Linf"
    eps_warmup: int = 0

    name = "trades"

    def __post_init__(self):
        super().__post_init__()
        _check_threat(self)
        if not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")

    @property
    def step_size(self) -> float:
        """The inner ascent's step: ``alpha``, or by default ``2.5 * eps / steps`` at this step's
        radius (:attr:`current_eps`)."""
        return self.alpha if self.alpha is not None else default_alpha(self.current_eps, self.steps)

    def generate(self, model: nn.Module, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """``x'``: ``steps`` ascent steps on ``KL(softmax h(x) || softmax h(x'))`` from the start
        described in the class, in ``B_eps(x) & [0, 1]`` (model in eval mode with frozen
        parameters, modes restored). ``y`` is unused (TRADES needs no labels for ``x'``)."""
        from ..attacks.pgd import pgd_loop
        x = x.detach()
        with preserve_modes(model, eval=True, freeze=True):
            with torch.no_grad():
                p_nat = F.softmax(self.forward(model, x), dim=1)
            start = (x + 0.001 * _rand(x.shape, x, self._gen, "normal")).clamp(0.0, 1.0)

            def grad_fn(xa: Tensor, _y) -> Tensor:
                xr = xa.detach().requires_grad_(True)
                with torch.enable_grad():
                    kl = F.kl_div(F.log_softmax(self.forward(model, xr), dim=1), p_nat, reduction="sum")
                    return torch.autograd.grad(kl, xr)[0]
            x_adv = pgd_loop(x, p_nat, grad_fn, eps=self.current_eps, alpha=self.step_size, steps=self.steps,
                             norm=self.norm.value, random_start=False, gen=None, start=start,
                             eps_for_division=_INNER_EPS_FOR_DIVISION)
        return x_adv.detach()

    def loss_at(self, model, x, x_adv, y):
        """The outer TRADES loss for a given ``x'``: ``(loss, scalars)`` (the clean and the
        adversarial forward and the penalty use one weight: :func:`~robustdeq.deq.model.one_weight`)."""
        with one_weight(model, join=True):
            logits_nat, z, u = self.forward_full(model, x)
            logits_adv = self.forward(model, x_adv)
            ce = F.cross_entropy(logits_nat, y)
            kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                          reduction="sum") / x.shape[0]
            loss = ce + self.beta * kl
            scalars = {"ce": float(ce.detach()), "kl": float(kl.detach()), "acc": _acc(logits_nat, y),
                       "acc_adv": _acc(logits_adv, y)}
            loss = self._penalty(model, z, u, loss, scalars)
        scalars["loss"] = float(loss.detach())
        return loss, scalars

    def __call__(self, model, x, y):
        self._begin()
        x_adv = self.generate(model, x, y)
        loss, scalars = self.loss_at(model, x, x_adv, y)
        return loss, self._state_scalars(self._end_step(scalars))


@dataclass
class JIIOAT(Objective):
    """JIIO adversarial training (Gurumurthy et al., NeurIPS 2021): the inner maximisation is the JIIO
    augmented solve of :mod:`robustdeq.deq.jiio` (``iters`` iterations of one f + one VJP, default
    14; ``select`` the iterate it returns, default "next": the map's output at the last iterate,
    so that 14 evaluations make 14 input steps, like PGD-AT's last step; "last" returns the same
    state one evaluation later, "best" the iterate of lowest augmented residual, which with sign
    steps is no measure of attack strength ("last" / "next" train models at least as robust as
    "best" with fewer iterations; ``benchmarks/bench_jiio.py`` compares them);
    ``solver`` "fixed_point" or "anderson", ``direction`` of the input step default sign for Linf
    and normalised for L2, step size ``alpha`` default ``eps/4``);
    the training loss is CE at the fixed point re-solved at ``x + delta*`` (warm-started from the
    joint iterate), with the implicit backward warm-started from ``-mu*/B`` when the model's
    estimator is :class:`~robustdeq.deq.grad.ImplicitGrad` and ``warm_start`` (the JIIO adjoint of
    ``-CE_b`` rescaled to the mean CE), plus the optional Jacobian penalty at ``z*`` (the paper's
    variant at a random point of the JIIO trajectory is not implemented). Adversarial examples
    only, no clean term, as in the paper. Random intermediate states are not available for this
    objective (``state`` must be None).

    Starting point of the joint solve: ``random_start`` starts ``x`` at a random point of the
    threat ball (uniform in the Linf cube, uniform in the L2 ball; drawn from the objective's
    generator, ``seed``) instead of ``x`` itself, as PGD-AT does; ``z_init`` starts the joint
    state ``z`` from the model's initial state ("init", default, as in the paper) or from the
    model's own (no-grad) forward solve at the starting input ("solve": the joint iteration then
    begins at the fixed point, and its first input steps already use an adjoint of the right
    state). Both default to the paper's choices.
    """

    eps: float = 0.1
    norm: Union[str, Norm] = "Linf"
    iters: int = 14
    alpha: Optional[float] = None
    alpha_final: Optional[float] = None
    direction: Optional[str] = None
    solver: str = "fixed_point"
    m: int = 20
    select: str = "next"
    warm_start: bool = True
    random_start: bool = False
    z_init: str = "init"
    eps_warmup: int = 0

    name = "jiio_at"

    def __post_init__(self):
        super().__post_init__()
        if self.state is not None:
            raise ConfigError("JIIOAT does not support state='random' (the JIIO solve targets the fixed point)")
        self.norm = coerce_enum(Norm, self.norm, "norm")
        check_radius(self.eps, "eps")
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ConfigError(f"iters must be an int >= 1, got {self.iters!r}")
        self._check_warmup()
        # validates direction/solver/select/m
        JIIOConfig(iters=self.iters, alpha=self.eps / 4 if self.alpha is None else self.alpha,
                   alpha_final=self.alpha_final, direction=self.direction or "sign", solver=self.solver,
                   m=self.m, select=self.select)
        if not isinstance(self.random_start, bool):
            raise ConfigError(f"random_start must be a bool, got {self.random_start!r}")
        if self.z_init not in ("init", "solve"):
            raise ConfigError(f"z_init must be 'init' (the model's initial state) or 'solve' (its fixed "
                              f"point at the starting input), got {self.z_init!r}")
        self.last_backward = None

    def generate(self, model, x, y):
        """``InputOptResult`` of the JIIO attack (eval mode, modes restored)."""
        eps = self.current_eps
        with preserve_modes(model, eval=True):
            if not self.random_start and self.z_init == "init":
                return jiio_attack(model, x, y, eps=eps, norm=self.norm, iters=self.iters, alpha=self.alpha,
                                   alpha_final=self.alpha_final, direction=self.direction, solver=self.solver,
                                   m=self.m, select=self.select, resolve=False)
            from .._tensor import random_in_ball
            x = x.detach()
            cfg = JIIOConfig(iters=self.iters, alpha=eps / 4 if self.alpha is None else self.alpha,
                             alpha_final=self.alpha_final, direction=default_direction(self.norm, self.direction),
                             solver=self.solver, m=self.m, select=self.select, resolve=False)
            C = threat_constraint(x, eps, self.norm)
            x0 = C.project(x + random_in_ball(x, eps, self.norm, self._gen)) if self.random_start else x
            z0 = None
            if self.z_init == "solve":
                with torch.no_grad():
                    z0 = model.solve(model.inject(x0)).z
            return optimize_inputs(model, cross_entropy_objective(y), C, x0=x0, config=cfg, z0=z0)

    def __call__(self, model, x, y):
        self._begin()
        r = self.generate(model, x, y)
        x_adv = model.check_input(r.x)
        est = model.estimator
        west = None
        if self.warm_start and type(est) is ImplicitGrad:
            # the implicit backward starts from the attack's adjoint (see the class docstring)
            west = WarmStartImplicitGrad(-r.mu / x.shape[0], solver=est.solver)
            self.last_backward = west
        with one_weight(model, join=True):
            eq = model.run(x_adv, z0=r.z_joint, grad=west)
            logits, z_star, u = eq.logits, eq.z_star, eq.u
            ce = F.cross_entropy(logits, y)
            scalars = {"ce_adv": float(ce.detach()), "acc_adv": _acc(logits, y), "jiio_nfe": float(r.nfe),
                       "jiio_residual": float(r.residual.mean())}
            loss = self._penalty(model, z_star, u, ce, scalars)
        scalars["loss"] = float(loss.detach())
        return loss, self._end_step(scalars)


@dataclass
class GaussianNoise(Objective):
    """Gaussian data augmentation (Cohen, Rosenfeld, Kolter 2019): ``CE(model(x + sigma e), y)``
    with ``e ~ N(0, I)`` drawn per sample and step (from the objective's generator when ``seed``
    is set). The noisy input leaves [0, 1] and is not clipped (``clip=True`` clips it), so the
    model learns the base classifier that randomized smoothing evaluates
    (:mod:`robustdeq.certify.smoothing` with the same ``sigma`` and ``clip``); the model's own
    gradient estimator provides the gradient. Random intermediate states and the Jacobian penalty
    are not available for this objective."""

    sigma: float = 0.25
    clip: bool = False

    name = "gaussian_noise"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not self.sigma > 0 \
                or self.sigma == float("inf"):
            raise ConfigError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if self.state is not None:
            raise ConfigError("GaussianNoise does not support state='random'")
        if self.jac_reg > 0:
            raise ConfigError("GaussianNoise does not support jac_reg (train with noise, or regularise, not both)")

    def __call__(self, model, x, y):
        from ..deq.noisy import base_logits
        self._begin()
        xn = x + self.sigma * _rand(x.shape, x, self._gen, "normal")
        logits = base_logits(model, xn, clip=self.clip)
        ce = F.cross_entropy(logits, y)
        scalars = {"ce_noisy": float(ce.detach()), "acc_noisy": _acc(logits, y), "loss": float(ce.detach())}
        return ce, scalars


from ..registry import OBJECTIVES  # noqa: E402 - name -> Objective dataclass (or builder(**options))


def register_objective(name: str, cls: Optional[Callable[..., Objective]] = None, *, replace: bool = False):
    """Make ``make_objective(name, **options)`` build ``cls``: an :class:`Objective` dataclass
    (options checked by :func:`~robustdeq.config.from_dict`) or a function ``(**options) ->
    Objective``. Without ``cls``, a decorator. Re-registering a name (a built-in included) is a
    ConfigError unless ``replace=True``."""
    return OBJECTIVES.register(name, cls, replace=replace)


def make_objective(spec: Union[str, Objective, None] = "ce", **options) -> Objective:
    """An objective from a name ("ce", "pgd_at", "trades", "jiio_at", "gaussian_noise" or a
    registered one) and options; unknown names or options raise
    :class:`~robustdeq.errors.ConfigError`."""
    if spec is None:
        spec = "ce"
    if isinstance(spec, Objective):
        if options:
            raise ConfigError("options given together with an objective instance")
        return spec
    entry = OBJECTIVES.get(spec)
    if dataclasses.is_dataclass(entry) and isinstance(entry, type):
        return from_dict(entry, options)
    return entry(**options)


def RandomStateObjective(base: str = "pgd_at", **options) -> Objective:  # noqa: N802 - factory
    """Shortcut for ``make_objective(base, state="random", **options)`` (RIS training)."""
    return make_objective(base, state="random", **options)
