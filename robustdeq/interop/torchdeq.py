"""Adopt a TorchDEQ model: the user's ``forward`` runs unchanged on robustdeq's machinery.

TorchDEQ (Geng & Kolter 2023, "TorchDEQ: A Library for Deep Equilibrium Models") builds a DEQ
from a module made by ``get_deq(...)`` that the model's ``forward`` calls as
``z_out, info = deq(f, z0)``, where ``f`` is a closure over the injected input. In eval mode
that module solves the fixed point without autograd and returns it with no gradient path to the
input, so gradient-based attacks cannot run on it; in train mode its gradient is, by default, a
one-step phantom gradient rather than the implicit one.

:func:`adopt` returns a deep copy of the model in which every TorchDEQ DEQ module is replaced by
an :class:`AdoptedDEQ` with the same call signature and output conventions (a list of states, an
info dict), backed by robustdeq:

- its solvers (:class:`~robustdeq.config.SolverConfig`: safeguarded Anderson, Broyden,
  fixed-point iteration, per-sample convergence masks), configured from the TorchDEQ module's
  ``f_solver``, ``eval_f_max_iter`` (``f_max_iter`` times ``eval_factor``), ``f_tol`` and
  ``f_stop_mode`` unless ``solver=`` is given;
- the implicit (IFT) input and parameter gradient in train AND eval mode (or any estimator of
  :mod:`robustdeq.deq.grad`, also per call with :func:`robustdeq.gradient`);
- per-sample solver statistics (``last_stats``, the ``info`` dict) and the
  :class:`~robustdeq.errors.NonConvergenceWarning`.

When the model holds exactly one TorchDEQ module and its ``forward(x)`` calls it once,
:func:`adopt` returns an :class:`AdoptedDEQClassifier`: a
:class:`~robustdeq.deq.model.DEQClassifier` whose injection is the identity (``u = x``), whose
cell is ``f`` as the user's ``forward`` builds it for ``u`` and whose read-out runs the user's
``forward`` with the DEQ module returning a given state. Everything DEQ-aware then applies:
``run(x, record=...)`` with step-indexed trajectories, intermediate-state attacks, warm starts,
DEQ-native PGD and the evaluation suites. With several DEQ modules (or ``structured=False``) the
copy itself is returned: solvers, implicit gradients, statistics and warnings apply, the
DEQ-native attacks (which need one fixed point and its read-out) do not.

What is not carried over: TorchDEQ's multi-state supervision in train mode (``n_states``,
``indexing``) -- the adopted module returns the one final state --, its ``sradius_mode`` (the
``info['sradius']`` entry is zero) and its ``solver_kwargs`` other than ``f_max_iter``.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._support import user_stacklevel
from ..config import SolverConfig, from_dict
from ..deq.grad import GradientEstimator, ImplicitGrad, make_estimator
from ..deq.model import DEQClassifier, SolverStats
from ..deq.solvers import get_solver
from ..errors import ConfigError, NonConvergenceWarning

logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'robustdeq[torchdeq]' (or pip install torchdeq==0.1.0)"

_SOLVER_NAMES = {"anderson": "anderson", "broyden": "broyden", "fixed_point_iter": "fixed_point",
                 "simple_fixed_point_iter": "fixed_point"}


def _torchdeq_base():
    """TorchDEQ's DEQ base class; a ConfigError naming the extra when TorchDEQ is missing."""
    try:
        from torchdeq.core import DEQBase
    except ImportError as e:
        raise ConfigError(f"robustdeq.adopt needs TorchDEQ, which is not installed ({e}); "
                          f"install the optional extra: {EXTRA_HINT}") from None
    return DEQBase


def find_torchdeq_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(qualified name, module)]`` of the TorchDEQ DEQ modules (``torchdeq.core.DEQBase``
    instances, what ``get_deq`` returns) inside ``model``, outermost first."""
    base = _torchdeq_base()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, base)]


def solver_config_of(deq: nn.Module) -> SolverConfig:
    """The :class:`SolverConfig` equivalent to a TorchDEQ module's forward solver settings at
    evaluation (``f_solver``, ``eval_f_max_iter``, ``f_tol``, ``f_stop_mode``)."""
    args = getattr(deq, "args", None)
    name = args.get("f_solver", "fixed_point_iter") if args is not None else "fixed_point_iter"
    if name not in _SOLVER_NAMES:
        raise ConfigError(f"TorchDEQ solver {name!r} has no robustdeq counterpart "
                          f"(known: {', '.join(_SOLVER_NAMES)}); pass adopt(..., solver=...)")
    stop = str(getattr(deq, "f_stop_mode", "abs"))
    if stop not in ("abs", "rel"):
        raise ConfigError(f"TorchDEQ f_stop_mode {stop!r} is neither 'abs' nor 'rel'")
    max_iter = int(getattr(deq, "eval_f_max_iter", 0) or getattr(deq, "f_max_iter", 40))
    return SolverConfig(name=_SOLVER_NAMES[name], max_iter=max(max_iter, 1),
                        tol=float(getattr(deq, "f_tol", 1e-3)), stop_mode=stop)


class _Packing:
    """TorchDEQ's state conventions: ``z0`` is a tensor (the state keeps its shape) or a list /
    tuple of tensors with a common batch size (the state is their flattened concatenation)."""

    def __init__(self, z_init: Union[Tensor, Sequence[Tensor]]):
        if isinstance(z_init, Tensor):
            self.shapes = None
            return
        if not isinstance(z_init, (list, tuple)) or not z_init or not all(
                isinstance(t, Tensor) for t in z_init):
            raise ConfigError(f"the DEQ's initial state must be a tensor or a non-empty list of "
                              f"tensors, got {type(z_init).__name__}")
        b = z_init[0].shape[0]
        if any(t.dim() < 1 or t.shape[0] != b for t in z_init):
            raise ConfigError("the tensors of a list state must share their batch size")
        self.shapes = [tuple(t.shape[1:]) for t in z_init]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]

    def flat(self, z) -> Tensor:
        if self.shapes is None:
            if not isinstance(z, Tensor):
                raise ConfigError(f"f returned {type(z).__name__} for a tensor state")
            return z
        if not isinstance(z, (list, tuple)) or len(z) != len(self.shapes):
            raise ConfigError(f"f must return a list of {len(self.shapes)} tensors for a list state")
        return torch.cat([t.reshape(t.shape[0], -1) for t in z], dim=1)

    def unflat(self, z: Tensor):
        if self.shapes is None:
            return z
        parts = torch.split(z.reshape(z.shape[0], -1), self.sizes, dim=1)
        return [p.reshape(p.shape[0], *s) for p, s in zip(parts, self.shapes)]


class AdoptedDEQ(nn.Module):
    """Drop-in replacement of a TorchDEQ DEQ module: ``z_out, info = deq(f, z0)``.

    Solves ``z = f(z)`` with robustdeq's solver ``solver_config`` and attaches the gradient of the
    estimator in force (default :class:`~robustdeq.deq.grad.ImplicitGrad`; the same in train and
    eval mode). Returns ``[z]`` (TorchDEQ's list of states, here the one final state, in the
    structure of ``z0``) and ``info`` with TorchDEQ's keys (``abs_lowest``, ``rel_lowest``,
    ``nstep``, ``sradius`` = 0) plus ``converged``, ``diverged`` (per sample) and ``nfe``.
    Non-convergence in eval mode raises a :class:`~robustdeq.errors.NonConvergenceWarning` (once per
    module until :meth:`reset_warnings`; counted in ``nonconvergence_events``).

    Keyword arguments of TorchDEQ's call: ``solver_kwargs={'f_max_iter': n}`` changes the iteration
    budget of the call; ``sradius_mode`` and ``backward_writer`` are accepted and ignored (see the
    module docstring); any other keyword is a ConfigError.
    """

    def __init__(self, solver: Union[SolverConfig, dict, None] = None,
                 grad: Union[GradientEstimator, str, None] = None, *, source: str = "",
                 warn_nonconvergence: bool = True):
        super().__init__()
        self.solver_config = from_dict(SolverConfig, solver)
        self.grad = make_estimator(grad) if grad is not None else ImplicitGrad()
        self.source = source
        self.warn_nonconvergence = warn_nonconvergence
        self._grad_stack: List[GradientEstimator] = []
        self.last_stats: Optional[SolverStats] = None
        self.last_info: Optional[dict] = None
        self.nonconvergence_events = 0
        self._warned = False
        self._hook: Optional[Callable] = None   # AdoptedDEQClassifier's capture / read-out hook

    @property
    def estimator(self) -> GradientEstimator:
        """The estimator in force (innermost ``gradient`` override, else ``grad``)."""
        return self._grad_stack[-1] if self._grad_stack else self.grad

    def check_estimator(self, est) -> None:
        """``ConfigError`` unless ``est`` is a gradient estimator."""
        if not isinstance(est, GradientEstimator):
            raise ConfigError(f"not a gradient estimator: {est!r}")

    def extra_repr(self) -> str:
        """The solver's name, budget and tolerance and the estimator's class."""
        return f"solver={self.solver_config.name.value}, max_iter={self.solver_config.max_iter}, " \
               f"tol={self.solver_config.tol:g}, grad={type(self.estimator).__name__}"

    def config_for(self, solver_kwargs: Optional[dict]) -> SolverConfig:
        """The solver config of one call: ``solver_config`` with ``max_iter`` set to
        ``solver_kwargs["f_max_iter"]`` when given; any other key is a ``ConfigError``."""
        cfg = self.solver_config
        if solver_kwargs:
            unknown = sorted(set(solver_kwargs) - {"f_max_iter"})
            if unknown:
                raise ConfigError(f"solver_kwargs {unknown} are not supported by the adopted DEQ "
                                  "(only f_max_iter); set the solver with adopt(..., solver=...)")
            cfg = cfg.replace(max_iter=int(solver_kwargs["f_max_iter"]))
        return cfg

    def forward(self, func: Callable, z_init, solver_kwargs: Optional[dict] = None,
                sradius_mode: bool = False, backward_writer: Any = None, **kwargs):
        """TorchDEQ's call ``deq(func, z_init) -> ([z], info)``: solve ``z = func(z)`` from
        ``z_init`` and attach the estimator's gradient (see the class); unknown keywords are a
        ``ConfigError``."""
        if kwargs:
            raise ConfigError(f"unknown keyword(s) for the adopted DEQ call: {', '.join(sorted(kwargs))}")
        pack = _Packing(z_init)
        if self._hook is not None:
            return self._hook(func, z_init, pack)
        fvec = lambda z: pack.flat(func(pack.unflat(z)))  # noqa: E731
        cfg = self.config_for(solver_kwargs)
        est = self.estimator
        z0 = pack.flat(z_init)
        keep = est.full_graph and torch.is_grad_enabled()
        slv = get_solver(cfg)
        if keep:
            res = slv.solve(fvec, z0, record=est.required_record() or None)
        else:
            with torch.no_grad():
                res = slv.solve(fvec, z0.detach(), record=est.required_record() or None)
        z = est.attach(lambda zz, _u: fvec(zz), z0.new_zeros(()), res.z, res.trajectory)
        stats = SolverStats.from_result(res)
        self.record(stats, cfg, res.fz)
        return [pack.unflat(z)], dict(self.last_info)

    def record(self, stats: SolverStats, cfg: SolverConfig, fz: Optional[Tensor], *,
               warn: bool = True) -> None:
        """Keep ``stats`` as ``last_stats`` / ``last_info``; count and (``warn``) warn on
        non-convergence."""
        self.last_stats = stats
        res = stats.residual
        if fz is not None:
            fn = torch.linalg.vector_norm(fz.detach().reshape(fz.shape[0], -1), dim=1) + cfg.eps
            abs_r, rel_r = ((res, res / fn) if cfg.stop_mode.value == "abs" else (res * fn, res))
        else:
            abs_r = rel_r = res
        self.last_info = {"abs_lowest": abs_r, "rel_lowest": rel_r, "nstep": stats.steps.float(),
                          "sradius": torch.zeros(1, device=res.device),
                          "converged": stats.converged, "diverged": stats.diverged,
                          "nfe": stats.nfe}
        if bool(stats.converged.all()) or not warn:
            return
        self.nonconvergence_events += 1
        msg = (f"adopted DEQ {self.source or ''}: {int((~stats.converged).sum())}/"
               f"{stats.converged.numel()} samples did not reach tol {cfg.tol:g} in "
               f"{cfg.max_iter} iterations; max residual {float(res.max()):.2e}")
        if self.training or not self.warn_nonconvergence or self._warned:
            logger.debug(msg)
            return
        self._warned = True
        warnings.warn(msg + " (further warnings from this module are suppressed)",
                      NonConvergenceWarning, stacklevel=user_stacklevel())

    def reset_warnings(self) -> None:
        """Let the next non-convergence warn again and zero ``nonconvergence_events``."""
        self._warned = False
        self.nonconvergence_events = 0


class _Captured(Exception):
    """Raised by the capture hook to stop the user's forward once ``f`` and ``z0`` are known."""


class _Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class _UserCell(nn.Module):
    """``f(z, u)``: the closure the user's ``forward`` passes to its DEQ module for input ``u``."""

    def __init__(self, owner: "AdoptedDEQClassifier"):
        super().__init__()
        self.__dict__["_owner"] = owner   # not a submodule: the owner holds the parameters

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        func, _, pack = self._owner.capture(u)
        return pack.flat(func(pack.unflat(z)))

    def init_state(self, u: Tensor) -> Tensor:
        _, z0, pack = self._owner.capture(u)
        return pack.flat(z0).detach()


class _UserReadout(nn.Module):
    """``readout(z)``: the user's ``forward`` on the current input with the DEQ returning ``z``."""

    def __init__(self, owner: "AdoptedDEQClassifier"):
        super().__init__()
        self.__dict__["_owner"] = owner

    def forward(self, z: Tensor) -> Tensor:
        return self._owner.read_out(z)


class AdoptedDEQClassifier(DEQClassifier):
    """A model with one TorchDEQ DEQ module, as a :class:`~robustdeq.deq.model.DEQClassifier`.

    ``net`` is the (copied) user model with its DEQ module replaced by an :class:`AdoptedDEQ`
    (``deq``). The injection is the identity (``u = x``); ``f(z, u)`` is the closure that
    ``net.forward(u)`` passes to its DEQ (obtained by running ``net.forward`` up to the DEQ call;
    cached for the latest ``u``), ``init_state(u)`` the ``z0`` it passes; ``readout(z)`` runs
    ``net.forward`` on the input of the latest :meth:`inject` with the DEQ call returning ``[z]``.
    The solver, gradient estimator and statistics are the classifier's (``solver_config``,
    ``grad``, ``last_stats``), so ``model(x)`` equals ``net(x)`` up to solver tolerance.
    """

    def __init__(self, net: nn.Module, deq_name: str, *, solver: Union[SolverConfig, dict, None] = None,
                 grad: Union[GradientEstimator, str, None] = None,
                 input_shape: Optional[Tuple[int, ...]] = None, validate_inputs: bool = True,
                 warn_nonconvergence: bool = True):
        super().__init__(_Identity(), _UserCell(self), _UserReadout(self), solver=solver, grad=grad,
                         input_shape=input_shape, validate_inputs=validate_inputs,
                         warn_nonconvergence=warn_nonconvergence)
        self.net = net
        self.deq_name = deq_name
        self._cap: Optional[tuple] = None
        self.__dict__["_u"] = None

    @property
    def deq(self) -> AdoptedDEQ:
        """The :class:`AdoptedDEQ` inside ``net`` (at ``deq_name``)."""
        return self.net.get_submodule(self.deq_name)

    def __getstate__(self):
        # the latest input and captured closure are per-call caches: a copy (deepcopy, pickle)
        # starts without them (a non-leaf input of an attack cannot be deep-copied)
        state = super().__getstate__()
        state["_u"], state["_cap"] = None, None
        return state

    def _call_net(self, x: Tensor, hook: Callable) -> Any:
        deq = self.deq
        deq._hook = hook
        try:
            return self.net(x)
        finally:
            deq._hook = None

    def capture(self, u: Tensor):
        """``(f, z0, packing)`` that ``net.forward(u)`` passes to its DEQ (cached for ``u``)."""
        if self._cap is not None and self._cap[0] is u:
            return self._cap[1:]
        got: list = []

        def hook(func, z_init, pack):
            got.append((func, z_init, pack))
            raise _Captured()
        try:
            self._call_net(u, hook)
        except _Captured:
            pass
        if not got:
            raise ConfigError(f"{type(self.net).__name__}.forward returned without calling its "
                              f"DEQ module {self.deq_name!r}; adopt(..., structured=False) keeps "
                              "the model as it is")
        self._cap = (u, *got[0])
        return got[0]

    def inject(self, x: Tensor) -> Tensor:
        """The identity injection ``u = x`` (cast to the model's dtype); kept for
        :meth:`read_out`."""
        u = self.injection(self.as_model_dtype(x))
        self.__dict__["_u"] = u
        return u

    def read_out(self, z: Tensor) -> Tensor:
        """``net.forward`` on the input of the latest :meth:`inject`, with the DEQ call
        returning ``[z]``: the logits of the state ``z``.

        Raises:
            ConfigError: no input of ``z``'s batch size was injected, the net calls its DEQ
                module more than once, or its forward does not return a logits tensor.
        """
        u = self.__dict__.get("_u")
        if u is None or u.shape[0] != z.shape[0]:
            raise ConfigError("readout(z) of an adopted TorchDEQ model needs the input of the same "
                              "batch: call inject(x) (or run(x)) first")
        calls: list = []

        def hook(func, z_init, pack):
            calls.append(1)
            if len(calls) > 1:
                raise ConfigError(f"{type(self.net).__name__}.forward calls its DEQ module more "
                                  "than once; adopt(..., structured=False) keeps the model as it is")
            return [pack.unflat(z)], dict(self.deq.last_info or {})
        out = self._call_net(u, hook)
        if not isinstance(out, Tensor):
            raise ConfigError(f"{type(self.net).__name__}.forward returns {type(out).__name__}; "
                              "an adopted classifier needs a forward that returns the logits tensor "
                              "(adopt(..., structured=False) keeps the model as it is)")
        return out

    def solve(self, u: Tensor, **kwargs):
        """:meth:`DEQClassifier.solve`, whose statistics also become the DEQ module's
        ``last_info`` (what the user's forward sees at read-out)."""
        res = super().solve(u, **kwargs)
        cfg = self.solver_config if kwargs.get("solver") is None else from_dict(SolverConfig, kwargs["solver"])
        # the DEQ module's info dict (what read-outs hand to the user's forward) describes this solve
        self.deq.record(SolverStats.from_result(res), cfg, res.fz, warn=False)
        return res

    def run(self, x: Tensor, **kwargs):
        """:meth:`DEQClassifier.run`; the captured closure of the input is dropped afterwards
        (it would keep the input's graph alive)."""
        try:
            return super().run(x, **kwargs)
        finally:
            self._cap = None   # do not keep the input's graph alive between calls


def adopt(model: nn.Module, *, solver: Union[SolverConfig, dict, None] = None,
          grad: Union[GradientEstimator, str, None] = None, structured: Optional[bool] = None,
          input_shape: Optional[Tuple[int, ...]] = None, validate_inputs: bool = True,
          warn_nonconvergence: bool = True) -> nn.Module:
    """A copy of ``model`` whose TorchDEQ DEQ modules run on robustdeq (see the module docstring).

    Args:
        model: any ``nn.Module`` containing TorchDEQ DEQ modules (what ``torchdeq.get_deq``
            returns). It is deep-copied and never changed.
        solver: the forward solver for every adopted module (default: each module's own
            TorchDEQ settings, :func:`solver_config_of`).
        grad: gradient estimator (default implicit differentiation, in every mode).
        structured: return an :class:`AdoptedDEQClassifier` (True; needs exactly one DEQ module
            called once by ``forward(x)``), the copy with replaced modules (False), or decide by
            the number of DEQ modules (None).
        input_shape, validate_inputs, warn_nonconvergence: as
            :class:`~robustdeq.deq.model.DEQClassifier` (structured form).

    Raises:
        ConfigError: TorchDEQ is not installed (naming the ``torchdeq`` extra), ``model`` has no
            TorchDEQ DEQ module, or ``structured=True`` with several.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"adopt needs a torch.nn.Module, got {type(model).__name__}")
    found = find_torchdeq_modules(model)
    if not found:
        raise ConfigError(f"{type(model).__name__} contains no TorchDEQ DEQ module (an instance of "
                          "torchdeq.core.DEQBase, as returned by torchdeq.get_deq); a hand-written "
                          "DEQ can be expressed as robustdeq.DEQClassifier(injection, cell, head)")
    if any(name == "" for name, _ in found):
        raise ConfigError("the model is itself a TorchDEQ DEQ module; adopt the model that calls it")
    if structured and len(found) != 1:
        raise ConfigError(f"structured=True needs exactly one TorchDEQ DEQ module; "
                          f"{type(model).__name__} has {len(found)}: {', '.join(n for n, _ in found)}")
    if structured is None:
        structured = len(found) == 1
    net = copy.deepcopy(model)
    for name, old in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        cfg = solver if solver is not None else solver_config_of(old)
        new = AdoptedDEQ(cfg, grad, source=name, warn_nonconvergence=warn_nonconvergence)
        new.train(old.training)
        setattr(parent, leaf, new)
    if not structured:
        return net
    name = found[0][0]
    cfg = solver if solver is not None else solver_config_of(found[0][1])
    out = AdoptedDEQClassifier(net, name, solver=cfg, grad=grad, input_shape=input_shape,
                               validate_inputs=validate_inputs,
                               warn_nonconvergence=warn_nonconvergence)
    out.train(model.training)
    return out


__all__ = ["adopt", "AdoptedDEQ", "AdoptedDEQClassifier", "find_torchdeq_modules", "solver_config_of",
           "EXTRA_HINT"]
