"""AutoAttack (Croce & Hein, ICML 2020) through ``pyautoattack`` (the package index's fra31/auto-attack).

The adapter runs pyautoattack unmodified on the model, or on an
:func:`~robustdeq.deq.views.attack_view` of a DEQ (``view={"state": k, "grad": "unrolled",
"unroll": 5}``) so that the chosen read-out and gradient apply. It adds what the library lacks:
the global RNG that pyautoattack seeds is restored afterwards, its never-reset dynamic-defense
counter is reset before each run (otherwise every model after a flagged one is flagged), and the
trace function its dynamic-defense check removes (``sys.settrace(None)``: coverage, debuggers)
is put back.

On a DEQ attacked as is, ``fast_deq=True`` (opt-in) makes the model side of the run cheaper
without touching AutoAttack's algorithm or the function attacked
(:class:`robustdeq.deq.memory.WarmMemory`): the implicit backward's adjoint to an attack-grade
tolerance from each sample's latest converged adjoint, forward warm starts only on a cell
certified contractive, and repeated evaluations restarted from their converged state.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..deq.views import ModelView
from ..errors import ConfigError, reject_unknown
from .._tensor import project_ball
from .base import Attack, check_int, global_rng, is_deq

logger = logging.getLogger(__name__)

VERSIONS = ("standard", "plus", "rand", "custom")
ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
#: sub-objects of pyautoattack.AutoAttack whose attributes ``settings`` may set
COMPONENTS = ("apgd", "apgd_targeted", "fab", "square")
VIEW_KEYS = ("state", "grad", "unroll")


def pyautoattack_version() -> str:
    """The installed pyautoattack's version ("unknown" without package metadata)."""
    try:
        from importlib.metadata import version
        return version("pyautoattack")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def make_view(model: nn.Module, view: Optional[Dict[str, Any]]) -> nn.Module:
    """The module an external library attacks: ``model`` itself or an attack view of it."""
    if view is None:
        return model
    if not isinstance(view, dict):
        raise ConfigError(f"view must be a dict of attack_view options ({', '.join(VIEW_KEYS)}) "
                          f"or None, got {type(view).__name__}")
    reject_unknown(view, VIEW_KEYS, "view")
    from ..deq.views import attack_view
    return attack_view(model, **view)


def describe_view(view: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A JSON-ready copy of the ``view`` options (an estimator instance given as ``grad`` is
    replaced by its short name), or None."""
    if view is None:
        return None
    out = dict(view)
    if "grad" in out and not isinstance(out["grad"], (str, type(None))):
        from .base import estimator_name
        out["grad"] = estimator_name(out["grad"])
    return out


class _CastInput(ModelView):
    """pyautoattack casts inputs to float32; this casts them back to the model's dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype))


class AutoAttack(Attack):
    """pyautoattack's AutoAttack as a robustdeq :class:`Attack`.

    Args:
        eps, norm: threat model (Linf or L2).
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square), "plus", "rand" (EOT for randomised
            defenses) or "custom" with ``attacks``.
        attacks: for ``version="custom"``, a list among apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square.
        view: options of :func:`robustdeq.deq.views.attack_view` (``state``, ``grad``,
            ``unroll``), or None for the model as is.
        seed: pyautoattack's seed (the global RNG is restored afterwards).
        batch_size: pyautoattack's batch size.
        settings: attributes of pyautoattack's components to set after construction, e.g.
            ``{"apgd.n_iter": 20, "square.n_queries": 500}`` (unknown ones are a ConfigError).
        warm_memory: for a DEQ attacked as is (no ``view``), wrap it in a
            :class:`robustdeq.deq.memory.WarmMemory` for each run: every call pyautoattack makes
            starts a sample's forward solve from the latest converged fixed point of the same
            clean sample (a warm-started solve that does not converge is redone cold); the memory
            is built for the run's batch and forgotten at its end. AutoAttack itself is unchanged.
        fast_deq: for a DEQ attacked as is (no ``view``) whose model is a plain
            :class:`~robustdeq.deq.model.DEQClassifier` with the ``ImplicitGrad`` estimator, make
            the model side of the run cheaper (:data:`robustdeq.deq.memory.FAST_OPTIONS`): the
            implicit backward's adjoint solved to an attack-grade tolerance (``adjoint_tol``,
            1e-3 relative against the estimator's 1e-6) from the sample's latest converged
            adjoint, forward warm starts only on a cell certified contractive, and repeated
            evaluations of an input restarted from their recorded converged state (``shrink``,
            solves on a shrinking batch, is off: slower here). ``True`` or a dict overriding
            some of those options; with ``warm_memory=True`` as well, forward warm starts on any
            cell. The forward logits stay the model's own function (to its solver's tolerance,
            on a contractive cell with forward warm starts). Off by default: the forward solves,
            which must stay the model's own, dominate AutoAttack's time, so the saving is small.

    The returned ``x_adv`` is pyautoattack's: an adversarial example where one was found, the
    clean input otherwise. The last adversary object is kept as ``last_adversary``.
    """

    supports_targeted = False

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf",
                 version: str = "standard", attacks: Optional[Sequence[str]] = None,
                 view: Optional[Dict[str, Any]] = None, seed: Optional[int] = 0,
                 batch_size: int = 250, settings: Optional[Dict[str, Any]] = None,
                 warm_memory: bool = False, fast_deq: Union[bool, Dict[str, Any]] = False):
        super().__init__(model, eps=eps, norm=norm, targeted=False, seed=seed)
        if not isinstance(warm_memory, bool):
            raise ConfigError(f"warm_memory must be a bool, got {warm_memory!r}")
        fast_options = _fast_options(fast_deq)
        if version not in VERSIONS:
            raise ConfigError(f"unknown AutoAttack version {version!r}; expected one of {', '.join(VERSIONS)}")
        if version == "custom":
            if not attacks or isinstance(attacks, str):
                raise ConfigError("version='custom' needs attacks: a non-empty list among "
                                  + ", ".join(ATTACK_NAMES))
            attacks = list(attacks)
            unknown = [a for a in attacks if a not in ATTACK_NAMES]
            if unknown:
                raise ConfigError(f"unknown AutoAttack attack(s) {unknown}; expected among "
                                  + ", ".join(ATTACK_NAMES))
        elif attacks is not None:
            raise ConfigError(f"attacks is only for version='custom' (version {version!r} fixes its list)")
        self.version = version
        self.attacks = attacks
        self.batch_size = check_int(batch_size, "batch_size", low=1)
        self.view = view
        self.target = self.view_target = make_view(model, view)
        #: the per-sample warm-start memory (robustdeq.deq.memory) wrapping a DEQ attacked as is
        self.memory = None
        if fast_options is not None and view is None and _fast_supported(model):
            from ..deq.memory import WarmMemory
            if warm_memory:
                fast_options["forward_warm"] = True
            self.memory = WarmMemory(model, **fast_options)
            self.target = self.memory
        elif fast_options is not None:
            logger.info("AutoAttack(fast_deq=...): %s is attacked as is (it needs a DEQClassifier "
                        "with its own pieces, attacked without a view)", type(model).__name__)
        if self.memory is None and warm_memory and view is None and is_deq(model):
            from ..deq.memory import WarmMemory
            self.memory = WarmMemory(model)
            self.target = self.memory
        self.warm_memory = warm_memory and self.memory is not None
        self.fast_deq = None if self.memory is None or not self.memory.fast else dict(fast_options)
        self.settings = dict(settings or {})
        for key in self.settings:
            comp, _, attr = key.partition(".")
            if comp not in COMPONENTS or not attr:
                raise ConfigError(f"bad AutoAttack setting {key!r}: expected '<component>.<attribute>' "
                                  f"with component in {', '.join(COMPONENTS)}")
        self.implementation = f"pyautoattack {pyautoattack_version()}"
        tag = version if version != "custom" else "+".join(attacks)
        state = (f", z_{view['state']}" if view and view.get("state") is not None else "")
        self.name = f"AutoAttack-{tag}{' L2' if self.norm == 'L2' else ''}{state}"
        self.last_adversary = None

    def params(self) -> Dict[str, Any]:
        """The settings reported by :meth:`describe`: version, custom attack list, view, batch
        size, component settings, and whether the warm-start memory or the fast DEQ mode is in
        force."""
        return {"version": self.version, "attacks": self.attacks, "view": describe_view(self.view),
                "batch_size": self.batch_size, "settings": self.settings,
                "warm_memory": self.warm_memory, "fast_deq": self.fast_deq}

    def guarded_models(self) -> List[nn.Module]:
        """The model and, when it differs, the module pyautoattack attacks (view or memory)."""
        return [self.model, self.target] if self.target is not self.model else [self.model]

    def gradient_probe(self) -> nn.Module:
        """The module whose input gradient is checked before attacking: the attack view, or the
        model itself."""
        return self.view_target

    @property
    def needs_input_gradient(self) -> bool:  # type: ignore[override]
        """Every version but a custom one made of Square alone follows input gradients."""
        return not (self.version == "custom" and set(self.attacks) <= {"square"})

    def _radius(self) -> float:
        """Linf radius around a clean sample within which the memory recognises it."""
        if self.norm == "Linf":
            return self.eps
        return self.eps  # an L2 ball of radius eps lies in the Linf ball of radius eps

    def build(self, device, dtype: torch.dtype = torch.float32) -> Any:
        """The pyautoattack object for inputs on ``device``, with ``settings`` applied.
        pyautoattack works in float32; a model of another ``dtype`` gets its inputs cast."""
        from pyautoattack import AutoAttack as PyAutoAttack
        target = self.target if dtype == torch.float32 else _CastInput(self.target, dtype)
        adv = PyAutoAttack(target, attacks=self.attacks if self.version == "custom" else None,
                           device=device, eps=self.eps, norm=self.norm, seed=self.seed,
                           version=self.version)
        for key, value in self.settings.items():
            comp, _, attr = key.partition(".")
            obj = getattr(adv, comp)
            if not hasattr(obj, attr):
                raise ConfigError(f"pyautoattack's {comp} has no attribute {attr!r}")
            setattr(obj, attr, value)
        return adv

    def _perturb(self, x, y, gen):
        adv = self.build(x.device, x.dtype)
        self.last_adversary = adv
        _follow_stages(adv)
        seen = _record_stage_inputs(adv)
        from pyautoattack import checks
        for k in list(checks.funcs):  # pyautoattack never resets this module-level counter
            checks.funcs[k] = 0
        trace = sys.gettrace()
        stages = _StageAccuracies()
        try:
            x32 = x.float()  # pyautoattack works in float32 (its attacks cast with .float())
            if self.memory is not None:  # a memory for this batch only
                self.memory.begin(x, self._radius())
            with global_rng(self.seed, x.device), stages:
                x_adv32, _ = adv.run_standard_evaluation(x32, y, batch_size=self.batch_size)
        finally:
            if self.memory is not None:
                self.last_memory_stats = dict(self.memory.stats)
                self.memory.end()
            if sys.gettrace() is not trace:
                sys.settrace(trace)
        # pyautoattack's own per-attack robust accuracies (cumulative, on this call's samples),
        # and the samples its score-based stage (Square) broke
        self.last_stats = {"n": int(x.shape[0]), "robust_accuracy_after": stages.accuracies,
                           "score_based": _broken_by(seen, x32, x_adv32, SCORE_BASED)}
        x_adv = x_adv32.detach().to(dtype=x.dtype, device=x.device)
        if x.dtype != torch.float32:  # samples left unchanged keep their exact input values
            same = (x_adv32 == x32).reshape(x.shape[0], -1).all(dim=1)
            x_adv = torch.where(same.view(-1, *([1] * (x.dim() - 1))), x, x_adv)
        return project_ball(x_adv, x, self.eps, self.norm)


def _fast_options(fast_deq: Union[bool, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The WarmMemory options of ``fast_deq`` (None: off); bad values are a ConfigError."""
    from ..deq.memory import FAST_OPTIONS
    if fast_deq is False:
        return None
    if fast_deq is True:
        return dict(FAST_OPTIONS)
    if not isinstance(fast_deq, dict):
        raise ConfigError(f"fast_deq must be a bool or a dict of options among "
                          f"{', '.join(FAST_OPTIONS)}, got {fast_deq!r}")
    reject_unknown(fast_deq, FAST_OPTIONS, "fast_deq")
    return {**FAST_OPTIONS, **fast_deq}


def _fast_supported(model: nn.Module) -> bool:
    from ..deq.grad import ImplicitGrad
    from ..deq.warm import supports_implicit_input_gradient
    return supports_implicit_input_gradient(model, ImplicitGrad())


class _StageAccuracies(logging.Handler):
    """Collects pyautoattack's "initial accuracy" / "robust accuracy after <ATTACK>" records (its
    logger "auto-attack", DEBUG level) into ``accuracies`` {"clean": a, "apgd-ce": a, ...}: the
    cumulative robust accuracy after each of its attacks, which its API does not return."""

    _AFTER = re.compile(r"robust accuracy after ([A-Za-z0-9_-]+): ([0-9.]+)%")
    _INITIAL = re.compile(r"initial accuracy: ([0-9.]+)%")

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.accuracies: Dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = self._AFTER.search(msg)
        if m:
            self.accuracies[m.group(1).lower()] = float(m.group(2)) / 100
            return
        m = self._INITIAL.search(msg)
        if m:
            self.accuracies["clean"] = float(m.group(1)) / 100

    def __enter__(self):
        self._logger = logging.getLogger("auto-attack")
        self._level = self._logger.level
        if self._logger.getEffectiveLevel() > logging.DEBUG:
            self._logger.setLevel(logging.DEBUG)
            self._propagate = self._logger.propagate
            self._logger.propagate = False  # the DEBUG records enabled here stay out of the root handlers
        else:
            self._propagate = None
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
        if self._propagate is not None:
            self._logger.propagate = self._propagate
        return False


#: pyautoattack's components that only read the model's scores (no gradient)
SCORE_BASED = ("square",)


def _record_stage_inputs(adv: Any) -> List[tuple]:
    """Make the components of ``adv`` record, in call order, ``(component, inputs)`` of every
    call of their ``perturb``: pyautoattack attacks with each component only the samples every
    earlier one left robust, so the last component that saw a sample broke it (if any did)."""
    seen: List[tuple] = []
    for comp in COMPONENTS:
        obj = getattr(adv, comp, None)
        if obj is None or not hasattr(obj, "perturb"):
            continue

        def perturb(x, *a, _orig=obj.perturb, _comp=comp, **k):
            seen.append((_comp, x.detach()))
            return _orig(x, *a, **k)
        obj.perturb = perturb
    return seen


def _broken_by(seen: List[tuple], x: Tensor, x_adv: Tensor, components: Sequence[str]) -> Tensor:
    """(B,) bool: the samples of ``x`` that pyautoattack changed (broke) in a call of one of
    ``components``; a component's inputs are matched to the rows of ``x`` exactly (they are
    copies of them)."""
    flat = x.detach().reshape(x.shape[0], -1).cpu()
    rows: Dict[bytes, List[int]] = {}
    for i in range(flat.shape[0]):
        rows.setdefault(flat[i].numpy().tobytes(), []).append(i)
    last = [None] * x.shape[0]
    for comp, xin in seen:
        for r in xin.reshape(xin.shape[0], -1).cpu():
            for i in rows.get(r.numpy().tobytes(), ()):
                last[i] = comp
    changed = (x_adv != x).reshape(x.shape[0], -1).any(dim=1).cpu()
    out = torch.tensor([c in components for c in last], dtype=torch.bool) & changed
    return out.to(x.device)


def _follow_stages(adv: Any) -> None:
    """Make the components of the pyautoattack object ``adv`` report which sub-attack runs on how
    many samples (:func:`robustdeq._support.report_progress`): the long silent part of an
    evaluation becomes visible. Only this object's methods are wrapped."""
    from .._support import report_progress

    stage_of = {"apgd": lambda c: f"apgd-{getattr(c, 'loss', 'ce')}", "apgd_targeted": lambda c: "apgd-t",
                "fab": lambda c: "fab-t" if getattr(c, "targeted", False) else "fab",
                "square": lambda c: "square"}
    for comp, name in stage_of.items():
        obj = getattr(adv, comp, None)
        if obj is None or not hasattr(obj, "perturb"):
            continue

        def perturb(x, y, *a, _orig=obj.perturb, _obj=obj, _name=name, **k):
            stage, n = f"AutoAttack {_name(_obj)}", int(x.shape[0])
            report_progress(stage=stage, done=0, total=n)
            out = _orig(x, y, *a, **k)
            report_progress(stage=stage, done=n, total=n)
            return out
        obj.perturb = perturb


__all__ = ["AutoAttack", "make_view", "ATTACK_NAMES", "VERSIONS"]
