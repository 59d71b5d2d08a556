"""Typed configuration of a federated run: :class:`FederatedConfig`.

Every option is checked when the config is built (unknown keys, wrong types and invalid values are
:class:`~robustdeq.errors.ConfigError`\\ s), so a run never starts with a typo in its settings. The
config is plain data (numbers, strings, enums, tuples, dicts of JSON values; :meth:`to_dict` writes
enums as their strings): it travels to the clients as JSON inside Flower's ``ConfigRecord`` and is
stored in every round checkpoint, so that a resumed run can check it continues the same
experiment.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from ..config import Norm, strict_init, coerce_enum, from_dict, to_dict
from ..errors import ConfigError

__all__ = ["FederatedConfig", "Norm", "FUSIONS", "FAULTS", "DEFAULT_MODEL_OPTIONS",
           "parse_partition", "parse_budgets", "client_budget", "config_hash", "resolve_device"]

FUSIONS = ("fedavg", "quality", "tolerance", "accuracy")
FAULTS = ("raise", "nan", "inf", "shape", "hang")
_MLP_MODELS = ("mlp_deq", "lyadeq")  # the architectures DEFAULT_MODEL_OPTIONS are for
DEFAULT_MODEL_OPTIONS: Dict[str, Any] = {"hidden": 64, "mean": 0.3, "std": 0.4, "norm": "spectral",
                                         "scale": 0.9}


def parse_partition(spec: str) -> Tuple[str, Optional[float]]:
    """``"iid"`` -> ``("iid", None)``; ``"dirichlet:0.5"`` -> ``("dirichlet", 0.5)``."""
    if not isinstance(spec, str):
        raise ConfigError(f"partition must be a string, got {type(spec).__name__}")
    if spec == "iid":
        return "iid", None
    if spec.startswith("dirichlet:"):
        try:
            alpha = float(spec.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"partition {spec!r}: the Dirichlet concentration must be a number > 0")
        return "dirichlet", alpha
    raise ConfigError(f"unknown partition {spec!r}; expected 'iid' or 'dirichlet:ALPHA' (ALPHA > 0)")


def parse_budgets(text: str) -> Tuple[int, ...]:
    """``"5,10,30"`` -> ``(5, 10, 30)`` (for the command line)."""
    try:
        out = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        raise ConfigError(f"budgets must be comma-separated integers, got {text!r}") from None
    return out


@strict_init
@dataclass(frozen=True)
class FederatedConfig:
    """Settings of a federated DEQ run (see :mod:`robustdeq.federated`).

    Data and clients:
        clients: number of clients (SuperNodes). partition: ``"iid"`` or ``"dirichlet:ALPHA"``
        (label proportions of every client drawn from Dirichlet(ALPHA); small ALPHA = very
        non-IID). val_fraction: share of each client's shard held out for its local validation.
        min_client_samples: every shard gets at least this many samples (Dirichlet draws are
        repeated until it holds). dataset / data_root: as for ``robustdeq train``.

    Compute heterogeneity:
        budgets: maximum fixed-point iterations of each client's solver, cycled over the clients
        (client k gets ``budgets[k % len(budgets)]``); the budget caps the forward solves and, for
        the implicit gradient, the adjoint solves. solver / tol: the clients' solver and
        tolerance. A SuperNode may override its own budget with the node config keys
        ``max-iter``, ``solver`` and ``tol``.

    Local objective:
        defense: a recipe name of :mod:`robustdeq.defenses.recipes` (``none``, ``pgd-at``,
        ``trades``, ``jiio-at``, ``lyadeq``...). defense_options: its options (``eps``...); a
        ``seed`` there seeds the objective's own draws (attack starts, sampled states) with a
        stream per client and round, derived from that seed, the client and the round
        (:func:`~robustdeq.federated.local.seed_objectives`): rounds draw differently, and a
        resumed run draws as an uninterrupted one. local_epochs, batch_size, lr, optimizer: local
        training of each round (fresh optimizer every round, constant learning rate).

    seed: the data partition, the initial global model, the evaluation's attacks, and each
        client's local training in each round (data order, and the draws of an objective without
        a seed of its own: a seed derived from it, the client and the round).

    Model:
        model: a zoo name; ``None`` (the default) trains the recipe's own architecture if it has
        one (``lyadeq``), else ``mlp_deq``; a model named together with a recipe that imposes
        another architecture is an error. The built config holds the name trained.
        model_options: its options (``None``: the MLP defaults for the MLP architectures).

    device: where the clients train and the server evaluates: ``"cpu"``, ``"cuda"``,
        ``"cuda:K"`` or ``"mps"``; ``None`` (the default): CUDA when present, else the CPU, decided
        by each process that computes. Parameters always travel and are checkpointed as CPU
        tensors. A device missing on this machine is refused when the run starts (before round
        1). The device is not part of :func:`config_hash`: a run may be resumed on another device.

    Server:
        rounds; fusion: ``"fedavg"`` (w_k ~ n_k), ``"quality"`` (w_k ~ n_k q_k, q_k = 1 - the
        client's estimated distance from the equilibrium), ``"tolerance"`` (q_k = sqrt(tol/r_k),
        the earlier rule) or ``"accuracy"`` (q_k = local validation accuracy);
        quality_floor: lower bound of q_k. client_timeout: seconds the server waits for the
        replies of a round; late clients are dropped from that round.

    Evaluation of the global model after every round:
        eval_suite: ``"none"`` (clean accuracy only) or a suite of :func:`robustdeq.eval.evaluate`
        (``quick``: PGD with IFT and unrolled gradients). eval_samples: test samples attacked
        (0: the whole split); eval_eps / eval_steps / eval_threat: the threat model
        (``eval_threat`` accepts ``"Linf"`` / ``"L2"`` or a :class:`~robustdeq.config.Norm` and
        is stored as the enum, which compares equal to its string; JSON and checkpoints hold the
        string).

    faults: ``{client id: kind}`` makes clients misbehave on purpose (``raise``, ``nan``,
        ``inf``, ``shape``, ``hang``), to check the server's fault handling end to end.
    """

    clients: int = 8
    rounds: int = 20
    partition: str = "iid"
    budgets: Tuple[int, ...] = (30,)
    solver: str = "anderson"
    tol: float = 1e-3
    defense: str = "none"
    defense_options: Dict[str, Any] = field(default_factory=dict)
    fusion: str = "fedavg"
    quality_floor: float = 0.05
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 3e-3
    optimizer: str = "adam"
    dataset: str = "digits"
    data_root: Optional[str] = None
    model: Optional[str] = None
    model_options: Optional[Dict[str, Any]] = None
    val_fraction: float = 0.2
    min_client_samples: int = 10
    seed: int = 0
    eval_suite: str = "quick"
    eval_samples: int = 200
    eval_eps: float = 0.1
    eval_steps: int = 10
    eval_threat: Norm = Norm.LINF
    client_timeout: float = 600.0
    faults: Dict[str, str] = field(default_factory=dict)
    device: Optional[str] = None

    def __post_init__(self):
        def bad(msg: str):
            raise ConfigError(f"FederatedConfig.{msg}")

        from ..config import _DEVICE
        if self.device is not None and not (isinstance(self.device, str) and _DEVICE.match(self.device)):
            bad(f"device must be 'cpu', 'cuda', 'cuda:K' or 'mps' (or None: CUDA when present, else "
                f"the CPU), got {self.device!r}")
        if self.model is not None and not isinstance(self.model, str):
            bad(f"model must be a zoo name (or None), got {type(self.model).__name__}")
        if self.clients < 1:
            bad(f"clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            bad(f"rounds must be >= 1, got {self.rounds}")
        parse_partition(self.partition)
        budgets = tuple(self.budgets)
        if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
            bad(f"budgets must be a non-empty list of integers >= 1, got {self.budgets!r}")
        object.__setattr__(self, "budgets", budgets)
        from ..registry import SOLVERS as _solvers, SUITES as _suites  # built-in and registered names
        if self.solver not in _solvers:
            bad(f"solver: unknown solver {self.solver!r}; expected one of {', '.join(_solvers.names())}")
        if not (self.tol > 0 and math.isfinite(self.tol)):
            bad(f"tol must be a finite number > 0, got {self.tol}")
        if self.fusion not in FUSIONS:
            bad(f"fusion: unknown fusion rule {self.fusion!r}; expected one of {', '.join(FUSIONS)}")
        if not 0 < self.quality_floor <= 1:
            bad(f"quality_floor must be in (0, 1], got {self.quality_floor}")
        if self.local_epochs < 1 or self.batch_size < 1:
            bad("local_epochs and batch_size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            bad(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_client_samples < 1:
            bad(f"min_client_samples must be >= 1, got {self.min_client_samples}")
        if self.seed < 0:
            bad(f"seed must be >= 0, got {self.seed}")
        if self.eval_suite != "none" and self.eval_suite not in _suites:
            bad(f"eval_suite: unknown suite {self.eval_suite!r}; expected one of "
                f"{', '.join(['none'] + _suites.names())}")
        if self.eval_samples < 0 or self.eval_steps < 1:
            bad("eval_samples must be >= 0 and eval_steps >= 1")
        if not (self.eval_eps > 0 and math.isfinite(self.eval_eps)):
            bad(f"eval_eps must be a finite number > 0, got {self.eval_eps}")
        object.__setattr__(self, "eval_threat",
                           coerce_enum(Norm, self.eval_threat, "FederatedConfig.eval_threat"))
        if not self.client_timeout > 0:
            bad(f"client_timeout must be > 0 seconds, got {self.client_timeout}")
        if self.model_options is None:  # the MLP defaults, for the MLP architectures only
            from ..defenses.recipes import recipe as _recipe
            from ..registry import RECIPES as _recipes
            trained = self.model or "mlp_deq"
            if self.defense in _recipes and isinstance(self.defense_options, Mapping):
                try:
                    trained = _recipe(self.defense, **dict(self.defense_options)).model or trained
                except ConfigError:
                    pass  # reported below, by the recipe check
            object.__setattr__(self, "model_options",
                               dict(DEFAULT_MODEL_OPTIONS) if trained in _MLP_MODELS else {})
        for name in ("defense_options", "model_options", "faults"):
            if not isinstance(getattr(self, name), Mapping):
                bad(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}")
        faults = {}
        for k, v in self.faults.items():
            try:
                cid = int(k)
            except (TypeError, ValueError):
                bad(f"faults: client id {k!r} is not an integer")
            if not 0 <= cid < self.clients:
                bad(f"faults: client id {cid} outside 0..{self.clients - 1}")
            if v not in FAULTS:
                bad(f"faults: unknown fault {v!r}; expected one of {', '.join(FAULTS)}")
            faults[str(cid)] = v
        object.__setattr__(self, "faults", faults)
        for name in ("in_shape", "num_classes", "solver"):
            if name in self.model_options:
                bad(f"model_options: {name!r} is set by the federated run (dataset / client budget)")
        # the recipe name and its options are checked here, not on the clients
        from ..defenses.recipes import recipe
        rec = recipe(self.defense, **dict(self.defense_options))
        if rec.model is not None and self.model is not None and self.model != rec.model:
            bad(f"defense {self.defense!r} trains its own architecture ({rec.model}), not model "
                f"{self.model!r}: drop the model or choose another defense")
        object.__setattr__(self, "model", rec.model or self.model or "mlp_deq")  # the one trained
        for key in ("eps_warmup", "warmup", "ramp"):
            if self.defense_options.get(key):
                bad(f"defense_options: {key} is not available in federated training (each round's local "
                    "training would restart the radius ramp)")
        from ..config import TrainConfig
        TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                    optimizer=self.optimizer)
        from ..data import dataset_info
        dataset_info(self.dataset)
        try:
            json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as exc:
            bad(f"options must be JSON-serialisable: {exc}")

    # -- conversions ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "FederatedConfig" | None) -> "FederatedConfig":
        """Build from a mapping; unknown keys are a :class:`ConfigError`."""
        if isinstance(data, Mapping) and "budgets" in data and isinstance(data["budgets"], str):
            data = {**data, "budgets": parse_budgets(data["budgets"])}
        return from_dict(cls, data)

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as a JSON-ready dict (:meth:`from_dict` rebuilds it)."""
        out = to_dict(self)
        out["defense_options"] = dict(self.defense_options)
        out["model_options"] = dict(self.model_options)
        out["faults"] = dict(self.faults)
        return out

    def to_json(self) -> str:
        """The configuration as JSON text with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FederatedConfig":
        """The configuration of JSON text written by :meth:`to_json`; a ``ConfigError`` for
        invalid JSON or settings."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"federated config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes) -> "FederatedConfig":
        """A copy with the fields ``changes`` replaced, checked again (an unknown field or a bad
        value is a ``ConfigError``)."""
        return FederatedConfig.from_dict({**self.to_dict(), **changes})

    @property
    def recipe_model(self) -> str:
        """The zoo architecture actually trained (a recipe such as ``lyadeq`` imposes its own)."""
        from ..defenses.recipes import recipe
        rec = recipe(self.defense, **dict(self.defense_options))
        return rec.model or self.model


def resolve_device(device: Optional[str]):
    """The ``torch.device`` a federated process computes on: ``device`` (a
    :attr:`FederatedConfig.device`) if this machine has it, ``None``: CUDA when present, else the
    CPU. A device this machine lacks is a :class:`ConfigError` naming it."""
    import torch
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r}: MPS is not available on this machine (use 'cpu')")
    return dev


def client_budget(cfg: FederatedConfig, client: int) -> int:
    """The solver budget (maximum iterations) of client ``client``."""
    return int(cfg.budgets[client % len(cfg.budgets)])


def config_hash(cfg: FederatedConfig, *,
                ignore: Tuple[str, ...] = ("rounds", "client_timeout", "device")) -> str:
    """Hash of the settings that decide the trajectory of a run (a resumed run must match it);
    ``rounds`` is left out so that a finished run can be extended, ``device`` so that a run can
    be resumed on another machine."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

