"""Small trained models shared by the attack tests (trained once per session, copied per use)."""
from __future__ import annotations

import copy
import functools

import torch

from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.deq.grad import gradient

from .training import fit_minibatches


def _cheap_forward(model, xb):
    """Phantom gradient and 15 solver steps for DEQs (cheap); the model keeps its defaults."""
    if not hasattr(model, "solve"):
        return model(xb)
    with gradient(model, "phantom"):
        return model.run(xb, solver=model.solver_config.replace(max_iter=15)).logits


@functools.lru_cache(maxsize=None)
def _trained(name: str, steps: int, seed: int, options: tuple):
    torch.manual_seed(seed)
    model = zoo.build(name, **dict(options))
    x, y = load_digits("train")
    return fit_minibatches(model, x, y, steps, seed=seed, forward=_cheap_forward)


def trained(name: str = "mlp_deq", steps: int = 60, seed: int = 0, **options):
    """A copy of a model from the zoo trained on digits (>= ~90% test accuracy), in eval mode."""
    return copy.deepcopy(_trained(name, steps, seed, tuple(sorted(options.items()))))


def digits_test(n: int = 64):
    x, y = load_digits("test")
    return x[:n], y[:n]


def check_ball(x, x_adv, eps, norm):
    """x_adv lies in the eps ball of x (up to rounding) and in [0, 1]."""
    d = (x_adv - x).flatten(1)
    tol = 1e-6 if x.dtype == torch.float32 else 1e-12
    if norm == "Linf":
        assert float(d.abs().max()) <= eps + tol
    else:
        assert float(d.norm(dim=1).max()) <= eps * (1 + tol) + tol
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
