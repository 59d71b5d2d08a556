"""Spawned ranks for the tests of several processes: each rank gets torchrun's environment (gloo
over 127.0.0.1, one thread), runs a task and hands its result back through a file."""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, task: Callable[..., Any], out: str, kwargs: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        result = task(rank, Path(out), **kwargs)  # the library initialises the group from the env
        torch.save(result, Path(out) / f"result{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(task: Callable[..., Any], out: Path, world: int = 2, **kwargs) -> List[Any]:
    """Run ``task(rank, out, **kwargs)`` (a module-level function: the spawned ranks import it) on
    ``world`` ranks; their results, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world, free_port(), task, str(out), kwargs), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(world)]
