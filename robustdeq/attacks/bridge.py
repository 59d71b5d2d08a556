"""Run any torchattacks attack on a DEQ (or any model) as a robustdeq :class:`Attack`.

``TorchAttack(model, "CW", c=1.0, steps=100)`` builds ``torchattacks.CW`` on the model, or on an
:func:`~robustdeq.deq.views.attack_view` of a DEQ (``view={"state": 4}`` attacks the read-out of
state 4; ``view={"grad": "unrolled"}`` the final state through an unrolled gradient). What the
bridge adds to torchattacks: unknown parameters are errors; the global RNG (which torchattacks
uses for random starts) is seeded from ``seed`` and restored afterwards; the training flag of
every submodule is restored exactly (torchattacks' ``set_model_training_mode(True)`` leaves an
eval model in train mode); the output is projected on the eps ball and [0, 1] (a no-op up to
rounding) and has the input's dtype.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..config import check_radius
from ..errors import ConfigError, reject_unknown
from .autoattack import describe_view, make_view
from .._tensor import project_ball
from .base import Attack, check_norm, global_rng

logger = logging.getLogger(__name__)

#: threat model of torchattacks classes without a ``norm`` parameter
_CLASS_NORM = {"PGDL2": "L2", "PGDRSL2": "L2", "CW": "L2", "DeepFool": "L2", "EADL1": "L1",
               "EADEN": "L1", "SparseFool": "L1", "JSMA": "L0", "OnePixel": "L0", "Pixle": "L0"}
_NOT_MODEL_FIRST = ("MultiAttack",)


def torchattacks_version() -> str:
    """The installed torchattacks' ``__version__`` (imports torchattacks)."""
    import torchattacks
    return getattr(torchattacks, "__version__", "unknown")


def resolve_class(attack: Union[str, type]) -> type:
    """The torchattacks attack class named ``attack`` (or ``attack`` itself when it is one).

    Raises:
        ConfigError: an unknown name (the message lists the available ones), an object that is
            not a torchattacks attack class, or ``MultiAttack`` (use
            :class:`~robustdeq.attacks.WorstCase`).
    """
    import torchattacks
    base = torchattacks.attack.Attack
    if isinstance(attack, str):
        cls = getattr(torchattacks, attack, None)
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            names = sorted(n for n in dir(torchattacks) if inspect.isclass(getattr(torchattacks, n))
                           and issubclass(getattr(torchattacks, n), base) and n != "Attack")
            raise ConfigError(f"unknown torchattacks attack {attack!r}; available: {', '.join(names)}")
    elif inspect.isclass(attack) and issubclass(attack, base):
        cls = attack
    else:
        raise ConfigError(f"attack must be a torchattacks attack class or its name, got {attack!r}")
    if cls.__name__ in _NOT_MODEL_FIRST:
        raise ConfigError(f"torchattacks.{cls.__name__} combines attacks; use robustdeq.attacks.WorstCase")
    return cls


#: torchattacks classes that query the model's outputs only (no input gradient)
GRADIENT_FREE = frozenset({"Square", "OnePixel", "Pixle", "SPSA", "GN", "VANILA"})


class TorchAttack(Attack):
    """A torchattacks attack on ``model`` (or ``attack_view(model, **view)``).

    Args:
        attack: a torchattacks class or its name ("PGD", "FGSM", "CW", "Square", ...).
        view: options of :func:`robustdeq.deq.views.attack_view` or None for the model as is.
        targeted: ``y`` holds target classes (torchattacks' ``set_mode_targeted_by_label``).
        seed: seeds the global RNG during the attack (restored afterwards) and the class's own
            ``seed`` parameter where it has one.
        training_mode: options of torchattacks' ``set_model_training_mode`` (model_training,
            batchnorm_training, dropout_training); the model's flags are restored afterwards.
        **params: the class's own parameters (torchattacks' names: eps, alpha, steps, ...).
    """

    def __init__(self, model: nn.Module, attack: Union[str, type], *,
                 view: Optional[Dict[str, Any]] = None, targeted: bool = False,
                 seed: Optional[int] = None, training_mode: Optional[Dict[str, bool]] = None,
                 **params):
        cls = resolve_class(attack)
        sig = inspect.signature(cls.__init__)
        accepted = [p for p in sig.parameters if p not in ("self", "model")]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(f"unknown parameter(s) for torchattacks.{cls.__name__}: "
                              f"{', '.join(unknown)}; accepted: {', '.join(accepted)}")
        defaults = {k: v.default for k, v in sig.parameters.items()
                    if k in accepted and v.default is not inspect.Parameter.empty}
        eps = params.get("eps", defaults.get("eps"))
        norm = params.get("norm", defaults.get("norm", _CLASS_NORM.get(cls.__name__, "Linf")))
        super().__init__(model, eps=0.0 if eps is None else eps, norm="Linf", targeted=targeted,
                         seed=seed)
        self.eps = None if eps is None else check_radius(eps, "eps")
        self.norm = norm if norm in ("L1", "L0") else check_norm(norm)
        self.cls = cls
        self.params_ = dict(params)
        if seed is not None and "seed" in accepted and "seed" not in params:
            self.params_["seed"] = seed
        self.view = view
        self.target = make_view(model, view)
        self.training_mode = dict(training_mode or {})
        reject_unknown(self.training_mode, ("model_training", "batchnorm_training", "dropout_training"),
                       "training_mode")
        self.implementation = f"torchattacks {torchattacks_version()}"
        try:
            self.atk = cls(self.target, **self.params_)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"torchattacks.{cls.__name__}{self.params_}: {e}") from None
        if targeted:
            try:
                self.atk.set_mode_targeted_by_label(quiet=True)
            except ValueError as e:
                raise ConfigError(f"torchattacks.{cls.__name__} has no targeted mode ({e})") from None
        if self.training_mode:
            self.atk.set_model_training_mode(**self.training_mode)
        steps = params.get("steps", defaults.get("steps"))
        self.name = f"torchattacks.{cls.__name__}" + (f"-{steps}" if steps is not None else "")
        if view is not None and view.get("state") is not None:
            self.name += f" (z_{view['state']})"

    def params(self) -> Dict[str, Any]:
        """The settings reported by :meth:`describe`: the class name, the view, the training
        mode and the class's own parameters (as ``param.<name>``)."""
        shown = {k: v for k, v in self.params_.items()}
        return {"attack": self.cls.__name__, "view": describe_view(self.view),
                "training_mode": self.training_mode, **{f"param.{k}": v for k, v in shown.items()}}

    def guarded_models(self) -> List[nn.Module]:
        """The model and, when it differs, the attack view torchattacks attacks."""
        return [self.model, self.target] if self.target is not self.model else [self.model]

    @property
    def needs_input_gradient(self) -> bool:  # type: ignore[override]
        """Checked before attacking, except for torchattacks' gradient-free attacks and when
        torchattacks runs the model in train mode (``training_mode={"model_training": True}``)."""
        return (self.cls.__name__ not in GRADIENT_FREE
                and not self.training_mode.get("model_training", False))

    def _perturb(self, x, y, gen):
        with global_rng(self.seed, x.device):
            x_adv = self.atk(x, y)
        x_adv = x_adv.detach().to(dtype=x.dtype, device=x.device)
        if self.eps is not None and self.norm in ("Linf", "L2"):
            return project_ball(x_adv, x, self.eps, self.norm)
        return torch.clamp(x_adv, 0, 1)


__all__ = ["TorchAttack", "resolve_class"]
