"""The input-gradient oracle every gradient attack runs on: ``(x, y, loss) -> gradient``.

An attack (PGD, APGD, ...) asks :class:`GradientOracle` for ``d loss(model(x), y) / dx`` at its
current iterates and gets back, with the gradient, the logits it was taken at, the loss values and
per-sample flags saying whether the forward solve converged and which computation served the
sample. How the gradient of a DEQ is computed is the oracle's policy, not the attack's:

- ``"exact"``: at every call a forward solve and, for the implicit (IFT) gradient, an adjoint
  solve to tolerance, each warm-started from the previous call's solution for the samples whose
  previous solve converged (:class:`InputGradient`; unconverged solves never warm-start
  anything, :mod:`robustdeq.deq.warm`); any other module ``x -> logits`` by plain autograd;
- ``"joint"``: the joint forward / adjoint / input iteration
  (:class:`robustdeq.deq.joint.JointInputGradient`): the DEQ state and the adjoint are carried
  from one call to the next and advanced by a few iterations per call;
- ``"auto"``: the joint iteration for the samples whose first solve (the model's own, at the
  first point asked) converges, the exact computation for the others. A batch where only some
  first solves converge is split: each group is served by its own computation from the first
  call on (the joint iteration restarted on its group), so a sample gets what it would get in
  a batch of its own group only.

The joint iteration's logits are its own estimate, not the model's inference, so an attack
judges the examples it returns for joint-served samples by the model's own cold inference (see
:class:`~robustdeq.attacks.pgd.PGD` and :class:`~robustdeq.attacks.apgd.APGD`).

``eot_iter > 1`` averages the gradient over that many calls at the same point (expectation over
transformation, Athalye et al. 2018, as AutoAttack's ``rand`` version: for a model whose
inference is random); the logits and loss returned are the last call's.

Loss functions return a scalar (differentiated as is) or per-sample values ``(B,)`` (their sum
is differentiated and the values are returned in :attr:`OracleOutput.loss`).
"""
from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from .._support import user_stacklevel
from ..deq.warm import (WarmStart, implicit_input_gradient, run_warm,
                        supports_implicit_input_gradient)
from ..errors import ConfigError, NonConvergenceWarning, reject_unknown
from .base import check_int, check_num_classes, estimator_name, is_deq

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]

#: the oracle's policies
POLICIES = ("auto", "joint", "exact")

_STAT_KEYS = ("calls", "forward_nfe", "backward_nfe", "forward_work", "backward_work",
              "forward_unconverged", "backward_unconverged")


def _resolve_estimator(model: nn.Module, grad):
    """``None`` (the model's own) or an estimator instance valid for ``model``."""
    if grad is None:
        return None
    from ..deq.grad import make_estimator
    est = make_estimator(grad)
    if hasattr(model, "check_estimator"):
        model.check_estimator(est)
    elif not any(hasattr(m, "_grad_stack") for m in model.modules()):
        raise ConfigError(f"grad={estimator_name(est)!r} was given but {type(model).__name__} "
                          "contains no DEQ whose gradient can be chosen")
    return est


class InputGradient:
    """The exact computation: ``(x, y) -> d loss(model(x), y) / dx`` with a chosen estimator and
    warm starts.

    Args:
        model: any module ``x -> logits``; a DEQ (``solve``/``run``) gets warm starts.
        grad: gradient estimator (instance or name) or None for the model's own.
        warm_start: start each forward solve from the previous call's fixed point and, for the
            implicit gradient, each adjoint solve from the previous adjoint, for the samples
            whose previous solve converged (the others start as the model's inference does).

    Call :meth:`reset` between independent runs (a new batch). ``stats`` counts the function
    evaluations of the forward and adjoint solves.
    """

    def __init__(self, model: nn.Module, grad=None, warm_start: bool = True):
        self.model = model
        self.estimator = _resolve_estimator(model, grad)
        self.deq = is_deq(model)
        self.warm_start = bool(warm_start)
        #: the warm-start state (robustdeq.deq.warm): the previous call's fixed point and
        #: adjoint with their per-sample convergence flags
        self.state = WarmStart(adjoint=False)
        self.reset()

    def reset(self) -> None:
        """Start a new run: forget the warm-start states, the latest logits and convergence
        flags, and zero the statistics."""
        self.state.reset()
        self.last_logits: Optional[Tensor] = None  # logits at the latest call's inputs (detached)
        #: (B,) bool: the latest call's forward solve converged per sample (True off a DEQ)
        self.last_converged: Optional[Tensor] = None
        self.stats = {k: 0 for k in _STAT_KEYS}
        self._checked = False

    def reset_warm_start(self) -> None:
        """Forget the warm-start states (the next call starts a new batch); keeps the stats."""
        self.state.reset()

    def select(self, keep: Tensor) -> None:
        """Continue with the samples ``keep`` (indices into the latest call's batch) only: the
        warm-start states follow them."""
        self.state.select(keep)

    def current_estimator(self):
        """The estimator in force: the one given to the constructor, else the model's own (None
        off a DEQ)."""
        if self.estimator is not None:
            return self.estimator
        return getattr(self.model, "estimator", None)

    def warm(self) -> bool:
        """Whether warm starts apply (a DEQ, and not full backpropagation: through a warm-started
        solve it would only see the last few iterations, a different gradient).

        Where a solve starts (:mod:`robustdeq.deq.warm`): the previous call's solution for the
        samples whose previous solve converged, the model's initial state for the others (as the
        model's own inference starts: warm-starting a solve that never converged attacks another
        function than the model's inference). For the adjoint, a linear system with one
        solution, a start only changes how close an unconverged iterate gets to it; a
        non-converged previous adjoint is still not reused (it may come from a divergent
        iteration)."""
        est = self.current_estimator()
        return self.warm_start and self.deq and not getattr(est, "full_graph", False)

    def __call__(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """The gradient of ``loss_fn(logits(x), y)`` w.r.t. ``x`` (shape of ``x``)."""
        self.stats["calls"] += 1
        est = self.current_estimator()
        if self.deq and supports_implicit_input_gradient(self.model, est):
            # the model's warm-started, shrinking-batch implicit gradient (robustdeq.deq.warm)
            r = implicit_input_gradient(self.model, x, y, loss_fn, est,
                                        warm=self.state if self.warm() else None,
                                        check_logits=lambda logits: self._check(logits, y))
            for k, v in r.stats.items():
                self.stats[k] += v
            self.last_logits = r.logits
            self.last_converged = r.converged
            return r.grad
        xr = x.detach().requires_grad_(True)
        if self.deq:
            eq = run_warm(self.model, xr, self.state if self.warm() else None, grad=self.estimator)
            logits = eq.logits
            self.last_converged = eq.stats.converged.detach()
            self.stats["forward_nfe"] += int(eq.stats.nfe)
            self.stats["forward_unconverged"] += int((~eq.stats.converged).sum())
        elif self.estimator is not None:
            from ..deq.grad import gradient
            with gradient(self.model, self.estimator):
                logits = self.model(xr)
        else:
            logits = self.model(xr)
        self._check(logits, y)
        self.last_logits = logits.detach()
        if not self.deq:
            self.last_converged = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        cost = loss_fn(logits, y)
        return torch.autograd.grad(cost, xr, retain_graph=False, create_graph=False)[0]

    def _check(self, logits: Tensor, y: Tensor) -> None:
        if not self._checked:
            check_num_classes(y, logits)
            self._checked = True

    def warn_if_unconverged(self, who: str) -> None:
        """Emit a :class:`~robustdeq.errors.NonConvergenceWarning` naming ``who`` if some forward
        or adjoint solve of the run missed its tolerance."""
        _warn_unconverged(self.stats, who)


def _warn_unconverged(s: Dict[str, int], who: str) -> None:
    if s["forward_unconverged"] or s["backward_unconverged"]:
        warnings.warn(
            f"{who}: over {s['calls']} gradient evaluations, {s['forward_unconverged']} "
            f"forward and {s['backward_unconverged']} adjoint per-sample solves did not reach "
            "their tolerance; the attack's gradients may be inaccurate",
            NonConvergenceWarning, stacklevel=user_stacklevel())


def joint_eligible(model: nn.Module, grad, warm_start: bool) -> bool:
    """Whether policy ``"auto"`` can use the joint iteration: a DEQ with the pieces it needs,
    whose attack gradient is the implicit one at its defaults (``grad="ift"``, or ``None`` with
    the model's own estimator implicit; the joint iteration approximates exactly that
    gradient), and warm starts not turned off (``warm_start=False`` asks for the exact cold
    computation)."""
    from ..deq.grad import ImplicitGrad
    from ..deq.joint import supports_joint
    if not (warm_start and is_deq(model) and supports_joint(model)):
        return False
    if grad is None:
        return isinstance(getattr(model, "estimator", None), ImplicitGrad)
    return isinstance(grad, str) and grad == "ift"


@dataclass
class OracleOutput:
    """What one oracle call returns (all detached, rows = the call's batch).

    Attributes:
        grad: the input gradient of the loss (its sum for per-sample losses).
        logits: the logits the gradient was taken at (the oracle's own solves: for joint-served
            samples the joint iteration's estimate, not the model's inference).
        loss: the per-sample loss values ``(B,)``, or None when the loss is a scalar.
        converged: ``(B,)`` bool, the forward solve converged (True off a DEQ; False for the
            joint iteration's partial solves after its first call).
        joint: ``(B,)`` bool, the sample is served by the joint iteration.
    """

    grad: Tensor
    logits: Tensor
    loss: Optional[Tensor]
    converged: Tensor
    joint: Tensor


class GradientOracle:
    """Input gradients of a model under a policy (module docstring).

    Args:
        model: any module ``x -> logits``.
        policy: ``"auto"``, ``"joint"`` or ``"exact"``. ``"auto"`` falls back to ``"exact"``
            wherever the joint iteration does not apply (:func:`joint_eligible`: a feed-forward
            model, another gradient estimator, ``warm_start=False``).
        grad: gradient estimator for a DEQ (name or instance) or None for the model's own.
        warm_start: warm-start the exact computation's solves (see :class:`InputGradient`).
        joint_options: options of :class:`~robustdeq.deq.joint.JointInputGradient`
            (``fwd_iters``, ``adj_iters``, ``first_adj_iters``, ``fwd_solver``).
        eot_iter: gradients averaged per call (expectation over the model's randomness).
        joint_defaults: an attack's own defaults for ``joint_options`` (those given override
            them); unlike ``joint_options`` they are simply unused where the joint iteration
            does not serve.

    Call :meth:`reset` before each run on a new batch and :meth:`select` when the batch of the
    next calls shrinks to some rows of the latest call's. ``stats`` counts the solves' work;
    :attr:`joint_rows` says which rows of the run's first batch the joint iteration serves.
    """

    def __init__(self, model: nn.Module, policy: str = "auto", grad=None, warm_start: bool = True,
                 joint_options: Optional[Dict[str, object]] = None, eot_iter: int = 1,
                 joint_defaults: Optional[Dict[str, object]] = None):
        if policy not in POLICIES:
            raise ConfigError(f"method must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not isinstance(warm_start, bool):
            raise ConfigError(f"warm_start must be a bool, got {warm_start!r}")
        self.model = model
        self.eot_iter = check_int(eot_iter, "eot_iter", low=1)
        self.exact = InputGradient(model, None if policy == "joint" else grad, warm_start=warm_start)
        if policy == "joint":
            from ..deq.joint import supports_joint
            if not (is_deq(model) and supports_joint(model)):
                raise ConfigError(f"method='joint' needs a DEQ (a fixed-point model with inject, f, "
                                  f"readout, init_state and solver_config); got {type(model).__name__}")
        elif policy == "auto" and not joint_eligible(model, grad, warm_start):
            policy = "exact"
        if joint_options and policy == "exact":
            raise ConfigError("joint_options is only for the joint iteration (method='joint' or "
                              "'auto' on a DEQ with the implicit gradient)")
        self.joint = None
        if policy != "exact":
            from ..deq.joint import JointInputGradient
            known = [n for n in inspect.signature(JointInputGradient).parameters if n != "model"]
            reject_unknown(joint_options or {}, known, "the joint iteration (joint_options)")
            self.joint = JointInputGradient(model, **dict(joint_defaults or {}, **(joint_options or {})))
        #: the resolved policy: "auto", "joint" or "exact"
        self.policy = policy
        self.reset()

    @property
    def estimator(self):
        """The estimator asked for (None: the model's own)."""
        return self.exact.estimator

    def reset(self) -> None:
        """Start a new run (a new batch): forget every carried state and the stats."""
        self.exact.reset()
        if self.joint is not None:
            self.joint.reset()
        self._mask: Optional[Tensor] = None  # rows of the current batch the joint iteration serves
        self._labels_checked = False  # the run's labels fit the model's logits (checked once)
        #: (B,) bool over the run's first batch: the rows the joint iteration serves (None
        #: before the first call)
        self.joint_rows: Optional[Tensor] = None
        self.last: Optional[OracleOutput] = None

    def reset_warm_start(self) -> None:
        """Forget the exact computation's warm starts (its next call starts a new batch)."""
        self.exact.reset_warm_start()

    @property
    def stats(self) -> Dict[str, int]:
        """The run's counters: the exact computation's, plus the joint iteration's where it
        runs."""
        out = dict(self.exact.stats)
        if self.joint is not None:
            for k, v in self.joint.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def logits_are_inference(self) -> bool:
        """Whether the logits this oracle returns are the model's own inference: off a DEQ, or
        exact solves from the model's initial state with the model's own gradient (pyautoattack's
        computation). Otherwise (the joint iteration, warm-started solves, another estimator)
        they are an estimate, to be confirmed by the model's inference."""
        return not is_deq(self.model) or (self.policy == "exact" and not self.exact.warm()
                                          and self.estimator is None)

    @property
    def method(self) -> Optional[str]:
        """What served the run so far: "joint", "exact" or "mixed" (None before the first call)."""
        if self.joint_rows is None:
            return None
        n = int(self.joint_rows.sum())
        return "joint" if n == self.joint_rows.numel() else "exact" if n == 0 else "mixed"

    def warm(self) -> bool:
        """Whether the exact computation warm-starts its solves (:meth:`InputGradient.warm`)."""
        return self.exact.warm()

    def select(self, keep: Tensor) -> None:
        """Go on with the rows ``keep`` (indices into the latest call's batch) only."""
        if self.policy == "exact":
            self.exact.select(keep)
            return
        if self.policy == "joint":
            self.joint.select(keep)
            return
        if self._mask is None:
            return
        mask = self._mask
        kept = mask[keep]
        jpos = torch.cumsum(mask.long(), 0) - 1
        epos = torch.cumsum((~mask).long(), 0) - 1
        if self.joint is not None and bool(mask.any()):
            self.joint.select(jpos[keep[kept]])
        if bool((~mask).any()):
            self.exact.select(epos[keep[~kept]])
        self._mask = kept

    def warn_if_unconverged(self, who: str) -> None:
        """Warn if the exact computation's solves missed their tolerance (the joint iteration's
        partial solves are not meant to converge; its results are judged cold)."""
        self.exact.warn_if_unconverged(who)

    # -- the call ---------------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> OracleOutput:
        grad = None
        for _ in range(self.eot_iter):
            out = self._once(x, y, loss_fn)
            grad = out.grad if grad is None else grad + out.grad
        if self.eot_iter > 1:
            out.grad = grad / float(self.eot_iter)
        self.last = out
        return out

    def _once(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> OracleOutput:
        b = x.shape[0]
        if self.policy == "exact":
            return self._serve(self.exact, x, y, loss_fn, joint=False)
        if self.policy == "joint":
            return self._serve(self.joint, x, y, loss_fn, joint=True)
        if self._mask is None:  # "auto", the run's first call: who serves which sample
            first = self._serve(self.joint, x, y, loss_fn, joint=True)
            ok = self.joint.last_converged
            self._mask = ok.clone()
            self.joint_rows = ok.clone()
            if bool(ok.all()):
                return first
            self.joint.reset()
            if not bool(ok.any()):
                logger.debug("no first solve converged; the exact computation serves every sample")
            else:
                logger.debug("%d of %d first solves did not converge; the exact computation "
                             "serves those", int((~ok).sum()), b)
        mask = self._mask
        if bool(mask.all()):
            return self._serve(self.joint, x, y, loss_fn, joint=True)
        if not bool(mask.any()):
            return self._serve(self.exact, x, y, loss_fn, joint=False)
        rj, re = mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]
        oj = self._serve(self.joint, x[rj], y[rj], loss_fn, joint=True)
        oe = self._serve(self.exact, x[re], y[re], loss_fn, joint=False)

        def merge(a: Optional[Tensor], e: Optional[Tensor]) -> Optional[Tensor]:
            if a is None or e is None or a.dim() == 0:
                return None
            out = a.new_empty((b,) + tuple(a.shape[1:]))
            out[rj] = a
            out[re] = e
            return out

        return OracleOutput(grad=merge(oj.grad, oe.grad), logits=merge(oj.logits, oe.logits),
                            loss=merge(oj.loss, oe.loss), converged=merge(oj.converged, oe.converged),
                            joint=mask.clone())

    def _serve(self, backend, x: Tensor, y: Tensor, loss_fn: LossFn, joint: bool) -> OracleOutput:
        seen = {}

        def scalar(logits: Tensor, yy: Tensor) -> Tensor:
            if not self._labels_checked:  # every backend's loss, the joint iteration's included
                check_num_classes(yy, logits)
                self._labels_checked = True
            v = loss_fn(logits, yy)
            if v.dim():
                seen["loss"] = v.detach()
                return v.sum()
            return v

        g = backend(x, y, scalar)
        if self.joint_rows is None and self.policy != "auto":
            self.joint_rows = torch.full((x.shape[0],), joint, dtype=torch.bool, device=x.device)
        return OracleOutput(grad=g.detach(), logits=backend.last_logits, loss=seen.get("loss"),
                            converged=backend.last_converged,
                            joint=torch.full((x.shape[0],), joint, dtype=torch.bool, device=x.device))

    def describe(self) -> Dict[str, object]:
        """The oracle's settings as a dict: ``method`` (the policy), the joint iteration's
        options where it has one, and ``eot_iter`` when above 1."""
        out: Dict[str, object] = {"method": self.policy}
        if self.joint is not None:
            o = self.joint
            out["joint_options"] = {"fwd_iters": o.fwd_iters, "adj_iters": o.adj_iters,
                                    "first_adj_iters": o.first_adj_iters, "fwd_solver": o.fwd_solver}
        if self.eot_iter > 1:
            out["eot_iter"] = self.eot_iter
        return out


__all__ = ["GradientOracle", "OracleOutput", "InputGradient", "POLICIES", "joint_eligible"]
