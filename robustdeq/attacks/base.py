"""The :class:`Attack` base class and what every attack shares.

Contract: ``attack(x, y) -> x_adv`` with torchattacks' call shape; ``x`` is a
batch ``(B, ...)`` of floating-point inputs in [0, 1], ``y`` the ``(B,)`` int64 labels (the target
classes when ``targeted=True``). ``x_adv`` is detached, has the dtype, device and shape of ``x``,
lies in [0, 1] and in the eps ball of ``x`` (Linf or L2). The training flag of every submodule
is saved before the attack and restored exactly afterwards; the model runs in eval mode during
the attack unless ``attack.model_mode`` is set to ``"train"`` or ``"keep"``. Random draws come
from a local ``torch.Generator`` seeded with ``seed`` (never the global RNG), so the same seed
gives bit-identical ``x_adv``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Norm, check_radius, coerce_enum
from ..errors import ConfigError, InputError, NoInputGradientError
from .._tensor import correct, make_generator, margins
from ..deq.protocols import FixedPointModel, TrajectoryModel
from ..guard import preserve_model

logger = logging.getLogger(__name__)



# -- validation -----------------------------------------------------------------------------------
def check_norm(norm: Any, allowed: Sequence[str] = ("Linf", "L2")) -> str:
    """``"Linf"`` or ``"L2"`` (a :class:`Norm` or its value); ``ConfigError`` otherwise."""
    value = coerce_enum(Norm, norm, "norm").value
    if value not in allowed:
        raise ConfigError(f"norm {value!r} is not supported here; expected one of {', '.join(allowed)}")
    return value


def check_number(value: Any, name: str, *, low: float = 0.0, strict: bool = False,
                 allow_none: bool = False) -> Optional[float]:
    """A finite real ``>= low`` (``> low`` when strict) as float; ``ConfigError`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise ConfigError(f"{name} must be finite and {op} {low:g}, got {value!r}")
    return value


def check_int(value: Any, name: str, *, low: int = 0) -> int:
    """An int ``>= low`` (bools refused); ``ConfigError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_seed(seed: Any) -> Optional[int]:
    """A non-negative int seed, or None; ``ConfigError`` otherwise (bools included)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ConfigError(f"seed must be a non-negative int or None, got {seed!r}")
    return int(seed)


def check_inputs(x: Any, model: Optional[nn.Module] = None) -> Tensor:
    """Validate a batch of inputs (floating point, finite, in [0, 1], the model's input shape)."""
    from ..data import validate_inputs
    shape = getattr(model, "input_shape", None) if model is not None else None
    return validate_inputs(x, expected_shape=shape).detach()


NO_INPUT_GRADIENT_FIX = (
    "likely cause: a DEQ library that solves the fixed point without a gradient path to the input "
    "(TorchDEQ does so in eval mode, and evaluations run models in eval mode); fix: "
    "robustdeq.adopt(model) for a TorchDEQ model (implicit input gradients in every mode), or "
    "express the model as robustdeq.DEQClassifier(injection, cell, head) with your own cell "
    "(docs/bring-your-own-model.md)")


def check_input_gradient(model: nn.Module, x: Tensor, *, who: str = "the attack") -> None:
    """Raise :class:`~robustdeq.errors.NoInputGradientError` when the logits of ``model`` on the
    first sample of ``x`` have no autograd path to the input (in the model's current mode).

    One forward and one backward pass on one sample; the gradient's values are not judged (a
    zero gradient is a property of the model that the evaluation checks look at), only its
    existence. A model whose output is not a tensor (a tuple, a dict) is a
    :class:`~robustdeq.errors.ConfigError`."""
    x1 = x[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x1)
        if not isinstance(logits, Tensor):
            raise ConfigError(
                f"{who}: {type(model).__name__}.forward returns {type(logits).__name__}, not a logits "
                "tensor; attacks and evaluations need a model whose forward(x) returns the logits "
                "(B, num_classes): wrap it in a module whose forward returns the logits part of the "
                "output")
        g = (torch.autograd.grad(logits.float().sum(), x1, allow_unused=True)[0]
             if logits.requires_grad else None)
    if g is None:
        raise NoInputGradientError(
            f"{who}: the logits of {type(model).__name__} do not depend on the input under autograd "
            f"(no gradient path from x to the output in {'train' if model.training else 'eval'} "
            f"mode), so gradient-based attacks cannot run; {NO_INPUT_GRADIENT_FIX}")


def check_labels(y: Any, x: Tensor, *, name: str = "y") -> Tensor:
    """``y`` must be an int64 tensor of shape ``(B,)`` with non-negative entries; returned on
    the device of ``x``."""
    if not isinstance(y, Tensor):
        raise InputError(f"{name} must be a torch.Tensor of int64 labels, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise InputError(f"{name} must have dtype torch.int64 (class indices), got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"{name} has shape {tuple(y.shape)}, expected ({x.shape[0]},) to match the "
                         f"batch of x {tuple(x.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"{name} has negative class indices (min {int(y.min())})")
    return y.detach().to(x.device)


def check_num_classes(y: Tensor, logits: Tensor, name: str = "y") -> None:
    """``logits`` are (B, num_classes) and every label of ``y`` indexes one of them (none is
    negative, none is num_classes or more)."""
    if logits.dim() != 2:
        raise ConfigError(f"the model outputs logits of shape {tuple(logits.shape)}; attacks and "
                          "evaluations need (B, num_classes) (a binary classifier with one logit s: "
                          "return torch.stack([-s, s], 1) / 2)")
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"{name} has negative class indices (min {int(y.min())})")
    if y.numel() and int(y.max()) >= logits.shape[-1]:
        raise InputError(f"{name} has class index {int(y.max())} but the model outputs "
                         f"{logits.shape[-1]} logits")


# -- model modes ----------------------------------------------------------------------------------
def model_mode(models: nn.Module | Iterable[nn.Module], mode: str = "eval", *,
               values: bool = True) -> contextlib.AbstractContextManager:
    """Put ``models`` in ``mode`` ("eval", "train" or "keep") and leave them exactly as they were
    on exit: every submodule's training flag (a mix of train and eval submodules survives), every
    ``requires_grad`` flag and, with ``values=True``, every parameter and buffer value
    (:func:`robustdeq.guard.preserve_model`)."""
    return preserve_model(models, mode, values=values, who="an attack")


# -- randomness -----------------------------------------------------------------------------------
# make_generator, rand_like, randn_like, random_in_ball, margins, project_ball: robustdeq._tensor


@contextlib.contextmanager
def global_rng(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Seed the *global* RNG for third-party code that only uses it (torchattacks,
    pyautoattack), and restore its state on exit so that the caller's stream is untouched."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        if seed is None:
            torch.seed()
        else:
            torch.manual_seed(int(seed))
        yield


# -- losses ---------------------------------------------------------------------------------------
def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy (torchattacks' ``nn.CrossEntropyLoss()``)."""
    return F.cross_entropy(logits, y)


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean difference-of-logits-ratio loss of Croce & Hein (2020):
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``; needs >= 3 classes."""
    if logits.shape[-1] < 3:
        raise ConfigError(f"the DLR loss needs at least 3 classes, the model outputs {logits.shape[-1]}")
    srt, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    z_other = others.max(dim=1)[0]
    return (-(z_y - z_other) / (srt[:, -1] - srt[:, -3] + 1e-12)).mean()


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean Carlini-Wagner margin loss ``max_{i != y} z_i - z_y`` (Carlini & Wagner 2017): unlike
    cross-entropy it does not saturate on confidently classified samples."""
    return (-margins(logits, y)).mean()


LOSSES = {"ce": cross_entropy, "dlr": dlr_loss, "margin": margin_loss}


def get_loss(name: str):
    """The loss ``(logits, y) -> scalar`` named ``name`` in :data:`LOSSES` ("ce", "dlr",
    "margin"); ``ConfigError`` for an unknown name."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name]



# -- prediction helpers ---------------------------------------------------------------------------
def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Labels ``argmax model(x)`` (B,), without gradient, in eval mode (modes restored)."""
    batch_size = check_int(batch_size, "batch_size", low=1)
    out = []
    with model_mode(model, "eval", values=False), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i:i + batch_size]).argmax(dim=1))
    if not out:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    return torch.cat(out)


def logits_of(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """``model(x)`` without gradient, in eval mode, by batches (modes restored)."""
    out = []
    with model_mode(model, "eval", values=False), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i:i + batch_size]))
    return torch.cat(out)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction of ``x`` classified as ``y`` (no grad, eval mode, modes restored): the true
    class's logit strictly above every other (a tie is wrong, the evaluation's rule,
    :func:`robustdeq._tensor.correct`)."""
    if x.shape[0] == 0:
        raise InputError("accuracy of an empty batch is undefined")
    y = check_labels(y, x)
    return float(correct_flags(model, x, y, batch_size).float().mean())


def correct_flags(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """(B,) bool: ``model`` classifies each row of ``x`` as ``y`` by the one untargeted rule (the
    true class's logit strictly above every other; :func:`robustdeq._tensor.correct`), without
    gradient, in eval mode (modes restored)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    logits = logits_of(model, x, check_int(batch_size, "batch_size", low=1))
    check_num_classes(y, logits)   # a label outside the classes: an InputError naming it
    return correct(logits, y)


# -- gradient estimator names ---------------------------------------------------------------------
_EST_NAMES = {"ImplicitGrad": "ift", "PhantomGrad": "phantom", "UnrolledGrad": "unrolled",
              "FullBackprop": "full", "NoGrad": "none"}


def estimator_name(est) -> str:
    """The short name of a gradient estimator (``ift``, ``phantom``, ``unrolled``, ``full``,
    ``none``; the class name for another one), ``"default"`` for None."""
    if est is None:
        return "default"
    return _EST_NAMES.get(type(est).__name__, type(est).__name__)


def is_deq(model: nn.Module) -> bool:
    """A model with a fixed-point solve (:class:`robustdeq.deq.protocols.FixedPointModel`):
    warm starts apply."""
    return isinstance(model, FixedPointModel)


def has_trajectory(model: nn.Module) -> bool:
    """A DEQ or a weight-tied model (:class:`robustdeq.deq.protocols.TrajectoryModel`):
    ``run(x, record=...)`` and ``readout(z)``."""
    return isinstance(model, TrajectoryModel)


# -- the base class -------------------------------------------------------------------------------
class Attack:
    """Base class: ``attack(x, y) -> x_adv``.

    Subclasses implement :meth:`_perturb` ``(x, y, gen) -> x_adv`` on validated inputs, inside the
    mode guard, and :meth:`params` (their settings for :meth:`describe`).
    """

    name: str = "Attack"
    implementation: str = "robustdeq"
    #: norms the attack supports
    norms: Sequence[str] = ("Linf", "L2")
    supports_targeted: bool = True
    #: the attack follows input gradients: ``__call__`` first checks that the model has them
    #: (:func:`check_input_gradient`); gradient-free attacks set it to False
    needs_input_gradient: bool = True

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", targeted: bool = False,
                 seed: Optional[int] = None):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module mapping x -> logits, got "
                              f"{type(model).__name__}")
        self.model = model
        self.eps = check_radius(eps, "eps")
        self.norm = check_norm(norm, self.norms)
        if not isinstance(targeted, bool):
            raise ConfigError(f"targeted must be a bool, got {targeted!r}")
        if targeted and not self.supports_targeted:
            raise ConfigError(f"{type(self).__name__} has no targeted mode")
        self.targeted = targeted
        self.seed = check_seed(seed)
        self.model_mode = "eval"
        self.last_stats: Dict[str, Any] = {}

    # -- to override ------------------------------------------------------------------------------
    def _perturb(self, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def params(self) -> Dict[str, Any]:
        """The attack's own settings, merged into :meth:`describe` (none here; subclasses
        override)."""
        return {}

    def guarded_models(self) -> List[nn.Module]:
        """Models whose training flags the attack saves and restores."""
        return [self.model]

    def gradient_probe(self) -> nn.Module:
        """The module whose input gradient the attack follows (checked before attacking)."""
        return getattr(self, "target", self.model)

    # -- public -----------------------------------------------------------------------------------
    def loss_fn(self, base):
        """``base`` (a loss ``(logits, y) -> scalar`` to increase), negated in targeted mode."""
        if self.targeted:
            return lambda logits, y: -base(logits, y)
        return base

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        x = check_inputs(x, self.model)
        y = check_labels(y, x)
        if x.shape[0] == 0:
            return x.clone()
        gen = make_generator(self.seed)
        with model_mode(self.guarded_models(), self.model_mode):
            if self.needs_input_gradient:
                check_input_gradient(self.gradient_probe(), x, who=self.name)
            x_adv = self._perturb(x, y, gen)
        x_adv = x_adv.detach()
        if x_adv.shape != x.shape:
            raise RuntimeError(f"{self.name} returned shape {tuple(x_adv.shape)} for {tuple(x.shape)}")
        return x_adv.to(dtype=x.dtype, device=x.device)

    def describe(self) -> Dict[str, Any]:
        """Provenance: name, implementation, threat model and every setting."""
        d = {"name": self.name, "implementation": self.implementation, "eps": self.eps,
             "norm": self.norm, "targeted": self.targeted, "seed": self.seed,
             "model_mode": self.model_mode}
        d.update(self.params())
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, eps={self.eps:g}, norm={self.norm})"


__all__ = [
    "Attack", "check_norm", "check_number", "check_int", "check_seed", "check_inputs",
    "check_labels", "check_input_gradient", "check_num_classes", "model_mode",
    "global_rng", "cross_entropy", "dlr_loss", "get_loss", "predict",
    "logits_of", "accuracy", "estimator_name", "is_deq", "has_trajectory", "LOSSES",
]
