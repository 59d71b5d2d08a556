"""Tiny DEQs built and trained with TorchDEQ (the reference library) for the adoption tests."""
from __future__ import annotations

import torch
from torch import nn


def digits(n: int = 200, offset: int = 0):
    """``n`` of scikit-learn's 8x8 digits as (x (n, 1, 8, 8) in [0, 1], y (n,) int64)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images[offset:offset + n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target[offset:offset + n], dtype=torch.int64)


class TorchDEQMLP(nn.Module):
    """z = tanh(W z + U x), logits = head(z): a fully connected DEQ written the TorchDEQ way."""

    def __init__(self, width: int = 32, **deq_options):
        super().__init__()
        from torchdeq import get_deq
        self.inj = nn.Linear(64, width)
        self.W = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, 10)
        with torch.no_grad():
            self.W.weight.mul_(0.4)
        self.deq = get_deq(**{"f_solver": "fixed_point_iter", "f_max_iter": 30, "f_tol": 1e-5,
                              **deq_options})

    def forward(self, x):
        u = self.inj(x.flatten(1))
        z_out, _ = self.deq(lambda z: torch.tanh(self.W(z) + u), torch.zeros_like(u))
        return self.head(z_out[-1])


class TorchDEQConv(nn.Module):
    """A convolutional DEQ cell z = tanh(conv(z) + conv_in(x)), pooled read-out."""

    def __init__(self, ch: int = 8, **deq_options):
        super().__init__()
        from torchdeq import get_deq
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.head = nn.Linear(ch * 4, 10)
        with torch.no_grad():
            self.conv.weight.mul_(0.2)
        self.deq = get_deq(**{"f_solver": "fixed_point_iter", "f_max_iter": 30, "f_tol": 1e-5,
                              **deq_options})

    def forward(self, x):
        u = self.conv_in(x)
        f = lambda z: torch.tanh(self.conv(z) + u)  # noqa: E731
        z_out, _ = self.deq(f, torch.zeros_like(u))
        return self.head(nn.functional.adaptive_avg_pool2d(z_out[-1], 2).flatten(1))


def train_torchdeq(model: nn.Module, x, y, *, epochs: int = 2, lr: float = 1e-2, seed: int = 0):
    """Train with TorchDEQ's own training-mode gradient (Adam, batches of 50); returns model."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i in range(0, x.shape[0], 50):
            loss = nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model
