"""Ranks launched with different options fail at once, naming the option, before any work
(instead of deadlocking in a collective or writing a report that mixes settings)."""
from __future__ import annotations

from pathlib import Path

import torch

from robustdeq.errors import ConfigError

from helpers import ranks


def _task(rank: int, out: Path) -> dict:
    from robustdeq.certify.smoothing import certify
    from robustdeq.deq import zoo
    from robustdeq.train import Trainer
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=8, solver={"max_iter": 4})
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    found = {}
    try:  # --batch-size 8 on rank 0, 4 on rank 1: deadlocked in the gradient all-reduce before
        Trainer(model, None, {"epochs": 1, "batch_size": 8 if rank == 0 else 4}, tensorboard=False).fit(x, y)
    except ConfigError as e:
        found["train"] = str(e)
    try:  # different noise samples: a certificate whose header says n=8 for inputs estimated with 16
        certify(model, x[:2], sigma=0.25, n0=4, n=8 if rank == 0 else 16)
    except ConfigError as e:
        found["certify"] = str(e)
    # one rank 'eval', the other 'certify' (a raw TypeError in a later collective before)
    import contextlib
    import io
    from robustdeq.checkpoint import save_checkpoint
    from robustdeq.cli import main
    ck = save_checkpoint(Path(out) / f"m{rank}.pt", model, model_config=model.robustdeq_config)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["eval" if rank == 0 else "certify", str(ck), "-n", "4"])
    found["cli"] = (rc, err.getvalue())
    return found


def test_ranks_with_different_options_fail_naming_the_option(two_rank_smoke):
    for found in ranks.results(two_rank_smoke, "agreement"):
        assert "batch_size differs (rank 0: 8, rank 1: 4)" in found["train"], found
        assert "n differs (rank 0: 8, rank 1: 16)" in found["certify"], found
        rc, err = found["cli"]
        assert rc == 2 and err.startswith('robustdeq: error: the processes run robustdeq with different '
                                          'settings: command differs (rank 0: "eval", rank 1: "certify")'), err
