"""Ranks launched with different options fail at once, naming the option, before any work
(instead of deadlocking in a collective or writing a report that mixes settings)."""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robustdeq.errors import ConfigError


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _task(rank: int, out: str) -> dict:
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


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        torch.save(_task(rank, out), Path(out) / f"result{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ranks_with_different_options_fail_naming_the_option(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for r in range(2):
        found = torch.load(tmp_path / f"result{r}.pt", weights_only=False)
        assert "batch_size differs (rank 0: 8, rank 1: 4)" in found["train"], found
        assert "n differs (rank 0: 8, rank 1: 16)" in found["certify"], found
        rc, err = found["cli"]
        assert rc == 2 and err.startswith('robustdeq: error: the processes run robustdeq with different '
                                          'settings: command differs (rank 0: "eval", rank 1: "certify")'), err
