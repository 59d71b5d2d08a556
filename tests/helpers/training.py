"""One small training loop shared by the test modules that need a briefly trained model."""
import contextlib
import warnings

import torch
import torch.nn.functional as F

from robustdeq import gradient


def fit_minibatches(model, x, y, steps, *, lr=1e-2, grad=None, seed=0, batch=128, forward=None):
    """Adam on ``steps`` minibatches drawn with a generator seeded by ``seed``; returns the model in
    eval mode. ``grad``: gradient estimator used while training (None: the model's own);
    ``forward``: ``(model, xb) -> logits`` (default ``model(xb)``). Solver warnings are ignored."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    forward = forward or (lambda m, xb: m(xb))
    model.train()
    ctx = gradient(model, grad) if grad is not None else contextlib.nullcontext()
    with warnings.catch_warnings(), ctx:
        warnings.simplefilter("ignore")
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            loss = F.cross_entropy(forward(model, x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def shrink_demo(monkeypatch, protocol: dict) -> None:
    """Make ``robustdeq demo`` tiny: its trainings at hidden 8 for one epoch, its evaluations
    under ``protocol`` (an ``evaluate`` protocol dict)."""
    from robustdeq import demo, train
    real_train = train.train_model
    monkeypatch.setattr(train, "train_model", lambda name, opts, t, **kw: real_train(
        name, {**opts, "hidden": 8}, {**t, "epochs": 1}, **kw))
    monkeypatch.setattr(demo, "DEMO_EVAL", protocol)
