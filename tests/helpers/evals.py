"""Models shared by the evaluation tests: a plain trained DEQ and models built to trip each check.

Trained models are cached per process (tests/conftest.py serves them as session fixtures).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from robustdeq.data import load_digits
from robustdeq.deq import zoo
from robustdeq.deq.cells import LinearHead, MLPInjection
from robustdeq.deq.model import DEQClassifier

from .training import fit_minibatches


def _train(model, steps, lr=1e-2, grad=None, seed=0):
    x, y = load_digits("train")
    return fit_minibatches(model, x, y, steps, lr=lr, grad=grad, seed=seed)


@functools.lru_cache(maxsize=None)
def trained_deq():
    """mlp_deq (hidden 32, IFT by default), trained with the phantom gradient (fast, stable)."""
    torch.manual_seed(0)
    return _train(zoo.build("mlp_deq", hidden=32), 60, grad="phantom")


@functools.lru_cache(maxsize=None)
def trained_contractive_deq():
    """A plain, well-posed DEQ: spectrally normalised cell (||W|| ~ 0.9), solves converge."""
    torch.manual_seed(0)
    return _train(zoo.build("mlp_deq", hidden=32, norm="spectral", scale=0.9), 60, grad="phantom")


@functools.lru_cache(maxsize=None)
def trained_mlp():
    torch.manual_seed(0)
    return _train(zoo.build("ff_mlp", hidden=32), 80)


# -- models built to trip the checks -------------------------------------------------------------
class Wrapper(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.input_shape = getattr(net, "input_shape", None)


class NoisyModel(Wrapper):
    """Randomised output: Gaussian noise on the logits."""

    def forward(self, x):
        out = self.net(x)
        return out + 0.5 * torch.randn_like(out)


class SoftmaxModel(Wrapper):
    """Returns probabilities instead of logits."""

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


class QuantizedModel(Wrapper):
    """Input quantisation by rounding: zero input gradient everywhere."""

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class ReversedGradModel(Wrapper):
    """Forward is the network; the input gradient is deliberately negated (misleading)."""

    def forward(self, x):
        return self.net(_Reverse.apply(x))


class _Budget(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.owner.calls += 1
        return (g if ctx.owner.calls <= ctx.owner.budget else -g), None


class BudgetModel(Wrapper):
    """Honest input gradients for the first ``budget`` backward passes, negated afterwards: a
    stateful (dynamic) model whose robustness grows with the attacker's effort."""

    def __init__(self, net, budget):
        super().__init__(net)
        self.budget = budget
        self.calls = 0

    def forward(self, x):
        return self.net(_Budget.apply(x, self))


class ScaledIdentityCell(nn.Module):
    """f(z, u) = a z + u: for a = -1.5 the fixed point z* = u / (1 - a) exists (Anderson finds it)
    but plain iteration diverges, so unrolled gradients disagree with the implicit one."""

    def __init__(self, a=-1.5):
        super().__init__()
        self.a = a

    def forward(self, z, u):
        return self.a * z + u

    def init_state(self, u):
        return torch.zeros_like(u)


def unstable_linear_deq(hidden=16):
    torch.manual_seed(0)
    return DEQClassifier(MLPInjection(64, hidden), ScaledIdentityCell(-1.5), LinearHead(hidden, 10),
                         solver={"max_iter": 30, "tol": 1e-6}, input_shape=(1, 8, 8)).eval()


def nonconverging_deq():
    """The trained DEQ's weights with a 2-iteration budget and an unreachable tolerance."""
    m = zoo.build("mlp_deq", hidden=32, solver={"max_iter": 2, "tol": 1e-12})
    m.load_state_dict(trained_deq().state_dict())
    return m.eval()


class MaskedDefense(nn.Module):
    """A toy inference-time defense: the prediction of the DEQ with its gradient masked by input
    quantisation; its adaptive view 'bpda' passes the DEQ's gradient straight through."""

    randomized = False
    dynamic = False
    differentiable = False

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.input_shape = model.input_shape

    def forward(self, x):
        return self.model(torch.round(x * 8) / 8)

    def adaptive_views(self):
        return {"bpda": _BPDA(self)}


class _BPDA(nn.Module):
    def __init__(self, defense):
        super().__init__()
        self.defense = defense
        self.input_shape = defense.input_shape

    def forward(self, x):
        xq = x + (torch.round(x * 8) / 8 - x).detach()
        return self.defense.model(xq)
