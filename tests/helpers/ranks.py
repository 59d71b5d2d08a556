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


#: what the fork server imports once, before it forks the ranks
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "robustdeq", "robustdeq.distributed",
           "robustdeq.train", "robustdeq.cli", "helpers.ranks"]


def spawn(task: Callable[..., Any], out: Path, world: int = 2, start_method: str = "spawn",
          **kwargs) -> List[Any]:
    """Run ``task(rank, out, **kwargs)`` (a module-level function: the spawned ranks import it) on
    ``world`` ranks; their results, in rank order. ``start_method="forkserver"``: the ranks are
    forked from a server process that imported :data:`PRELOAD` once (a fresh interpreter, not a
    copy of this one; torch is imported once instead of once per rank)."""
    out.mkdir(parents=True, exist_ok=True)
    if start_method == "forkserver":
        import multiprocessing
        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    try:
        mp.start_processes(_worker, args=(world, free_port(), task, str(out), kwargs), nprocs=world,
                           join=True, start_method=start_method)
    finally:
        if start_method == "forkserver":  # stop and reap the server (it reaped the ranks), so that
            from multiprocessing import forkserver  # no process outlives the call and its CPU
            forkserver._forkserver._stop()          # time counts as this process's children's
    return [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(world)]


def _run_tasks(rank: int, out: Path, tasks: dict) -> dict:
    """Run the tasks ``{name: "module:function"}`` in turn on this rank (each spawned process
    imports torch: one pair of ranks serves several tests); a task that raises gets the traceback
    text as its result under ``"error"``, so each test fails on its own."""
    import importlib
    import traceback
    results = {}
    for name, where in tasks.items():
        module, fn = where.split(":")
        try:
            results[name] = getattr(importlib.import_module(module), fn)(rank, out)
        except Exception:  # noqa: BLE001 - handed to the test that owns the task
            results[name] = {"error": traceback.format_exc()}
    return results


def spawn_tasks(tasks: dict, out: Path, world: int = 2) -> dict:
    """``{name: [result of rank 0, result of rank 1, ...]}`` for the tasks ``{name:
    "module:function"}`` (``function(rank, out)`` in an importable module), run one after the
    other by the same ``world`` spawned ranks."""
    per_rank = spawn(_run_tasks, out, world, start_method="forkserver", tasks=tasks)
    return {name: [r[name] for r in per_rank] for name in tasks}


def results(found: dict, name: str) -> list:
    """The per-rank results of task ``name`` from :func:`spawn_tasks`; a task that raised on a rank
    fails the calling test with that rank's traceback."""
    for rank, r in enumerate(found[name]):
        if isinstance(r, dict) and set(r) == {"error"}:
            raise AssertionError(f"task {name!r} failed on rank {rank}:\n{r['error']}")
    return found[name]
