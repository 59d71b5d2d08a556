"""The evaluation harness: ``evaluate(model, x, y, threat=..., eps=..., suite=...) -> EvalReport``.

A *suite* is a list of :class:`AttackSpec` (name, factory, kind, scope). For every eps, every
spec is run on every *target* its scope names (the plain model and, for an inference-time defense,
each of its ``adaptive_views()``; or the underlying DEQ), the examples are always *judged on the
model itself*, and a sample is robust only if it is classified correctly on the clean input and on
the example of every attack unit: the per-sample worst case.

Built-in suites (alpha = 2.5 eps / steps, seeds derived from ``seed``):

- ``quick``: PGD with the implicit (IFT) gradient and PGD with an unrolled gradient
  (``UnrolledGrad(8)``) for models holding a ``DEQClassifier``, PGD with the model's own gradient
  otherwise (a weight-tied model backpropagates through its layers); each with the cross-entropy
  and with the Carlini-Wagner margin loss, and 3 random restarts (a restart attacks only the
  samples still unbroken). One loss and one start were optimistic: on 300 digits (Linf 0.1, the
  demo's DEQ) PGD-20 with CE only reported 52.7 % where an ensemble of PGD-100 runs (IFT and
  unrolled gradients, both losses, 5 restarts) reaches 49.7 %; this suite reports 50.0 %.
  Quick is still an upper bound on the robust accuracy, like every suite.
- ``standard``: quick + intermediate-state attacks (Yang et al. 2022) on three states spread over
  the clean trajectory + their ensemble attack + AutoAttack standard ("rand" for a model that
  declares ``randomized``).
- ``full``: standard + AutoAttack plus + a transfer attack crafted on the unrolled view
  (``attack_view(deq, state=K, unroll=K)``: K solver steps from z0, backpropagated) and judged on
  the model.

Attack names for custom suites (``suite=[...]``) besides the units above include ``pgd-exact``,
``pgd-phantom``, ``square`` and ``apgd-ce`` (APGD-CE alone). On MNIST MDEQs adversarially trained
at Linf 0.3, AutoAttack broke 11-19 of 100 images that the PGD units (IFT and unrolled, CE and
margin) had left, and 100 or 200 PGD steps instead of 20 did not help; ``["pgd-ift",
"pgd-unrolled", "apgd-ce"]`` came within 1 and 9 points of AutoAttack at about a seventh of its
cost, so at large radii it is a much tighter quick check than ``quick`` (benchmarks/RESULTS.md,
issue 15).

With ``out_dir``, each finished (eps, attack unit) is written atomically to
``out_dir/partial/`` (tensors with ``torch.save``, read back with ``weights_only=True``, plus a
JSON sidecar); a later call with the same configuration (hash of model parameters, data, threat,
eps, suite, steps, seed, batch size) skips the finished units and reloads their flags.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._support import progress_reporter, report_progress
from ..registry import ATTACK_SPECS, SUITES
from ..errors import ConfigError, GradientMaskingWarning, InputError, NonConvergenceWarning
from .._tensor import clip_delta, default_alpha
from ..deq.protocols import TrajectoryModel
from ..guard import preserve_model
from .._support import user_stacklevel
from . import _sharding
from . import checks as _checks
from .checks import CheckResult, find_deq, margin
from .config import EvalConfig, make_eval_config
from .report import SCHEMA_VERSION, AttackResult, EpsResult, EvalReport, atomic_write_text

logger = logging.getLogger(__name__)

# SUITES (robustdeq.registry.SUITES): the named suites, "quick", "standard", "full" and registered ones
KINDS = ("white-box", "black-box", "transfer")
SCOPES = ("views", "model", "deq")
NEEDS = ("any", "deq", "trajectory", "solver")

Factory = Callable[..., Any]  # factory(target, *, eps, norm, steps, seed) -> Attack


@dataclass
class AttackSpec:
    """One attack of a suite.

    Args:
        name: unique name (the unit key; ``name@view`` for adaptive views).
        factory: ``factory(target, *, eps, norm, steps, seed) -> Attack`` (an object with
            ``__call__(x, y) -> x_adv`` and ideally ``describe() -> dict``).
        kind: "white-box", "black-box" or "transfer" (the black-box check compares them).
        scope: "views": the model and each adaptive view of a defense; "model": the model only;
            "deq": the underlying trajectory model (a DEQ or weight-tied model), judged on the model.
        needs: "any"; "deq": the target must hold a ``DEQClassifier`` (the gradient estimator is
            chosen); "trajectory": a model with ``run``/``readout`` (DEQ or weight-tied);
            "solver": a ``DEQClassifier`` trajectory model.
    """

    name: str
    factory: Factory
    kind: str = "white-box"
    scope: str = "views"
    needs: str = "any"
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name or "@" in self.name:
            raise ConfigError(f"AttackSpec.name must be a non-empty string without '/' or '@', got {self.name!r}")
        if not callable(self.factory):
            raise ConfigError(f"AttackSpec.factory of {self.name!r} is not callable")
        for attr, allowed in (("kind", KINDS), ("scope", SCOPES), ("needs", NEEDS)):
            if getattr(self, attr) not in allowed:
                raise ConfigError(f"AttackSpec.{attr} must be one of {allowed}, got {getattr(self, attr)!r}")


@dataclass
class SuiteContext:
    """What the built-in suites need to know about the model (filled by ``evaluate``)."""

    model: nn.Module
    trajectory_model: Optional[nn.Module]
    has_deq: bool
    solver_model: bool
    randomized: bool
    horizon: Optional[int]        # states worth attacking: 1..horizon-1
    max_state: Optional[int]      # largest recordable state index


# -- built-in attack specs ------------------------------------------------------------------------
PGD_RESTARTS = 3  # restarts of the built-in PGD units (measured: see the module docstring)


def _pgd_factory(grad, judge: nn.Module, loss: str = "ce", method: str = "auto"):
    def factory(target, *, eps, norm, steps, seed):
        # early stopping where the attacked module is the judged model itself: never weaker per
        # sample than the plain loop there (frozen samples are confirmed by the model's own
        # inference) and much cheaper once most samples break; on an adaptive view the view's
        # success is not the defense's, so the view is attacked for every step. PGD's default
        # method ("auto"): on a DEQ attacked with the implicit gradient, the joint iteration for
        # the samples whose first solve converges (judged by the model's inference at its end,
        # no early stopping needed), the exact loop for the others
        from ..attacks import PGD
        return PGD(target, eps=eps, alpha=default_alpha(eps, steps), steps=steps, norm=norm, grad=grad,
                   loss=loss, restarts=PGD_RESTARTS, seed=seed, early_stop=target is judge,
                   method=method)
    return factory


def _state_factory(states, ensemble: bool, judge: Optional[nn.Module]):
    def factory(target, *, eps, norm, steps, seed):
        from ..attacks import StateAttack
        return StateAttack(target, eps=eps, alpha=default_alpha(eps, steps), steps=steps, states=states,
                           ensemble=ensemble, mode="unroll", norm=norm,
                           judge=None if judge is target else judge, seed=seed)
    return factory


def _autoattack_factory(version: str, **options):
    def factory(target, *, eps, norm, steps, seed):
        from ..attacks import AutoAttack
        return AutoAttack(target, eps=eps, norm=norm, version=version, seed=seed, **options)
    return factory


def _transfer_factory(k: int):
    def factory(target, *, eps, norm, steps, seed):
        from ..attacks import PGD
        from ..deq.views import attack_view
        surrogate = attack_view(target, state=k, unroll=k)
        return PGD(surrogate, eps=eps, alpha=default_alpha(eps, steps), steps=steps, norm=norm, seed=seed)
    return factory


def _square_factory(queries: int):
    def factory(target, *, eps, norm, steps, seed):
        from ..attacks import TorchAttack
        return TorchAttack(target, "Square", eps=eps, norm=norm, n_queries=queries, seed=seed)
    return factory


def _spread_states(ctx: SuiteContext, n: int = 3) -> List[int]:
    if ctx.horizon is None or ctx.max_state is None:
        return []
    hi = max(1, min(ctx.horizon - 1, ctx.max_state))
    lo = max(1, hi // 4)
    if n == 1 or hi == lo:
        return [hi]
    vals = {int(round(lo + (hi - lo) * i / (n - 1))) for i in range(n)}
    return sorted(vals)


# -- the registries of attack specs and suites (robustdeq.registry) ---------------------------------
def register_attack_spec(name: str, builder: Optional[Callable[[SuiteContext], Any]] = None, *,
                         replace: bool = False):
    """Make ``name`` usable in suites: ``builder(ctx) -> AttackSpec | [AttackSpec]`` (an empty
    list when the attack does not apply to the model in ``ctx``). Without ``builder``, a
    decorator. Re-registering a name (a built-in included) is a ConfigError unless
    ``replace=True``."""
    return ATTACK_SPECS.register(name, builder, replace=replace)


def register_suite(name: str, suite: Any = None, *, replace: bool = False):
    """Make ``evaluate(..., suite=name)`` (and ``robustdeq eval --suite name``) run ``suite``: a
    list of attacks (built-in or registered names, :class:`AttackSpec`, named factories) or a
    function ``suite(ctx) -> list`` choosing them for the model in ``ctx``. Without ``suite``, a
    decorator. Re-registering a name (a built-in included) is a ConfigError unless
    ``replace=True``."""
    if suite is not None and not callable(suite):
        items = list(suite) if isinstance(suite, (list, tuple)) else None
        if not items:
            raise ConfigError(f"register_suite({name!r}, ...) needs a non-empty list of attacks or a "
                              f"function ctx -> list, got {suite!r}")
        suite = _fixed_suite(items)
    return SUITES.register(name, suite, replace=replace)


def _fixed_suite(items: List[Any]) -> Callable[[SuiteContext], List[Any]]:
    def suite(ctx: SuiteContext) -> List[Any]:
        return list(items)
    return suite


def _pgd_spec(name: str, grad_key: str, needs: str, what: str, loss_name: str):
    def build(ctx: SuiteContext) -> List[AttackSpec]:
        grad = _PGD_GRADS[grad_key]()
        loss = "CW margin" if loss_name == "margin" else "cross-entropy"
        method = "exact" if grad_key == "pgd-exact" else "auto"
        return [AttackSpec(name, _pgd_factory(grad, ctx.model, loss_name, method), needs=needs,
                           description=f"PGD with {what}, {loss} loss, {PGD_RESTARTS} random restarts")]
    return build


def _unrolled8():
    from ..deq.grad import UnrolledGrad
    return UnrolledGrad(steps=8)


_PGD_GRADS = {"pgd": lambda: None, "pgd-ift": lambda: "ift", "pgd-unrolled": _unrolled8,
              "pgd-phantom": lambda: "phantom", "pgd-exact": lambda: "ift"}


def _states_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec(f"state-{k}", _state_factory(k, False, ctx.model), scope="deq", needs="trajectory",
                       description=f"intermediate-state attack on z_{k} (unrolled gradient)")
            for k in _spread_states(ctx)]


def _state_k_spec(name: str, ctx: SuiteContext) -> List[AttackSpec]:
    k = int(name[6:])
    return [AttackSpec(name, _state_factory(k, False, ctx.model), scope="deq", needs="trajectory",
                       description=f"intermediate-state attack on z_{k}")]


def _state_ensemble_spec(ctx: SuiteContext) -> List[AttackSpec]:
    if ctx.horizon is None or ctx.max_state is None:
        return []
    ks = list(range(1, max(1, min(ctx.horizon, ctx.max_state)) + 1))
    return [AttackSpec("state-ensemble", _state_factory(ks, True, ctx.model), scope="deq",
                       needs="trajectory", description=f"attack on the ensemble of the states 1..{ks[-1]}")]


def _autoattack_spec(ctx: SuiteContext) -> List[AttackSpec]:
    version = "rand" if ctx.randomized else "standard"
    return [AttackSpec("autoattack", _autoattack_factory(version),
                       description=f"AutoAttack {version} (pyautoattack)")]


def _autoattack_plus_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec("autoattack-plus", _autoattack_factory("plus"), description="AutoAttack plus (pyautoattack)")]


def _apgd_ce_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec("apgd-ce", _autoattack_factory("custom", attacks=["apgd-ce"]),
                       description="APGD-CE alone (pyautoattack: 100 iterations, adaptive step size; "
                                   "much stronger than fixed-step PGD on adversarially trained DEQs "
                                   "at large radii, at a fraction of AutoAttack's cost)")]


def _transfer_unrolled_spec(ctx: SuiteContext) -> List[AttackSpec]:
    if ctx.horizon is None or ctx.max_state is None:
        return []
    k = max(1, min(ctx.horizon, ctx.max_state))
    return [AttackSpec("transfer-unrolled", _transfer_factory(k), kind="transfer", scope="deq", needs="solver",
                       description=f"PGD on the unrolled view ({k} steps from z0), judged on the model")]


def _square_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec("square", _square_factory(1000), kind="black-box",
                       description="Square attack, 1000 queries (torchattacks)")]


def _register_builtin_specs() -> None:
    pgd = {"pgd": ("any", "the model's own gradient (a DEQ's implicit one by the joint iteration "
                          "where its solves converge)"),
           "pgd-ift": ("deq", "the implicit (IFT) gradient, by the joint forward/adjoint/input "
                              "iteration for samples whose solves converge, exact solves otherwise"),
           "pgd-exact": ("deq", "the implicit (IFT) gradient from exact forward and adjoint solves "
                                "at every step"),
           "pgd-unrolled": ("deq", "8 unrolled steps from z*"),
           "pgd-phantom": ("deq", "the phantom gradient (k=5, tau=0.5)")}
    for base, (needs, what) in pgd.items():
        for name, loss_name in ((base, "ce"), (f"{base}-margin", "margin")):
            ATTACK_SPECS.register(name, _pgd_spec(name, base, needs, what, loss_name), builtin=True)
    for name, fn in (("states", _states_spec), ("state-ensemble", _state_ensemble_spec),
                     ("autoattack", _autoattack_spec), ("autoattack-plus", _autoattack_plus_spec),
                     ("apgd-ce", _apgd_ce_spec),
                     ("transfer-unrolled", _transfer_unrolled_spec), ("square", _square_spec)):
        ATTACK_SPECS.register(name, fn, builtin=True)


_register_builtin_specs()


def is_attack_name(name: str) -> bool:
    """``name`` is one :func:`builtin_spec` resolves: a registered attack or ``state-<k>``."""
    return name in ATTACK_SPECS or (name.startswith("state-") and name[6:].isdigit())


def builtin_spec(name: str, ctx: SuiteContext) -> List[AttackSpec]:
    """The spec(s) called ``name``: a registered attack (:data:`robustdeq.registry.ATTACK_SPECS`:
    the built-ins and :func:`register_attack_spec`; ``states`` expands to one spec per state), or
    ``state-<k>``."""
    if name not in ATTACK_SPECS and is_attack_name(name):
        return _state_k_spec(name, ctx)
    out = ATTACK_SPECS.get(name)(ctx)
    out = [out] if isinstance(out, AttackSpec) else list(out or [])
    bad = [o for o in out if not isinstance(o, AttackSpec)]
    if bad:
        raise ConfigError(f"the attack builder {name!r} returned {bad[0]!r}, not an AttackSpec")
    return out


# the built-in suites (robustdeq.registry.SUITES refers to them by name)
def _suite_quick(ctx: SuiteContext) -> List[str]:
    return (["pgd-ift", "pgd-unrolled", "pgd-ift-margin", "pgd-unrolled-margin"] if ctx.has_deq
            else ["pgd", "pgd-margin"])


def _suite_standard(ctx: SuiteContext) -> List[str]:
    names = _suite_quick(ctx)
    if ctx.trajectory_model is not None:
        names += ["states", "state-ensemble"]
    return names + ["autoattack"]


def _suite_full(ctx: SuiteContext) -> List[str]:
    names = _suite_standard(ctx) + ["autoattack-plus"]
    if ctx.solver_model:
        names += ["transfer-unrolled"]
    return names


def suite_names(suite: str, ctx: SuiteContext) -> List[Any]:
    """The attacks of the named suite for this model (:data:`robustdeq.registry.SUITES`: the
    built-ins and :func:`register_suite`): built-in names, or whatever a registered suite lists."""
    return list(SUITES.get(suite)(ctx))


def build_suite(suite: Union[str, Sequence[Any]], ctx: SuiteContext) -> List[AttackSpec]:
    """Resolve ``suite`` (a name, or a list of specs / built-in names / factories)."""
    if isinstance(suite, str):
        items: List[Any] = suite_names(suite, ctx)
    elif isinstance(suite, (list, tuple)):
        items = list(suite)
        if not items:
            raise ConfigError("the suite is empty")
    else:
        raise ConfigError(f"suite must be {', '.join(SUITES.names())} or a list of attacks, "
                          f"got {type(suite).__name__}")
    specs: List[AttackSpec] = []
    for it in items:
        if isinstance(it, AttackSpec):
            specs.append(it)
        elif isinstance(it, str):
            specs.extend(builtin_spec(it, ctx))
        elif callable(it):
            name = getattr(it, "__name__", None)
            if not name or name == "<lambda>":
                raise ConfigError("a factory in the suite needs a name: wrap it in AttackSpec(name, factory)")
            specs.append(AttackSpec(name, it))
        else:
            raise ConfigError(f"suite entries must be AttackSpec, built-in names or factories, got {it!r}")
    seen = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"attack name {s.name!r} appears twice in the suite")
        seen.add(s.name)
    return specs


# -- helpers ----------------------------------------------------------------------------------------
@dataclass
class _Unit:
    key: str
    spec: AttackSpec
    view: str
    target: nn.Module

    @property
    def kind(self) -> str:
        """The spec's kind, or "transfer" on a transfer view (crafted on another model)."""
        return "transfer" if getattr(self.target, "view_kind", None) == "transfer" else self.spec.kind


def adaptive_views(model: nn.Module, transfer_from: Any = None) -> Dict[str, nn.Module]:
    """The modules an evaluation attacks besides ``model`` (every one judged on ``model``):
    ``model.adaptive_views()`` of an inference-time defense, a transfer view over the model a
    wrapper holds as ``model.model`` ("transfer-base", unless the defense offers one), and one
    transfer view per source in ``transfer_from`` (an ``nn.Module`` or a dict name -> module)."""
    from ..deq.views import TransferView
    views: Dict[str, nn.Module] = {}
    if hasattr(model, "adaptive_views"):
        views = dict(model.adaptive_views())
    base = getattr(model, "model", None)
    if (isinstance(base, nn.Module) and base is not model and not _has_trajectory(model)
            and not any(isinstance(v, TransferView) and v.model is base for v in views.values())):
        views.setdefault("transfer-base", TransferView(base, "base"))
    if transfer_from is not None:
        sources = transfer_from if isinstance(transfer_from, dict) else {"source": transfer_from}
        for name, src in sources.items():
            if not isinstance(name, str) or not name or "@" in name or "/" in name:
                raise ConfigError(f"transfer_from names must be plain strings, got {name!r}")
            if not isinstance(src, nn.Module):
                raise ConfigError(f"transfer_from[{name!r}] must be an nn.Module x -> logits, "
                                  f"got {type(src).__name__}")
            if src is model:
                raise ConfigError(f"transfer_from[{name!r}] is the evaluated model itself")
            views[f"transfer-{name}"] = TransferView(src, name)
    for k, v in views.items():
        if not isinstance(v, nn.Module) or not isinstance(k, str) or not k or "@" in k or "/" in k:
            raise ConfigError(f"adaptive view {k!r} must be an nn.Module with a plain name")
        if k in ("model", "deq"):
            raise ConfigError(f"adaptive view name {k!r} is reserved")
    return views


def _has_trajectory(m: nn.Module) -> bool:
    return isinstance(m, TrajectoryModel)


def trajectory_model(model: nn.Module) -> Optional[nn.Module]:
    """The module whose trajectory the per-state statistics read: the model itself (a DEQ or
    weight-tied model), or ``model.model`` for a wrapper (defense) without its own trajectory."""
    if _has_trajectory(model):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and _has_trajectory(inner):
        return inner
    return None


def _is_solver_model(m: Optional[nn.Module]) -> bool:
    return m is not None and hasattr(m, "solve") and hasattr(m, "solver_config")


def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return fallback


def _hash_model(model: nn.Module) -> str:
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _hash_data(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _derive_seed(seed: int, *parts: Any) -> int:
    h = hashlib.sha256(("/".join([str(seed)] + [str(p) for p in parts])).encode()).hexdigest()
    return int(h[:8], 16)


def unit_seed(seed: int, eps: float, key: str) -> int:
    """The seed an attack unit gets: a hash of the base seed, the eps value and the unit key (the
    same for a given eps whatever else the sweep holds)."""
    return _derive_seed(seed, repr(float(eps)), key)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet(model: nn.Module, counter: Dict[str, int]):
    """Silence per-call non-convergence warnings of the DEQs inside ``model`` (the harness
    measures convergence itself) and count those raised by attacks and adjoint solves; every
    other warning is re-emitted."""
    flags = [(m, m.warn_nonconvergence) for m in model.modules() if hasattr(m, "warn_nonconvergence")]
    for m, _ in flags:
        m.warn_nonconvergence = False
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            yield
    finally:
        for m, f in flags:
            m.warn_nonconvergence = f
    for w in rec:
        if issubclass(w.category, NonConvergenceWarning):
            counter["nonconvergence_warnings"] = counter.get("nonconvergence_warnings", 0) + 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i:i + batch_size]).detach())
    return torch.cat(out)


def _margins(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    return margin(_logits(model, x, batch_size).float(), y)


def _summary(residual: Tensor, steps: Tensor, converged: Tensor, diverged: Tensor) -> Dict[str, float]:
    res = residual.float()
    finite = torch.isfinite(res)
    return {
        "mean_steps": float(steps.float().mean()),
        "converged_fraction": float(converged.float().mean()),
        "diverged_fraction": float(diverged.float().mean()),
        "mean_residual": float(res[finite].mean()) if bool(finite.any()) else float("nan"),
        "max_residual": float(res[finite].max()) if bool(finite.any()) else float("nan"),
        "non_finite_residuals": int((~finite).sum()),
    }


def trajectory_stats(tmodel: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Dict[str, Any]:
    """Per-state accuracy of ``readout(z_k)``, solver statistics and the mean residual per step.

    For a DEQ every step ``0..max_iter-1`` is recorded (states after a sample stopped are its
    frozen iterate, their residual that of the frozen iterate); for a weight-tied model the layer
    outputs ``0..depth``. Returns ``{"per_state": {"steps", "accuracy"}, "solver": summary |
    None, "residual_curve": [float] | None}``.
    """
    solver = _is_solver_model(tmodel)
    record: Any = list(range(tmodel.solver_config.max_iter)) if solver else "all"
    correct: Optional[Tensor] = None
    steps_idx: Optional[List[int]] = None
    res_sum: Optional[Tensor] = None
    r_list, s_list, c_list, d_list = [], [], [], []
    n = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            eq = tmodel.run(xb, record=record)
            states = sorted(eq.trajectory, key=lambda t: t.step)
            idx = [t.step for t in states]
            if steps_idx is None:
                steps_idx = idx
                correct = torch.zeros(len(idx), dtype=torch.float64)
            elif idx != steps_idx:  # cannot happen with explicit records; be safe
                raise RuntimeError(f"recorded states differ between batches: {idx} vs {steps_idx}")
            for j, t in enumerate(states):
                correct[j] += float((tmodel.readout(t.z).argmax(dim=1) == yb).sum())
            if solver:
                R = torch.stack([t.residual.float() for t in states]).cpu()  # (K, B)
                for k in range(1, R.shape[0]):  # forward-fill unevaluated steps
                    R[k] = torch.where(torch.isfinite(R[k]), R[k], R[k - 1])
                R = torch.nan_to_num(R, nan=float("nan"), posinf=float("nan"))
                part = torch.nansum(R, dim=1).double()
                res_sum = part if res_sum is None else res_sum + part
                st = eq.stats
                r_list.append(st.residual.detach().cpu())
                s_list.append(st.steps.detach().cpu())
                c_list.append(st.converged.detach().cpu())
                d_list.append(st.diverged.detach().cpu())
            n += xb.shape[0]
    out: Dict[str, Any] = {"per_state": None, "solver": None, "residual_curve": None}
    if steps_idx is not None and n:
        out["per_state"] = {"steps": steps_idx, "accuracy": (correct / n).tolist()}
    if solver and r_list:
        out["solver"] = _summary(torch.cat(r_list), torch.cat(s_list), torch.cat(c_list), torch.cat(d_list))
        out["residual_curve"] = (res_sum / n).tolist()
    return out


def _check_ball(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tuple[Tensor, int]:
    """Project ``x_adv`` into the threat model; return it and the number of violating samples."""
    b = x.shape[0]
    delta = (x_adv - x).reshape(b, -1)
    if norm == "Linf":
        bad = delta.abs().amax(dim=1) > eps * (1 + 1e-5) + 1e-6
    else:
        bad = delta.norm(dim=1) > eps * (1 + 1e-5) + 1e-6
    bad = bad | (x_adv.reshape(b, -1).amin(dim=1) < -1e-6) | (x_adv.reshape(b, -1).amax(dim=1) > 1 + 1e-6)
    bad = bad | ~torch.isfinite(x_adv.reshape(b, -1)).all(dim=1)
    nbad = int(bad.sum())
    if nbad:
        x_adv = torch.nan_to_num(x_adv, nan=0.0, posinf=1.0, neginf=0.0)
        x_adv = (x + clip_delta(x_adv - x, eps, norm)).clamp(0, 1)
    return x_adv, nbad


def _describe(atk: Any) -> Dict[str, Any]:
    d = {}
    if hasattr(atk, "describe"):
        try:
            d = dict(atk.describe())
        except Exception as e:  # pragma: no cover - a third-party attack's describe failing
            d = {"describe_error": repr(e)}
    d.setdefault("name", getattr(atk, "name", type(atk).__name__))
    d.setdefault("implementation", getattr(atk, "implementation", type(atk).__module__))
    return d


def _version(pkg: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# -- incremental store ------------------------------------------------------------------------------
def _completed_report(out_dir: Path, config_hash: str) -> Optional[EvalReport]:
    """The report of a finished evaluation of the same configuration in ``out_dir`` (every unit
    marked resumed), or None."""
    path = out_dir / "report.json"
    if not path.is_file() or (out_dir / "partial" / "manifest.json").is_file():
        return None
    try:
        rep = EvalReport.load(out_dir)
    except Exception as e:  # unreadable: recompute (the store below refuses a foreign one)
        logger.warning("cannot read the finished report %s (%s); recomputing", path, e)
        return None
    if rep.config_hash != config_hash:
        return None
    for r in rep.results:
        for a in r.attacks:
            a.resumed = True
    logger.info("%s holds the finished evaluation of this configuration: returning it", path)
    return rep


class _PartialStore:
    """Finished units under ``out_dir/partial``: ``e{i}_u{j}.pt`` (tensors) + ``.json`` (meta);
    the JSON is written last and marks the unit as finished."""

    def __init__(self, out_dir: Path, config_hash: str, config: dict, resume: bool):
        self.dir = Path(out_dir) / "partial"
        self.manifest = self.dir / "manifest.json"
        done = Path(out_dir) / "report.json"  # a completed evaluation (its partial/ was removed)
        if resume and done.is_file() and not self.manifest.is_file():
            try:
                old_hash = json.loads(done.read_text(encoding="utf-8")).get("config_hash")
            except (json.JSONDecodeError, AttributeError, OSError):
                old_hash = None
            if old_hash and old_hash != config_hash:
                raise ConfigError(
                    f"{done} is the report of a different configuration (hash {old_hash[:12]} vs "
                    f"{config_hash[:12]}: model parameters, data, threat, eps, suite, steps, seed or batch "
                    "size changed); use another out_dir or resume=False to overwrite it")
        if self.manifest.is_file():
            try:
                old = json.loads(self.manifest.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = {}
            same = old.get("config_hash") == config_hash
            if resume and not same and old:
                raise ConfigError(
                    f"{self.dir} holds a partial evaluation of a different configuration (hash "
                    f"{str(old.get('config_hash'))[:12]} vs {config_hash[:12]}: model parameters, data, "
                    "threat, eps, suite, steps, seed or batch size changed); use another out_dir or "
                    "resume=False to overwrite it")
            if not resume or not same:
                self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.manifest, json.dumps(
            {"schema_version": SCHEMA_VERSION, "config_hash": config_hash, "config": config}, indent=2))

    def clear(self) -> None:
        for p in list(self.dir.glob("e*_u*.pt")) + list(self.dir.glob("e*_u*.json")) + [self.manifest]:
            if p.is_file():
                p.unlink()

    def remove(self) -> None:
        """Delete the folder once the evaluation is complete (its report holds the results)."""
        self.clear()
        try:
            self.dir.rmdir()
        except OSError:  # something else was put there: leave it
            logger.debug("kept %s: it holds other files", self.dir)

    @staticmethod
    def stem(ei: int, ui: int) -> str:
        return f"e{ei:03d}_u{ui:03d}"

    def load(self, ei: int, ui: int, key: str) -> Optional[Tuple[dict, Dict[str, Tensor]]]:
        meta_p = self.dir / (self.stem(ei, ui) + ".json")
        pt_p = self.dir / (self.stem(ei, ui) + ".pt")
        if not (meta_p.is_file() and pt_p.is_file()):
            return None
        try:
            meta = json.loads(meta_p.read_text(encoding="utf-8"))
            from ..checkpoint import safe_torch_load  # says what is wrong, never advises unsafe loading
            tensors = safe_torch_load(pt_p, map_location="cpu")
        except Exception as e:  # a corrupted unit is recomputed
            logger.warning("cannot read partial unit %s (%s); recomputing it", meta_p.name, e)
            return None
        if meta.get("key") != key:
            return None
        return meta, tensors

    def save(self, ei: int, ui: int, meta: dict, tensors: Dict[str, Tensor]) -> None:
        pt_p = self.dir / (self.stem(ei, ui) + ".pt")
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=pt_p.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, pt_p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        from .report import _json_safe
        atomic_write_text(self.dir / (self.stem(ei, ui) + ".json"),
                          json.dumps(_json_safe(meta), indent=2, allow_nan=False))


# -- the harness ------------------------------------------------------------------------------------
def _validate_data(model, x, y) -> Tuple[Tensor, Tensor]:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module mapping x -> logits, got {type(model).__name__}")
    if y is None and isinstance(x, (tuple, list)) and len(x) == 2:
        x, y = x
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError("evaluate needs tensors x (N, ...) and y (N,) (or data=(x, y))")
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"y must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise InputError("evaluate needs at least one sample")
    from ..data import validate_inputs
    return validate_inputs(x, expected_shape=getattr(model, "input_shape", None)), y


@dataclass
class _Evaluation:
    """The state of one :func:`evaluate` call, handed to its steps (instead of long argument lists)."""

    model: nn.Module
    x: Tensor
    y: Tensor
    cfg: EvalConfig
    device: torch.device
    dist_ctx: Any                                   # a process group (robustdeq.distributed) or None
    views: Dict[str, nn.Module]
    tmodel: Optional[nn.Module]
    notes: List[str] = dataclasses.field(default_factory=list)
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)
    counters: Dict[str, int] = dataclasses.field(default_factory=dict)
    clean_margin: Optional[Tensor] = None
    clean_correct: Optional[Tensor] = None
    clean_traj: Optional[Dict[str, Any]] = None
    units: List[_Unit] = dataclasses.field(default_factory=list)
    suite_label: Any = None
    config: Dict[str, Any] = dataclasses.field(default_factory=dict)  # what the config hash covers
    config_hash: str = ""
    store: Any = None                               # _PartialStore (or its sharded view) or None
    bar: Any = None
    results: List[EpsResult] = dataclasses.field(default_factory=list)
    success_flags: Dict[float, Dict[str, Tensor]] = dataclasses.field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.dist_ctx is None or self.dist_ctx.is_main

    @property
    def norm(self) -> str:
        return self.cfg.norm


@dataclass
class _EpsState:
    """The running worst case over the attack units of one eps."""

    ei: int
    eps: float
    robust: Tensor
    first: List[Optional[str]]
    worst_margin: Tensor
    worst_x: Tensor
    attack_results: List[AttackResult] = dataclasses.field(default_factory=list)


@dataclass
class _UnitOutcome:
    """What one attack unit produced (computed now, or read back from ``out_dir/partial``)."""

    adv_correct: Tensor
    upd_idx: Tensor
    upd_x: Tensor
    margin: Tensor
    seconds: float
    describe: Dict[str, Any]
    violations: int
    resumed: bool


def evaluate(model: nn.Module, x: Union[Tensor, Tuple[Tensor, Tensor]], y: Optional[Tensor] = None,
             config: Union[EvalConfig, Dict[str, Any], None] = None, **options: Any) -> EvalReport:
    """Evaluate the robustness of ``model`` on ``(x, y)``.

    Args:
        model: ``x -> logits``: a DEQ, a weight-tied or feed-forward model, or an inference-time
            defense (with ``adaptive_views()``: every view is attacked as well, judged on the
            defense).
        x: (N, C, H, W) inputs in [0, 1] (or ``(x, y)`` with ``y`` omitted); y: (N,) int64 labels.
        config: an :class:`~robustdeq.eval.config.EvalConfig` (or a mapping of its options);
            ``options`` (the same names as keywords) build it or override its fields; an
            unknown option is a :class:`ConfigError`. The options:

    Options:
        threat: "Linf" or "L2" (or a :class:`~robustdeq.config.Norm`). eps: one radius or a list
            (one report entry per eps); required.
        suite: a registered suite ("quick", "standard", "full" or one added with
            :func:`register_suite`), or a list of :class:`AttackSpec`, attack names (see
            :func:`builtin_spec`, :func:`register_attack_spec`) or named factories
            ``f(target, *, eps, norm, steps, seed)``.
        steps: iterations of the iterative attacks (alpha = 2.5 eps / steps).
        seed: base seed; every unit and check gets a seed derived from it.
        batch_size: attack and prediction batch size.
        out_dir: write ``partial/`` units as they finish, then ``report.json``, ``report.md`` and
            plots. resume: skip units already in ``out_dir/partial`` for the same configuration.
        progress: tqdm progress bar. checks: run the checks (:mod:`robustdeq.eval.checks`);
            check_config: their :class:`CheckConfig`.
        tensorboard: True (``out_dir/tensorboard``) or a log folder: write scalars.
        cascade: run each attack only on the samples every earlier attack left robust (as
            AutoAttack does: much cheaper with expensive attacks; the robust flags are the same
            worst case, but an attack's accuracy *alone* is then undefined and reported as None).
        callback: called after every finished unit with a dict (eps, key, accuracy, ...).
        transfer_from: surrogate model(s) (a module, or a dict name -> module) whose adversarial
            examples every attack of the suite also crafts and judges on ``model`` (views
            ``transfer-<name>``). A wrapper holding its base model as ``model.model`` (an
            inference-time defense) always gets ``transfer-base``.
        certify: the robustness bracket (:mod:`robustdeq.eval.bracket`): ``True``/``"auto"``
            (Lipschitz and IBP certificates), a list of names (``"smoothing"`` included) or a
            mapping of :class:`~robustdeq.eval.bracket.BracketConfig` options; adds the check
            ``certified_but_broken`` (certified yet attacked samples) and one note per eps.

    The model (every training flag, ``requires_grad`` flag, parameter and buffer) is the same after
    the evaluation as before it.

    Inside a process group (``torchrun``; :mod:`robustdeq.distributed`) the attack batches are
    shared out over the ranks and the report, returned on every rank, equals the single-process
    report flag for flag; every rank must pass the same model and data; rank 0 writes ``out_dir``
    and TensorBoard (see :mod:`robustdeq.eval._sharding`).

    Returns:
        :class:`EvalReport`.
    """
    t_start = time.perf_counter()
    x, y = _validate_data(model, x, y)
    ev = _begin(model, x, y, make_eval_config(config, **options))
    with preserve_model([model, *ev.views.values()], "eval", who="evaluate"), _quiet(model, ev.counters):
        if not hasattr(model, "adaptive_views"):  # a defense's views are checked by each attack
            from ..attacks.base import check_input_gradient
            check_input_gradient(model, ev.x, who="evaluate")
        _clean_pass(ev)
        _plan(ev)
        done = _finished_report(ev)
        if done is not None:
            return done
        _open_store(ev)
        _attack_all(ev)
        check_results = _run_checks(ev) if ev.cfg.checks else []
    _warn(ev, check_results)  # outside the warning capture
    report = _report(ev, check_results, t_start)
    _write(ev, report)
    return report


def _begin(model: nn.Module, x: Tensor, y: Tensor, cfg: EvalConfig) -> _Evaluation:
    dist_ctx = _sharding.context()  # a process group (or torchrun's environment): shard the attacks
    device = _device(model, x.device)
    return _Evaluation(model=model, x=x.detach().to(device), y=y.detach().to(device), cfg=cfg,
                       device=device, dist_ctx=dist_ctx, views=adaptive_views(model, cfg.transfer_from),
                       tmodel=trajectory_model(model))


def _clean_pass(ev: _Evaluation) -> None:
    """Clean margins and the clean trajectory statistics."""
    cfg = ev.cfg
    t0 = time.perf_counter()
    with _seeded(_derive_seed(cfg.seed, "clean"), ev.device):
        ev.clean_margin = _margins(ev.model, ev.x, ev.y, cfg.batch_size)
    ev.clean_correct = ev.clean_margin > 0
    ev.timings["clean"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev.clean_traj = trajectory_stats(ev.tmodel, ev.x, ev.y, cfg.batch_size) if ev.tmodel is not None else None
    ev.timings["trajectory"] = time.perf_counter() - t0


def _suite_context(ev: _Evaluation) -> SuiteContext:
    tmodel = ev.tmodel
    solver_model = _is_solver_model(tmodel)
    if solver_model:
        max_state = tmodel.solver_config.max_iter - 1
        s = (ev.clean_traj or {}).get("solver") or {}
        horizon = int(math.ceil(s.get("mean_steps", max_state + 1)))
        horizon = max(2, min(horizon, max_state + 1))
    elif tmodel is not None and hasattr(tmodel, "depth"):
        max_state = int(tmodel.depth)
        horizon = int(tmodel.depth)
    else:
        max_state = horizon = None
    return SuiteContext(model=ev.model, trajectory_model=tmodel, has_deq=find_deq(ev.model) is not None,
                        solver_model=solver_model, randomized=bool(getattr(ev.model, "randomized", False)),
                        horizon=horizon, max_state=max_state)


def _plan(ev: _Evaluation) -> None:
    """The suite's attack units for this model, and the configuration hash they run under."""
    cfg = ev.cfg
    specs = build_suite(cfg.suite, _suite_context(ev))
    if ev.tmodel is not None and find_deq(ev.model) is None:
        ev.notes.append(f"{type(ev.tmodel).__name__} has no fixed-point solver whose gradient can be "
                        "chosen: PGD runs with the model's own gradient (full backpropagation)")
    if ev.tmodel is None:
        ev.notes.append("the model exposes no trajectory: per-state accuracy, solver statistics and "
                        "intermediate-state attacks do not apply")
    ev.units = _expand(specs, ev.model, ev.views, ev.tmodel, ev.notes)
    if not ev.units:
        raise ConfigError("no attack of the suite applies to this model")
    ev.suite_label = cfg.suite if isinstance(cfg.suite, str) else [s.name for s in specs]
    ev.config = {
        "schema_version": SCHEMA_VERSION, "model": _hash_model(ev.model), "data": _hash_data(ev.x, ev.y),
        "threat": ev.norm, "eps": list(cfg.eps), "units": [u.key for u in ev.units], "steps": cfg.steps,
        "seed": cfg.seed, "batch_size": cfg.batch_size, "suite": ev.suite_label, "cascade": cfg.cascade,
        "transfer_sources": {k: _hash_model(v.model) for k, v in ev.views.items()
                             if getattr(v, "view_kind", None) == "transfer"},
    }
    ev.config_hash = hashlib.sha256(json.dumps(ev.config, sort_keys=True).encode()).hexdigest()


def _finished_report(ev: _Evaluation) -> Optional[EvalReport]:
    if ev.cfg.out_dir is None or not ev.cfg.resume:
        return None
    return _completed_report(Path(ev.cfg.out_dir), ev.config_hash)


def _open_store(ev: _Evaluation) -> None:
    cfg = ev.cfg
    _sharding.check_same_config(ev.config_hash, ev.dist_ctx)
    ev.store = _sharding.open_store(
        lambda: _PartialStore(Path(cfg.out_dir), ev.config_hash, ev.config, cfg.resume), cfg.out_dir, ev.dist_ctx)


def _attack_all(ev: _Evaluation) -> None:
    """Every attack unit at every eps; fills ``ev.results`` and ``ev.success_flags``."""
    from tqdm.auto import tqdm
    cfg = ev.cfg
    ev.bar = tqdm(total=len(cfg.eps) * len(ev.units), desc="evaluate", disable=not cfg.progress or not ev.main,
                  leave=False)
    t_attacks = 0.0
    t_traj = ev.timings["trajectory"]
    try:
        for ei, e in enumerate(cfg.eps):
            t_eps = time.perf_counter()
            st = _EpsState(ei=ei, eps=e, robust=ev.clean_correct.clone(),
                           first=[None if c else "clean" for c in ev.clean_correct.tolist()],
                           worst_margin=ev.clean_margin.clone(), worst_x=ev.x.clone())
            ev.success_flags[e] = {}
            for ui, unit in enumerate(ev.units):
                t_attacks += _attack_unit(ev, st, ui, unit)
            t0 = time.perf_counter()
            per_state, solver, rcurve = _adversarial_trajectory(ev, st.worst_x)
            t_traj += time.perf_counter() - t0
            ev.results.append(EpsResult(
                eps=e, robust_accuracy=float(st.robust.float().mean()), attacks=st.attack_results,
                robust=st.robust.tolist(), first_success=st.first, per_state=per_state, solver=solver,
                residual_curve=rcurve, seconds=time.perf_counter() - t_eps))
    finally:
        ev.bar.close()
    ev.timings["attacks"] = t_attacks
    ev.timings["trajectory"] = t_traj


def _attack_unit(ev: _Evaluation, st: _EpsState, ui: int, unit: _Unit) -> float:
    """Run (or reload) one unit at ``st.eps`` and fold it into the worst case; its seconds."""
    t0 = time.perf_counter()
    out = _load_unit(ev, st, ui, unit)
    if out is None:
        out = _compute_unit(ev, st, ui, unit, t0)
    _merge_unit(ev, st, unit, ui, out)
    return out.seconds


def _load_unit(ev: _Evaluation, st: _EpsState, ui: int, unit: _Unit) -> Optional[_UnitOutcome]:
    loaded = ev.store.load(st.ei, ui, unit.key) if ev.store is not None else None
    if loaded is None:
        return None
    meta, tens = loaded
    dev = ev.device
    return _UnitOutcome(adv_correct=tens["adv_correct"].to(dev).bool(), upd_idx=tens["upd_idx"].to(dev).long(),
                        upd_x=tens["upd_x"].to(device=dev, dtype=ev.x.dtype), margin=tens["margin"].to(dev),
                        seconds=float(meta["seconds"]), describe=meta["describe"],
                        violations=int(meta["violations"]), resumed=True)


def _compute_unit(ev: _Evaluation, st: _EpsState, ui: int, unit: _Unit, t0: float) -> _UnitOutcome:
    cfg, e = ev.cfg, st.eps
    useed = unit_seed(cfg.seed, e, unit.key)
    attacked = st.robust.clone() if cfg.cascade else ev.clean_correct
    status = f"eps {e:g} · {unit.key} · {int(attacked.sum())} samples"
    ev.bar.set_postfix_str(status)
    with _seeded(useed, ev.device), progress_reporter(_show_progress(ev.bar, status)):
        desc, x_adv, viol = _run_unit(ev, unit, attacked, e, useed)
        margin_u = torch.where(attacked, _margins(ev.model, x_adv, ev.y, cfg.batch_size), ev.clean_margin)
    # samples not attacked (cascade: already broken) count as not broken by it
    adv_correct = ev.clean_correct & (margin_u > 0)
    upd_idx = (attacked & (margin_u < st.worst_margin)).nonzero().flatten()
    out = _UnitOutcome(adv_correct=adv_correct, upd_idx=upd_idx, upd_x=x_adv[upd_idx], margin=margin_u,
                       seconds=time.perf_counter() - t0, describe=desc, violations=viol, resumed=False)
    if ev.store is not None:
        ev.store.save(st.ei, ui, {
            "key": unit.key, "spec": unit.spec.name, "view": unit.view, "kind": unit.kind, "eps": e,
            "seconds": out.seconds, "describe": desc, "violations": viol},
            {"adv_correct": adv_correct, "margin": margin_u, "upd_idx": upd_idx, "upd_x": out.upd_x})
    return out


def _merge_unit(ev: _Evaluation, st: _EpsState, unit: _Unit, ui: int, out: _UnitOutcome) -> None:
    cfg, e = ev.cfg, st.eps
    st.worst_margin[out.upd_idx] = out.margin[out.upd_idx]
    st.worst_x[out.upd_idx] = out.upd_x
    newly = st.robust & ~out.adv_correct
    for i in newly.nonzero().flatten().tolist():
        st.first[i] = unit.key
    st.robust = st.robust & out.adv_correct
    ev.success_flags[e][unit.key] = ev.clean_correct & ~out.adv_correct
    if out.violations:
        ev.notes.append(f"{unit.key} at eps {e:g}: {out.violations} examples left the threat model "
                        "and were projected back before judging")
    ar = AttackResult(key=unit.key, spec=unit.spec.name, view=unit.view, kind=unit.kind,
                      accuracy=None if cfg.cascade else float(out.adv_correct.float().mean()),
                      cumulative_accuracy=float(st.robust.float().mean()),
                      new_successes=int(newly.sum()), seconds=out.seconds, describe=out.describe,
                      resumed=out.resumed, violations=out.violations)
    st.attack_results.append(ar)
    logger.info("eps %g %s: accuracy %s, worst case %.3f%s", e, unit.key,
                "n/a (cascade)" if ar.accuracy is None else f"{ar.accuracy:.3f}",
                ar.cumulative_accuracy, " (resumed)" if out.resumed else "")
    ev.bar.update(1)
    ev.bar.set_postfix(eps=f"{e:g}", robust=f"{ar.cumulative_accuracy:.3f}")
    if cfg.callback is not None:
        cfg.callback({"eps": e, "eps_index": st.ei, "unit_index": ui, "key": unit.key,
                      "accuracy": ar.accuracy, "cumulative_accuracy": ar.cumulative_accuracy,
                      "resumed": out.resumed})


def _adversarial_trajectory(ev: _Evaluation, worst_x: Tensor):
    """(per_state, solver, residual_curve) of the worst-case examples next to the clean ones."""
    per_state = solver = rcurve = None
    clean = ev.clean_traj
    if ev.tmodel is None:
        return per_state, solver, rcurve
    adv = trajectory_stats(ev.tmodel, worst_x, ev.y, ev.cfg.batch_size)
    if clean and clean["per_state"] and adv["per_state"]:
        per_state = {"steps": clean["per_state"]["steps"], "clean": clean["per_state"]["accuracy"],
                     "adversarial": adv["per_state"]["accuracy"]}
    if clean and clean["solver"] is not None:
        solver = {"clean": clean["solver"], "adversarial": adv["solver"]}
        rcurve = {"clean": clean["residual_curve"], "adversarial": adv["residual_curve"]}
    return per_state, solver, rcurve


def _warn(ev: _Evaluation, check_results: List[CheckResult]) -> None:
    for c in check_results:
        if c.fired:
            cat = NonConvergenceWarning if c.name == "non_convergence" else GradientMaskingWarning
            warnings.warn(f"[{c.name}] {c.message}", cat, stacklevel=user_stacklevel())
    counters = ev.counters
    if ev.dist_ctx is not None:  # the ranks' attack objects warned separately: their total
        counters["nonconvergence_warnings"] = _sharding.sum_int(
            counters.get("nonconvergence_warnings", 0), ev.dist_ctx, ev.device)
    if counters.get("nonconvergence_warnings"):
        ev.notes.append(f"{counters['nonconvergence_warnings']} non-convergence warnings were raised by "
                        "attacks or adjoint solves during the evaluation (see the non_convergence check for "
                        "the forward solves)")


def _report(ev: _Evaluation, check_results: List[CheckResult], t_start: float) -> EvalReport:
    cfg, traj = ev.cfg, ev.clean_traj
    provenance = _provenance(ev)
    ev.timings["total"] = time.perf_counter() - t_start
    clean_acc = float(ev.clean_correct.float().mean())
    report = EvalReport(
        clean_accuracy=clean_acc, n_samples=ev.x.shape[0], threat=ev.norm, eps=list(cfg.eps),
        suite=ev.suite_label, results=ev.results,
        clean={"accuracy": clean_acc,
               "per_state": traj["per_state"] if traj else None,
               "solver": traj["solver"] if traj else None,
               "residual_curve": traj["residual_curve"] if traj else None},
        checks=check_results, timings=ev.timings, provenance=provenance, notes=ev.notes,
        config_hash=ev.config_hash)
    if cfg.certify is not None and cfg.certify is not False:
        from .bracket import attach_bracket
        attach_bracket(report, ev.model, ev.x, ev.y, cfg.certify, seed=cfg.seed)
    return report


def _write(ev: _Evaluation, report: EvalReport) -> None:
    cfg = ev.cfg
    if cfg.out_dir is not None and ev.main:  # in a process group rank 0 writes
        report.save(cfg.out_dir)
        if ev.store is not None:
            ev.store.remove()
    if cfg.tensorboard and ev.main:
        log_dir = (Path(cfg.tensorboard) if isinstance(cfg.tensorboard, (str, Path))
                   else Path(cfg.out_dir) / "tensorboard")
        report.write_tensorboard(log_dir)


def _expand(specs: List[AttackSpec], model: nn.Module, views: Dict[str, nn.Module],
            tmodel: Optional[nn.Module], notes: List[str]) -> List[_Unit]:
    units: List[_Unit] = []
    for s in specs:
        if s.scope == "views":
            targets = [("model", model)] + list(views.items())
        elif s.scope == "model":
            targets = [("model", model)]
        else:
            if tmodel is None:
                notes.append(f"{s.name} skipped: the model has no trajectory")
                continue
            targets = [("model" if tmodel is model else "deq", tmodel)]
        for vname, target in targets:
            if s.needs == "deq" and find_deq(target) is None:
                notes.append(f"{s.name} skipped on {vname}: no DEQ whose gradient can be chosen")
                continue
            if s.needs == "trajectory" and not _has_trajectory(target):
                notes.append(f"{s.name} skipped on {vname}: no trajectory")
                continue
            if s.needs == "solver" and not _is_solver_model(target):
                notes.append(f"{s.name} skipped on {vname}: no fixed-point solver")
                continue
            key = s.name if vname == "model" else f"{s.name}@{vname}"
            units.append(_Unit(key, s, vname, target))
    return units


def _run_unit(ev: _Evaluation, unit: _Unit, attacked: Tensor, eps: float, seed: int):
    """Build the attack, run it on the samples ``attacked`` (N,) bool; returns (describe, x_adv,
    violations); ``x_adv`` is ``x`` on the other samples."""
    x, y, norm, batch_size = ev.x, ev.y, ev.norm, ev.cfg.batch_size
    atk = unit.spec.factory(unit.target, eps=eps, norm=norm, steps=ev.cfg.steps, seed=seed)
    if not callable(atk):
        raise ConfigError(f"the factory of {unit.spec.name!r} returned {type(atk).__name__}, not an attack")
    desc = _describe(atk)
    desc["target"] = unit.view
    idx = attacked.nonzero().flatten()
    x_adv = x.clone()
    viol = 0
    # in a process group each rank claims whole batches (one process: all of them); the global
    # RNG restarts from the unit seed at every batch, so a batch's examples do not depend on the
    # batches before it nor on the rank that attacks it
    ctx = _sharding.context(auto_init=False)
    mine = torch.zeros_like(attacked) if ctx is not None else None
    for i in _sharding.owned_batches(range(0, idx.numel(), batch_size), ctx):
        b = idx[i:i + batch_size]
        xb = x[b]
        with _seeded(seed, x.device):
            xa = atk(xb, y[b])
        if not isinstance(xa, Tensor) or xa.shape != xb.shape:
            raise ConfigError(f"attack {unit.key!r} returned {type(xa).__name__} "
                              f"{tuple(getattr(xa, 'shape', ()))} for inputs {tuple(xb.shape)}")
        xa, nb = _check_ball(xa.detach().to(device=x.device, dtype=x.dtype), xb, eps, norm)
        viol += nb
        x_adv[b] = xa
        per_attack = (getattr(atk, "last_stats", None) or {}).get("robust_accuracy_after")
        if per_attack and ctx is None:  # AutoAttack's own per-attack accuracies, per batch
            desc.setdefault("robust_accuracy_after", []).append(
                {"n": int(b.numel()), **{k: float(v) for k, v in per_attack.items()}})
        if mine is not None:
            mine[b] = True
        report_progress(done=min(i + batch_size, idx.numel()), total=idx.numel())
    if ctx is not None:  # every rank gets every rank's examples
        x_adv = _sharding.merge_rows(x_adv, mine, ctx)
        viol = _sharding.sum_int(viol, ctx, x.device)
    return desc, x_adv, viol


def _show_progress(bar, status: str):
    """A progress reporter writing where the running unit stands into the bar's postfix."""
    def show(info: Dict[str, Any]) -> None:
        parts = [status]
        if info.get("stage"):
            parts.append(str(info["stage"]))
        if "done" in info and "total" in info:
            parts.append(f"{info['done']}/{info['total']} samples done")
        bar.set_postfix_str(" · ".join(parts))
    return show


# -- the checks -------------------------------------------------------------------------------------
def _run_checks(ev: _Evaluation) -> List[CheckResult]:
    """The enabled checks of ``ev.cfg.check_config`` on the first ``subset`` samples; a check that
    raises is recorded as skipped (and noted), never loses the evaluation."""
    t0 = time.perf_counter()
    cc = ev.cfg.check_config
    n_sub = min(cc.subset, ev.x.shape[0])
    xs, ys = ev.x[:n_sub], ev.y[:n_sub]
    out: List[CheckResult] = []
    for name, fn in _check_steps(ev, xs, ys):
        if name in cc.enabled:
            _run_check(ev, out, name, fn)
    ev.timings["checks"] = time.perf_counter() - t0
    return out


def _check_steps(ev: _Evaluation, xs: Tensor, ys: Tensor) -> List[Tuple[str, Callable[[], CheckResult]]]:
    m, cc, norm, seed, views = ev.model, ev.cfg.check_config, ev.norm, ev.cfg.seed, ev.views
    return [
        ("randomized_output", lambda: _checks.check_randomized(m, xs, cc, warn=False)),
        ("softmax_output", lambda: _checks.check_softmax(m, xs, cc, warn=False)),
        ("zero_gradients", lambda: _checks.check_gradients(m, xs, ys, cc, warn=False)),
        ("black_box_stronger", lambda: _check_black_box(ev, xs, ys)),
        ("large_eps_not_chance", lambda: _checks.check_large_eps(
            m, xs, ys, norm=norm, views=views, config=cc, seed=_derive_seed(seed, "large_eps"), warn=False)),
        ("non_monotonic", lambda: _check_monotonic(ev, xs, ys)),
        ("non_convergence", lambda: _check_convergence(ev)),
        ("estimator_disagreement", lambda: _checks.check_estimators(m, xs, ys, cc, warn=False)),
    ]


def _run_check(ev: _Evaluation, out: List[CheckResult], name: str, fn: Callable[[], CheckResult]) -> None:
    t0 = time.perf_counter()
    try:
        with _seeded(_derive_seed(ev.cfg.seed, "check", name), ev.device):
            out.append(fn())
        ev.timings[f"check:{name}"] = time.perf_counter() - t0
    except Exception as e:  # a check must not lose the evaluation; the failure is recorded
        logger.exception("check %s failed", name)
        out.append(CheckResult(name, False, f"skipped: the check raised {type(e).__name__}: {e}",
                               skipped=True))
        ev.notes.append(f"check {name} could not run: {type(e).__name__}: {e}")


def _check_black_box(ev: _Evaluation, xs: Tensor, ys: Tensor) -> CheckResult:
    cc, n_sub = ev.cfg.check_config, xs.shape[0]
    kinds = {u.key: u.kind for u in ev.units}
    bb_keys = [k for k, kind in kinds.items() if kind in ("black-box", "transfer")]
    wb_keys = [k for k, kind in kinds.items() if kind == "white-box"]
    inside = _square_inside_autoattack(ev)
    if bb_keys:
        best = inside
        for r in ev.results:
            fl = ev.success_flags[r.eps]
            white = _any([fl[k] for k in wb_keys], ev.clean_correct)
            black = _any([fl[k] for k in bb_keys], ev.clean_correct)
            res = _checks.check_black_box(white, black, cc, source=" + ".join(bb_keys), warn=False,
                                          details={"eps": r.eps})
            if best is None or (res.value or 0) > (best.value or 0):
                best = res
        return best
    if inside is not None:  # AutoAttack's Square (thousands of queries) ran: stronger than the probe
        return inside
    if cc.black_box_queries <= 0:
        return _checks.skipped("black_box_stronger", "no black-box or transfer attack in the suite "
                               "and the Square probe is disabled")
    e = max(r.eps for r in ev.results)
    white = _any([ev.success_flags[e][k] for k in wb_keys], ev.clean_correct)[:n_sub]
    survivors = ev.clean_correct[:n_sub] & ~white  # only these can show a black-box-only success
    black = torch.zeros_like(white)
    if bool(survivors.any()):
        black[survivors] = _checks.square_probe(
            ev.model, xs[survivors], ys[survivors], eps=e, norm=ev.norm, queries=cc.black_box_queries,
            seed=_derive_seed(ev.cfg.seed, "square"))
    return _checks.check_black_box(white, black, cc, warn=False,
                                   source=f"Square ({cc.black_box_queries} queries)", details={"eps": e})


def _square_inside_autoattack(ev: _Evaluation) -> Optional[CheckResult]:
    """The black-box evidence an AutoAttack unit already holds (None if there is none): in a
    cascade, AutoAttack only attacks the samples every earlier unit left robust, so the samples
    its Square stage breaks after its gradient-based stages (APGD, FAB) missed them were missed
    by every white-box attack before. Counted from AutoAttack's own per-stage robust accuracies
    (``robust_accuracy_after``: cumulative, per batch); the worst eps is reported. Without a
    cascade another unit may have broken those samples, so nothing is claimed."""
    if not ev.cfg.cascade:
        return None
    best = None
    n = int(ev.clean_correct.numel())
    for r in ev.results:
        count, seen = 0, False
        for a in r.attacks:
            recs = a.describe.get("robust_accuracy_after") if isinstance(a.describe, dict) else None
            for rec in recs or ():
                stages = [k for k in rec if k != "n"]
                if "square" not in stages or stages.index("square") == 0:
                    continue
                i = stages.index("square")
                count += int(round(rec["n"] * (rec[stages[i - 1]] - rec["square"])))
                seen = True
        if seen:
            res = _checks.check_black_box_count(
                min(max(count, 0), n), n, ev.cfg.check_config, source="Square inside AutoAttack",
                warn=False, details={"eps": r.eps})
            if best is None or (res.value or 0) > (best.value or 0):
                best = res
    return best


def _check_monotonic(ev: _Evaluation, xs: Tensor, ys: Tensor) -> CheckResult:
    pick = min(ev.results, key=lambda r: (abs(r.robust_accuracy - 0.5), r.eps))
    sweep = {r.eps: r.robust_accuracy for r in ev.results} if len(ev.results) > 1 else None
    return _checks.check_monotonic(ev.model, xs, ys, eps=pick.eps, norm=ev.norm, views=ev.views, sweep=sweep,
                                   config=ev.cfg.check_config, seed=_derive_seed(ev.cfg.seed, "monotonic"),
                                   warn=False)


def _check_convergence(ev: _Evaluation) -> CheckResult:
    clean = ev.clean_traj["solver"] if ev.clean_traj else None
    adv = {r.eps: r.solver["adversarial"] for r in ev.results if r.solver}
    return _checks.check_convergence(clean, adv, ev.cfg.check_config, warn=False)


def _any(flags: List[Tensor], like: Tensor) -> Tensor:
    out = torch.zeros_like(like, dtype=torch.bool)
    for f in flags:
        out = out | f
    return out


def _provenance(ev: _Evaluation) -> Dict[str, Any]:
    from .. import __version__
    cfg, model = ev.cfg, ev.model
    attacks = {}
    if ev.results:
        for a in ev.results[0].attacks:
            attacks[a.key] = {"name": a.describe.get("name"), "implementation": a.describe.get("implementation"),
                              "spec": a.spec, "view": a.view, "kind": a.kind}
    return {
        "versions": {"robustdeq": __version__, "torch": torch.__version__,
                     "torchattacks": _version("torchattacks"), "pyautoattack": _version("pyautoattack"),
                     "numpy": _version("numpy"), "python": sys.version.split()[0]},
        "platform": platform.platform(), "device": str(ev.device),
        "seed": cfg.seed, "threat": ev.norm, "eps": list(cfg.eps), "steps": cfg.steps, "batch_size": cfg.batch_size,
        "alpha_rule": "2.5 * eps / steps", "suite": ev.suite_label, "cascade": cfg.cascade, "attacks": attacks,
        "model": {
            "class": type(model).__name__,
            "config": getattr(model, "robustdeq_config", None),
            "parameters_sha256": ev.config["model"],
            "defense": ({"randomized": getattr(model, "randomized", None),
                         "dynamic": getattr(model, "dynamic", None),
                         "differentiable": getattr(model, "differentiable", None),
                         "views": sorted(ev.views)} if hasattr(model, "adaptive_views") else None),
            "describe": model.describe() if hasattr(model, "describe") and callable(model.describe) else None,
        },
        "data": {"n": int(ev.x.shape[0]), "shape": list(ev.x.shape[1:]), "sha256": ev.config["data"]},
        "check_config": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in dataclasses.asdict(cfg.check_config).items()},
    }


__all__ = ["evaluate", "EvalConfig", "AttackSpec", "SuiteContext", "SUITES", "build_suite", "builtin_spec", "is_attack_name",
           "register_attack_spec", "register_suite",
           "suite_names", "trajectory_model", "trajectory_stats", "unit_seed", "EvalReport"]
