"""Named registries: solvers, gradient estimators, attack specs, suites, recipes, objectives,
models, attacks, datasets, inference-time wrappers.

A :class:`Registry` maps a name to an entry (a class, a builder function, ...). Built-in entries
are declared here as ``"module:attribute"`` (or ``"module:TABLE[key]"``) references, imported on first use, so that the names
are known without importing torch (the command line reads its choices from these registries and
``robustdeq --help`` stays fast). Each package adds its ``register_*`` function on top:

=========================  ==========================================  ===========================
registry                   entry                                       registered with
=========================  ==========================================  ===========================
:data:`SOLVERS`            a :class:`~robustdeq.deq.solvers.Solver`    ``register_solver``
                           subclass
:data:`ESTIMATORS`         a gradient estimator class                  ``ESTIMATORS.register``
                           (``robustdeq.deq.grad``)
:data:`ATTACK_SPECS`       ``builder(ctx) -> [AttackSpec]``            ``register_attack_spec``
:data:`SUITES`             ``suite(ctx) -> [attack spec name]``        ``register_suite``
:data:`RECIPES`            ``builder(**options) -> Recipe``            ``register_recipe``
:data:`OBJECTIVES`         an :class:`Objective` dataclass             ``register_objective``
:data:`MODELS`             a builder ``fn(**options) -> nn.Module``    ``robustdeq.deq.zoo.register``
:data:`ATTACKS`            an :class:`Attack` class                    ``ATTACKS.register``
:data:`DATASETS`           a :class:`~robustdeq.data.Dataset`          ``data.register_dataset``
:data:`WRAPPERS`           an inference-time defense class (or None)   ``defenses.register_wrapper``
=========================  ==========================================  ===========================

An unknown name is a :class:`~robustdeq.errors.ConfigError` naming the known entries;
registering a name that exists is an error unless ``replace=True``.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Iterator, List, Mapping, Optional

from .errors import ConfigError


class _Ref:
    """A lazy ``"module:attribute"`` reference (a built-in entry not imported yet)."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path

    def load(self) -> Any:
        module, _, attr = self.path.partition(":")
        mod = importlib.import_module(module)
        if not attr:
            return mod
        if attr.endswith("]") and "[" in attr:  # "module:TABLE[key]": an entry of a table
            table, _, key = attr[:-1].partition("[")
            return getattr(mod, table)[key]
        return getattr(mod, attr)

    def __repr__(self) -> str:
        return f"<lazy {self.path}>"


class Registry:
    """An ordered name -> entry mapping with lazy built-ins and clear errors.

    Args:
        kind: what an entry is, for messages ("solver", "suite", ...).
        builtins: name -> entry or ``"module:attribute"`` (imported on first :meth:`get`).
        hint: appended to the unknown-name message (e.g. how to register one).
    """

    def __init__(self, kind: str, builtins: Optional[Mapping[str, Any]] = None, *, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._entries: Dict[str, Any] = {}
        self._builtin = set()
        for name, entry in (builtins or {}).items():
            self._entries[name] = _Ref(entry) if isinstance(entry, str) else entry
            self._builtin.add(name)

    # -- registration ----------------------------------------------------------------------------
    def register(self, name: str, entry: Any = None, *, replace: bool = False, builtin: bool = False):
        """Add ``entry`` under ``name`` (returns it); without ``entry``, a decorator. A name that
        exists (built-in or registered) is a ConfigError unless ``replace=True``. ``builtin``:
        for the package's own entries (they cannot be unregistered)."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise ConfigError(f"a {self.kind} name must be a non-empty string without surrounding "
                              f"spaces, got {name!r}")
        if entry is None:
            def deco(obj):
                self.register(name, obj, replace=replace, builtin=builtin)
                return obj
            return deco
        if name in self._entries and not replace:
            what = "built-in" if name in self._builtin else "registered"
            raise ConfigError(f"{self.kind} {name!r} is already {what}; pass replace=True to replace it")
        self._entries[name] = entry
        if builtin:
            self._builtin.add(name)
        return entry

    def unregister(self, name: str) -> None:
        """Remove a registered entry (a built-in cannot be removed, only replaced)."""
        if name in self._builtin:
            raise ConfigError(f"{self.kind} {name!r} is built-in and cannot be removed")
        self._entries.pop(name, None)

    # -- lookup ----------------------------------------------------------------------------------
    def names(self) -> List[str]:
        """Every name, built-ins first, in registration order."""
        return list(self._entries)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is one of the package's own entries."""
        return name in self._builtin

    def unknown(self, name: Any) -> ConfigError:
        """The error for an unknown ``name`` (names the known entries)."""
        msg = f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}"
        return ConfigError(msg + (f" ({self.hint})" if self.hint else ""))

    def get(self, name: Any) -> Any:
        """The entry called ``name`` (a lazy built-in is imported now); ConfigError if unknown."""
        if not isinstance(name, str) or name not in self._entries:
            raise self.unknown(name)
        entry = self._entries[name]
        if isinstance(entry, _Ref):
            entry = entry.load()
            self._entries[name] = entry
        return entry

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> List[str]:
        """Every name (:meth:`names`)."""
        return self.names()

    def values(self) -> List[Any]:
        """Every entry, in the order of :meth:`names` (lazy built-ins are imported now)."""
        return [self.get(k) for k in self.names()]

    def items(self):
        """``(name, entry)`` pairs in the order of :meth:`names` (lazy built-ins are imported
        now)."""
        return [(k, self.get(k)) for k in self.names()]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _refs(module: str, mapping: Mapping[str, str]) -> Dict[str, str]:
    return {name: f"{module}:{attr}" for name, attr in mapping.items()}


SOLVERS = Registry("solver", _refs("robustdeq.deq.solvers", {
    "fixed_point": "FixedPointIteration", "anderson": "Anderson", "broyden": "Broyden"}),
    hint="robustdeq.deq.solvers.register_solver adds one")

ESTIMATORS = Registry("gradient estimator", _refs("robustdeq.deq.grad", {
    "ift": "ImplicitGrad", "phantom": "PhantomGrad",
    "unrolled": "UnrolledGrad", "full": "FullBackprop", "none": "NoGrad"}),
    hint="robustdeq.registry.ESTIMATORS.register(name, cls) adds one")

# the built-in attack specs of robustdeq.eval.suites (BUILTIN_SPECS) by name; the PGD variants come
# with the cross-entropy and the CW margin loss (<name>-margin)
_PGD_SPECS = ("pgd", "pgd-ift", "pgd-exact", "pgd-unrolled", "pgd-phantom")
ATTACK_SPECS = Registry("attack", {
    name: f"robustdeq.eval.suites:BUILTIN_SPECS[{name}]"
    for name in (*[v for p in _PGD_SPECS for v in (p, f"{p}-margin")], "states", "state-ensemble",
                 "autoattack", "autoattack-plus", "apgd-ce", "apgd-dlr", "apgd-t", "apgd-t3",
                 "apgd-t3x3", "apgd-t3x3-stripes", "apgd-t-stripes", "pyautoattack-apgd-ce", "transfer-unrolled", "square", "square-quick",
                 "pyautoattack-square",
                 "torchattacks-square")},
    hint="also state-<k> for the intermediate state k; robustdeq.eval.register_attack_spec adds one")


def is_attack_spec_name(name: str) -> bool:
    """``name`` names attack specs of a suite: a registered one or ``state-<k>`` (k >= 0)."""
    return isinstance(name, str) and (name in ATTACK_SPECS or (name.startswith("state-") and name[6:].isdigit()))


SUITES = Registry("suite", _refs("robustdeq.eval.suites", {
    "quick": "_suite_quick", "standard": "_suite_standard", "full": "_suite_full"}),
    hint="or pass a list of attacks; robustdeq.eval.register_suite adds one")

RECIPES = Registry("defense", _refs("robustdeq.defenses.recipes", {
    "none": "_none", "pgd-at": "_pgd_at", "pgd-at-random-state": "_pgd_at_random_state",
    "trades": "_trades", "trades-random-state": "_trades_random_state", "jiio-at": "_jiio_at",
    "lyadeq": "_lyadeq", "lyadeq-at": "_lyadeq_at", "gaussian-noise": "_gaussian_noise",
    "ibp": "_ibp", "lipschitz-margin": "_lipschitz_margin"}),
    hint="robustdeq.defenses.recipes.register_recipe adds one")

OBJECTIVES = Registry("objective", {**_refs("robustdeq.defenses.objectives", {
    "ce": "CrossEntropy", "pgd_at": "PGDAT", "trades": "TRADES", "jiio_at": "JIIOAT",
    "gaussian_noise": "GaussianNoise"}),
    **_refs("robustdeq.defenses.certified", {"ibp": "IBPTraining", "lipschitz_margin": "LipschitzMargin"})},
    hint="robustdeq.defenses.objectives.register_objective adds one")

MODELS = Registry("model", {
    **_refs("robustdeq.deq.zoo", {n: n for n in (
        "mlp_deq", "conv_deq", "mdeq", "mdeq_single", "mon_deq", "weight_tied_mlp",
        "weight_tied_conv", "ff_mlp", "ff_cnn", "stem_deq")}),
    "lyadeq": "robustdeq.defenses.lyapunov:lyadeq"},  # the LyaDEQ defense's own builder
    hint="robustdeq.deq.zoo.register adds one")

ATTACKS = Registry("attack", {
    **_refs("robustdeq.attacks.pgd", {"fgsm": "FGSM", "pgd": "PGD"}),
    **_refs("robustdeq.attacks.apgd", {"apgd-ce": "APGD", "apgd-dlr": "APGDDLR", "apgd-t": "APGDT"}),
    "state": "robustdeq.attacks.intermediate:StateAttack",
    "autoattack": "robustdeq.attacks.autoattack:AutoAttack",
    "torchattack": "robustdeq.attacks.bridge:TorchAttack",
    "jiio": "robustdeq.attacks.jiio:JIIO",
    "square": "robustdeq.attacks.square:Square"},
    hint="robustdeq.registry.ATTACKS.register(name, cls) adds one")

DATASETS = Registry("dataset", _refs("robustdeq.data", {
    "digits": "_DIGITS", "mnist": "_MNIST", "mnist5k": "_MNIST5K", "cifar10": "_CIFAR10",
    "synthetic": "_SYNTHETIC"}),
    hint="robustdeq.data.register_dataset adds one")

WRAPPERS = Registry("inference-time defense", {"none": None,
                                                "entropy": "robustdeq.defenses.entropy:EntropyDefense"})


__all__ = ["Registry", "is_attack_spec_name", "SOLVERS", "ESTIMATORS", "ATTACK_SPECS", "SUITES", "RECIPES", "OBJECTIVES", "MODELS",
           "ATTACKS", "DATASETS", "WRAPPERS"]
