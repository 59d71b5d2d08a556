"""Small trained models shared by the attack tests (trained once per session, copied per use)."""
from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F

from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.deq.grad import gradient


@contextlib.contextmanager
def one_thread():
    """Tiny models run much faster on one thread (and do not fight over the shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _trained(name: str, steps: int, seed: int, options: tuple):
    with one_thread():
        torch.manual_seed(seed)
        model = zoo.build(name, **dict(options))
        x, y = load_digits("train")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(seed)
        is_deq = hasattr(model, "solve")
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (128,), generator=g)
            if is_deq:  # phantom gradient and 15 solver steps: cheap; the model keeps its defaults
                with gradient(model, "phantom"):
                    logits = model.run(x[idx], solver=model.solver_config.replace(max_iter=15)).logits
            else:
                logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    return model


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
