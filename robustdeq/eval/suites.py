"""Attack specs and suites: what :func:`~robustdeq.eval.harness.evaluate` runs.

A *suite* is a list of :class:`AttackSpec` (name, factory, kind, scope), resolved for one model by
:func:`build_suite` from a registered suite name (:data:`robustdeq.registry.SUITES`) or a list of
specs, attack names (:data:`robustdeq.registry.ATTACK_SPECS`) and named factories.

Built-in suites (alpha = 2.5 eps / steps, seeds derived from the evaluation seed; the native APGD
units run ``5 x steps`` iterations, AutoAttack's 100 at the default ``steps=20``):

- ``quick``: PGD with the implicit (IFT) gradient and PGD with an unrolled gradient
  (``UnrolledGrad(8)``) for models holding a ``DEQClassifier``, PGD with the model's own gradient
  otherwise (3 random restarts, cross-entropy), then robustdeq's native APGD-CE and APGD-T on
  the 9 classes of highest clean logit after the top one, as AutoAttack runs it (Croce & Hein
  2020; on 3 targets it left samples AutoAttack breaks on a trained digits DEQ; on a DEQ whose
  solves converge their gradients come from the joint forward/adjoint/input iteration), and
  ``apgd-t3x3-stripes``: APGD-T again on the 3 likeliest targets, 3 runs each from the Linf
  Square attack's start (a random sign per column and channel; ``apgd-t3x3`` under L2: 3 runs
  from other uniform starts). On adversarially trained MDEQs at large radii which samples one
  APGD-T run breaks depends on its start; units that threshold their input leave the gradient
  zero along many pixels around the clean point and the uniform start, and runs from the
  stripes start, a vertex of the ball with whole columns shifted, break samples runs from
  uniform starts miss; on a
  model that declares ``randomized``, APGD-CE and APGD-DLR with EOT over 20 gradients
  (AutoAttack's "rand" version). No score-based unit: at large radii on adversarially trained
  DEQs a full Square search breaks samples every gradient attack leaves, but they take it
  hundreds to thousands of queries (``standard`` runs 5,000), so ``quick`` can be optimistic
  there. Like every suite, an upper bound on the robust accuracy.
- ``standard``: the native ensemble: the PGD units, APGD-CE, APGD-T (9 targets, AutoAttack's)
  and ``apgd-t3x3-stripes`` (``apgd-t3x3`` under L2),
  the Square attack (score-based; Andriushchenko et al. 2020: AutoAttack's Square stage, then,
  for as long as the run before broke a sample, runs from fresh starts: a second one on every
  sample left, then on the near misses only),
  intermediate-state attacks (Yang
  et al. 2022) on three states spread over the clean trajectory and their ensemble attack
  (randomized models: APGD-CE and APGD-DLR with EOT instead of APGD-T and Square).
- ``full``: standard + pyautoattack's AutoAttack standard as an independent reference ("rand"
  for a randomized model) + AutoAttack plus + a transfer attack crafted on the unrolled view
  (``attack_view(deq, state=K, unroll=K)``: K solver steps from z0, backpropagated) and judged on
  the model.

Other attack names for custom suites include ``pgd-exact``, ``pgd-phantom``, the ``-margin``
variants of the PGD units (Carlini-Wagner margin loss), ``apgd-dlr``, ``apgd-t3x3`` (Linf too),
``apgd-t-stripes`` (APGD-T on the 9 targets from the stripes start), ``square`` (the native
score-based Square attack, each query the model's own inference; ``square-quick``: its first ``50 x steps``
queries, with the same draws, left out under L2 on inputs of height under 5 where the L2 start
is undefined; ``pyautoattack-square`` and ``torchattacks-square`` run those libraries'
implementations), ``autoattack`` (pyautoattack
standard) and ``pyautoattack-apgd-ce`` (pyautoattack's APGD-CE stage alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from torch import nn

from .._tensor import default_alpha
from ..errors import ConfigError
from ..registry import ATTACK_SPECS, SUITES, is_attack_spec_name

# SUITES (robustdeq.registry.SUITES): the named suites, "quick", "standard", "full" and registered ones
KINDS = ("white-box", "black-box", "transfer")
SCOPES = ("views", "model", "deq")
NEEDS = ("any", "deq", "trajectory", "solver")

Factory = Callable[..., Any]  # factory(target, *, eps, norm, steps, seed) -> Attack


@dataclass(frozen=True)
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
    num_classes: Optional[int] = None  # the model's number of logits (None: unknown)
    threat: Optional[str] = None       # "Linf" or "L2" (None: unknown)
    input_shape: Optional[tuple] = None  # one sample's shape (None: unknown)


# -- built-in attack specs ------------------------------------------------------------------------
PGD_RESTARTS = 3  # random restarts of the built-in PGD units


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


#: the native APGD units' budget: AutoAttack standard's (100 iterations, 1 restart, APGD-T on the
#: 9 classes of highest clean logit after the top one); EOT over 20 gradients on a randomized
#: model (AutoAttack's "rand" version)
APGD_ITERS = 100
APGD_TARGETS = 9
APGD_EOT_RAND = 20


#: APGD's iterations per run are this many times the evaluation's ``steps`` (100 at the default 20)
APGD_STEPS_FACTOR = APGD_ITERS // 20
#: APGD-T's targets in the ``apgd-t3`` unit (a cheaper APGD-T for custom suites)
QUICK_TARGETS = 3


def apgd_iterations(steps: int) -> int:
    """The native APGD units' iterations for an evaluation with ``steps`` PGD steps."""
    return APGD_STEPS_FACTOR * int(steps)


#: the ``apgd-t3x3`` unit: APGD-T's restarts on each of its 3 likeliest targets
RESTART_TARGETS, TARGET_RESTARTS = 3, 3
#: the APGD-T units' runs (targets x restarts) side by side in one batch, this many at a time
#: (``APGDT(parallel_runs=...)``): the same per-sample runs in far fewer batched steps; the
#: batch is up to this many times the evaluation's
APGD_PARALLEL_RUNS = 9


def _apgd_factory(loss: str, *, n_targets: int = APGD_TARGETS, eot_iter: int = 1,
                  restarts: int = 1, seed_offset: int = 0, start: str = "uniform"):
    def factory(target, *, eps, norm, steps, seed):
        # early stopping: a sample leaves the run once broken (confirmed by the model's own
        # inference on a DEQ); off a DEQ the samples broken are the plain run's, at a fraction
        # of the cost
        from ..attacks.apgd import APGD, APGDT
        iters = apgd_iterations(steps)
        if seed is not None:
            seed = seed + seed_offset
        if loss == "dlr-targeted":
            return APGDT(target, eps=eps, norm=norm, steps=iters, n_target_classes=n_targets,
                         restarts=restarts, eot_iter=eot_iter, seed=seed, early_stop=True,
                         parallel_runs=APGD_PARALLEL_RUNS, start=start)
        return APGD(target, eps=eps, norm=norm, steps=iters, loss=loss, eot_iter=eot_iter, seed=seed,
                    early_stop=True, start=start)
    return factory


def _transfer_factory(k: int):
    def factory(target, *, eps, norm, steps, seed):
        from ..attacks import PGD
        from ..deq.views import attack_view
        surrogate = attack_view(target, state=k, unroll=k)
        return PGD(surrogate, eps=eps, alpha=default_alpha(eps, steps), steps=steps, norm=norm, seed=seed)
    return factory


def _torchattacks_square_factory(queries: int):
    def factory(target, *, eps, norm, steps, seed):
        from ..attacks import TorchAttack
        return TorchAttack(target, "Square", eps=eps, norm=norm, n_queries=queries, seed=seed)
    return factory


#: the native Square unit's budget and settings: AutoAttack standard's Square stage
SQUARE_QUERIES = 5000
#: ... then, each only if the run before it broke a sample (fresh starts, next draws), a second
#: run on every sample left ...
SQUARE_FULL_RUNS = 2
#: ... and runs on the near misses only: the samples whose best margin so far is below this
#: fraction of their clean margin ...
SQUARE_RESTART_FRACTION = 0.1
#: ... at most this many runs in all
SQUARE_MAX_RUNS = 4


#: the Square units' (Linf) queries: up to this many of a sample's next proposals per query
#: batch (``Square(speculate=...)``: the same decisions as one proposal per query, in fewer,
#: larger batches)
SQUARE_SPECULATE = 32

#: the ``square-quick`` unit's queries are this many times the evaluation's ``steps`` (1,000 at
#: the default 20): the first part of the standard unit's search (same schedule and draws)
SQUARE_QUICK_FACTOR = 50


def square_quick_queries(steps: int) -> int:
    """The ``square-quick`` unit's queries for an evaluation with ``steps`` PGD steps."""
    return SQUARE_QUICK_FACTOR * int(steps)


def _square_factory(queries: Optional[int], restart_fraction: Optional[float] = None):
    def factory(target, *, eps, norm, steps, seed):
        from ..attacks.square import Square
        n = square_quick_queries(steps) if queries is None else queries
        return Square(target, eps=eps, norm=norm, n_queries=n, p_init=0.8,
                      rescale_schedule=False, seed=seed,
                      n_restarts=1 if restart_fraction is None else SQUARE_MAX_RUNS,
                      restart_fraction=restart_fraction,
                      full_runs=1 if restart_fraction is None else SQUARE_FULL_RUNS,
                      restart_while_breaking=restart_fraction is not None,
                      speculate=SQUARE_SPECULATE if norm == "Linf" else 1)
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


def _pyautoattack_apgd_ce_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec("pyautoattack-apgd-ce", _autoattack_factory("custom", attacks=["apgd-ce"]),
                       description="pyautoattack's APGD-CE stage alone (100 iterations)")]


def _eot(ctx: SuiteContext) -> int:
    return APGD_EOT_RAND if ctx.randomized else 1


def _native(what: str, ctx: SuiteContext) -> str:
    eot = _eot(ctx)
    return (f"{what}, {APGD_STEPS_FACTOR} x steps iterations (robustdeq's APGD: the joint "
            f"iteration on a DEQ whose solves converge, exact solves otherwise; examples judged by "
            f"the model's inference)" + (f", EOT over {eot} gradients" if eot > 1 else ""))


def _apgd_ce_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec("apgd-ce", _apgd_factory("ce", eot_iter=_eot(ctx)),
                       description=_native("APGD-CE (cross-entropy, adaptive step size)", ctx))]


def _apgd_dlr_spec(ctx: SuiteContext) -> List[AttackSpec]:
    if ctx.num_classes is not None and ctx.num_classes < 3:
        return []  # the DLR loss needs 3 classes
    return [AttackSpec("apgd-dlr", _apgd_factory("dlr", eot_iter=_eot(ctx)),
                       description=_native("APGD-DLR (difference-of-logits-ratio loss)", ctx))]


def _apgd_t_builder(name: str, targets: int, restarts: int = 1, start: str = "uniform"):
    # more runs per target, and runs from another kind of start, draw from another seed than
    # apgd-t's: the first run on the first target would repeat apgd-t's
    seed_offset = 1 if restarts > 1 or start != "uniform" else 0

    def build(ctx: SuiteContext) -> List[AttackSpec]:
        n = targets if ctx.num_classes is None else min(targets, ctx.num_classes - 1)
        if ctx.num_classes is not None and ctx.num_classes < 4:
            return []  # the targeted DLR loss needs 4 classes
        if start == "stripes" and ctx.threat == "L2":
            return []  # the stripes start is the Linf Square attack's
        other = "other random starts" if start == "uniform" else "random starts"
        runs = f"{restarts} runs from {other} on each of " if restarts > 1 else ""
        where = (", each run from the Square attack's start (a random sign per column and "
                 "channel, a vertex of the ball)") if start == "stripes" else ""
        return [AttackSpec(name, _apgd_factory("dlr-targeted", n_targets=n, eot_iter=_eot(ctx),
                                               restarts=restarts, seed_offset=seed_offset,
                                               start=start),
                           description=_native(f"APGD-T (targeted DLR loss, {runs}the {n} classes of "
                                               f"highest clean logit after the top one{where})", ctx))]
    return build


def _transfer_unrolled_spec(ctx: SuiteContext) -> List[AttackSpec]:
    if ctx.horizon is None or ctx.max_state is None:
        return []
    k = max(1, min(ctx.horizon, ctx.max_state))
    return [AttackSpec("transfer-unrolled", _transfer_factory(k), kind="transfer", scope="deq", needs="solver",
                       description=f"PGD on the unrolled view ({k} steps from z0), judged on the model")]


def _square_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec("square", _square_factory(SQUARE_QUERIES, SQUARE_RESTART_FRACTION),
                       kind="black-box",
                       description=f"Square attack (score-based), {SQUARE_QUERIES} queries, AutoAttack's "
                                   "settings, then, while the run before broke a sample, a second "
                                   "run on every sample left and more on the near misses (best margin "
                                   f"below {SQUARE_RESTART_FRACTION:g} of the clean one), at most "
                                   f"{SQUARE_MAX_RUNS} runs; each query is the "
                                   "model's own inference (cold solves on a DEQ)")]


def _square_runs(ctx: SuiteContext) -> bool:
    """Whether the Square attack is defined for the threat and inputs of ``ctx``: its L2 start
    tiles the image with squares of side ``height // 5`` (images of height >= 5; flat inputs
    are one row)."""
    if ctx.threat != "L2" or ctx.input_shape is None:
        return True
    shape = tuple(ctx.input_shape)
    height = shape[-2] if len(shape) >= 2 else 1
    return height >= 5


def _square_quick_spec(ctx: SuiteContext) -> List[AttackSpec]:
    if not _square_runs(ctx):
        return []
    # scope "model": a score-based attack reads the model's outputs, so it attacks the defense
    # itself, not its gradient views
    return [AttackSpec("square-quick", _square_factory(None), kind="black-box", scope="model",
                       description=f"Square attack (score-based), {SQUARE_QUICK_FACTOR} x steps queries "
                                   "(AutoAttack's settings otherwise: the first part of its search); "
                                   "each query the model's own inference")]


def _pyautoattack_square_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec("pyautoattack-square", _autoattack_factory("custom", attacks=["square"]),
                       kind="black-box", description="pyautoattack's Square stage alone (5000 queries)")]


def _torchattacks_square_spec(ctx: SuiteContext) -> List[AttackSpec]:
    return [AttackSpec("torchattacks-square", _torchattacks_square_factory(1000), kind="black-box",
                       description="Square attack, 1000 queries (torchattacks)")]


def _builtin_specs() -> Dict[str, Callable[[SuiteContext], List[AttackSpec]]]:
    specs = {}
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
            specs[name] = _pgd_spec(name, base, needs, what, loss_name)
    for name, fn in (("states", _states_spec), ("state-ensemble", _state_ensemble_spec),
                     ("autoattack", _autoattack_spec), ("autoattack-plus", _autoattack_plus_spec),
                     ("apgd-ce", _apgd_ce_spec), ("apgd-dlr", _apgd_dlr_spec),
                     ("apgd-t", _apgd_t_builder("apgd-t", APGD_TARGETS)),
                     (f"apgd-t{QUICK_TARGETS}", _apgd_t_builder(f"apgd-t{QUICK_TARGETS}", QUICK_TARGETS)),
                     ("apgd-t3x3", _apgd_t_builder("apgd-t3x3", RESTART_TARGETS, TARGET_RESTARTS)),
                     ("apgd-t3x3-stripes", _apgd_t_builder("apgd-t3x3-stripes", RESTART_TARGETS,
                                                           TARGET_RESTARTS, start="stripes")),
                     ("apgd-t-stripes", _apgd_t_builder("apgd-t-stripes", APGD_TARGETS, start="stripes")),
                     ("pyautoattack-apgd-ce", _pyautoattack_apgd_ce_spec),
                     ("transfer-unrolled", _transfer_unrolled_spec), ("square", _square_spec),
                     ("square-quick", _square_quick_spec),
                     ("pyautoattack-square", _pyautoattack_square_spec),
                     ("torchattacks-square", _torchattacks_square_spec)):
        specs[name] = fn
    return specs


#: the built-in attack specs by name; :data:`robustdeq.registry.ATTACK_SPECS` declares each name
#: (torch-free) and loads its builder from here on first use
BUILTIN_SPECS = _builtin_specs()


def builtin_spec(name: str, ctx: SuiteContext) -> List[AttackSpec]:
    """The spec(s) called ``name``: a registered attack (:data:`robustdeq.registry.ATTACK_SPECS`:
    the built-ins and :func:`register_attack_spec`; ``states`` expands to one spec per state), or
    ``state-<k>``."""
    if name not in ATTACK_SPECS and is_attack_spec_name(name):
        return _state_k_spec(name, ctx)
    out = ATTACK_SPECS.get(name)(ctx)
    out = [out] if isinstance(out, AttackSpec) else list(out or [])
    bad = [o for o in out if not isinstance(o, AttackSpec)]
    if bad:
        raise ConfigError(f"the attack builder {name!r} returned {bad[0]!r}, not an AttackSpec")
    return out


# the built-in suites (robustdeq.registry.SUITES refers to them by name)
def _more_apgd_t(ctx: SuiteContext) -> str:
    # APGD-T's second unit: its runs start where the Linf Square attack does (the stripes
    # start is defined for Linf only)
    return "apgd-t3x3" if ctx.threat == "L2" else "apgd-t3x3-stripes"


def _suite_quick(ctx: SuiteContext) -> List[str]:
    pgd = ["pgd-ift", "pgd-unrolled"] if ctx.has_deq else ["pgd"]
    if ctx.randomized:  # AutoAttack's "rand" version's losses, with EOT
        return pgd + ["apgd-ce", "apgd-dlr"]
    return pgd + ["apgd-ce", "apgd-t", _more_apgd_t(ctx)]


def _suite_standard(ctx: SuiteContext) -> List[str]:
    names = (["pgd-ift", "pgd-unrolled"] if ctx.has_deq else ["pgd"]) + ["apgd-ce"]
    names += ["apgd-dlr"] if ctx.randomized else ["apgd-t", _more_apgd_t(ctx), "square"]
    if ctx.trajectory_model is not None:
        names += ["states", "state-ensemble"]
    return names


def _suite_full(ctx: SuiteContext) -> List[str]:
    names = _suite_standard(ctx) + ["autoattack", "autoattack-plus"]
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



__all__ = ["AttackSpec", "SuiteContext", "KINDS", "SCOPES", "NEEDS", "PGD_RESTARTS",
           "APGD_ITERS", "APGD_TARGETS", "QUICK_TARGETS", "RESTART_TARGETS", "TARGET_RESTARTS",
           "apgd_iterations", "APGD_PARALLEL_RUNS", "SQUARE_QUERIES", "SQUARE_RESTART_FRACTION",
           "SQUARE_MAX_RUNS", "SQUARE_FULL_RUNS", "SQUARE_SPECULATE", "SQUARE_QUICK_FACTOR",
           "square_quick_queries",
           "register_attack_spec", "register_suite", "builtin_spec", "suite_names",
           "build_suite"]
