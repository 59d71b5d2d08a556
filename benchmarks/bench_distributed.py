"""Wall time with 1 vs N processes under torchrun: the standard evaluation suite and a PGD-AT epoch.

    python benchmarks/bench_distributed.py                      # 1 vs 2 processes, CPU (gloo)
    python benchmarks/bench_distributed.py --procs 1 2 --n-eval 48 --n-train 512
    torchrun --standalone --nproc-per-node 1 benchmarks/bench_distributed.py --worker eval \\
        --device cuda --dir /tmp/bd                              # the 1-GPU NCCL path (gpu.sh)

The launcher trains a small DEQ once (the demo's ``mlp_deq``, hidden 64, 150 phantom-gradient
steps on digits) and saves it; every measurement is one ``torchrun`` run whose ranks each use one
CPU thread. The evaluation is ``evaluate(..., suite="standard")`` (checks included) on ``--n-eval``
test digits, Linf eps 0.1, 20 steps, batch 4 (the batches are what the ranks share out: a
sharded evaluation keeps the single-process batches to give the same report); the time is that of the ``evaluate`` call on rank 0
(process start-up and imports excluded, reported separately as the launcher's wall time). The
sharded report is compared with the 1-process report flag for flag. The PGD-AT epoch is
``Trainer`` with ``PGDAT(eps=0.1, steps=7)`` on ``--n-train`` training digits for an ``mlp_deq``
of hidden width 256, batch 128 (global; each of N ranks takes 128/N).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

logger = logging.getLogger("bench_distributed")
HERE = Path(__file__).resolve()


def _build_model(hidden: int = 64, name: str = "mlp_deq"):
    from robustdeq.deq import zoo
    torch.manual_seed(0)
    return zoo.build(name, hidden=hidden) if name == "mlp_deq" else zoo.build(name)


def prepare(d: Path) -> None:
    """Train the evaluated model once and save it (the ranks load it)."""
    import torch.nn.functional as F
    from robustdeq import gradient
    from robustdeq.checkpoint import save_checkpoint
    from robustdeq.data import load_digits
    path = d / "model.pt"
    if path.is_file():
        return
    model = _build_model()
    x, y = load_digits("train")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradient(model, "phantom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(150):
            idx = torch.randint(0, x.shape[0], (128,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(path, model.eval(), model_config=model.robustdeq_config)


def worker(args) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from robustdeq import distributed as rd
    from robustdeq.data import load_digits
    ctx = rd.init()
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    device = torch.device(args.device)
    result: dict = {"world_size": world, "backend": ctx.backend if ctx else None, "device": str(device)}
    if args.worker == "eval":
        from robustdeq.checkpoint import load_model
        from robustdeq.eval import evaluate
        model, _ = load_model(Path(args.dir) / "model.pt", map_location=device)
        x, y = load_digits("test")
        x, y = x[:args.n_eval].to(device), y[:args.n_eval].to(device)
        rd.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        rep = evaluate(model.eval(), x, y, threat="Linf", eps=0.1, suite="standard", steps=20, seed=0,
                       batch_size=args.batch_size)
        result["seconds"] = time.perf_counter() - t0
        result["timings"] = rep.timings
        result["robust"] = [r.robust for r in rep.results]
        result["robust_accuracy"] = rep.results[0].robust_accuracy
    else:
        from robustdeq.defenses.objectives import PGDAT
        from robustdeq.train import Trainer
        model = _build_model(args.train_hidden, args.train_model).to(device)
        x, y = load_digits("train")
        x, y = x[:args.n_train].to(device), y[:args.n_train].to(device)
        tr = Trainer(model, PGDAT(eps=0.1, steps=7), {"epochs": 1, "batch_size": args.train_batch, "lr": 1e-3},
                     tensorboard=False)
        rd.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        hist = tr.fit(x, y)
        result["seconds"] = time.perf_counter() - t0
        result["epoch_time_s"] = hist[0]["epoch_time_s"]
        result["loss"] = hist[0]["loss"]
    # CPU seconds of the busiest rank: what the wall time would be with a free core per rank
    result["cpu_s_max"] = max(rd.all_gather_object(time.process_time() - c0))
    if rank == 0:
        out = Path(args.dir) / f"{args.worker}_{world}.json"
        out.write_text(json.dumps(result))
        logger.info("%s on %d process(es): %.1f s", args.worker, world, result["seconds"])
    if ctx is not None:
        import torch.distributed as dist
        rd.barrier()  # every rank done with its collectives before the group goes
        dist.destroy_process_group()


_BURN = ("import time, torch; torch.set_num_threads(1); a = torch.randn(256, 256); t = time.perf_counter()\n"
         "for _ in range(3000): a @ a\n"
         "print(time.perf_counter() - t)")


def cpu_capacity(procs: int) -> float:
    """How many times more CPU work ``procs`` concurrent one-thread processes get done than one
    (a control: on an idle machine with >= ``procs`` cores it is ``procs``; on a shared machine it
    is the ceiling of any speed-up measured here)."""
    def run(n):
        ps = [subprocess.Popen([sys.executable, "-c", _BURN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return [float(p.communicate()[0]) for p in ps]
    one = run(1)[0]
    many = run(procs)
    return procs * one / max(many)


def launch(kind: str, procs: int, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           str(HERE), "--worker", kind, "--dir", args.dir, "--n-eval", str(args.n_eval),
           "--n-train", str(args.n_train), "--batch-size", str(args.batch_size), "--device", args.device,
           "--train-hidden", str(args.train_hidden), "--train-model", args.train_model, "--train-batch", str(args.train_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    res = json.loads((Path(args.dir) / f"{kind}_{procs}.json").read_text())
    res["launcher_wall_s"] = wall
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["eval", "train"], help="(internal) run one measurement as a torchrun rank")
    p.add_argument("--dir", default="/tmp/robustdeq_bench_distributed")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n-eval", type=int, default=48)
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4, help="evaluation batch size (the unit of work shared out)")
    p.add_argument("--train-model", default="mlp_deq", help="zoo model of the PGD-AT epoch (default options)")
    p.add_argument("--train-hidden", type=int, default=256, help="hidden width of the PGD-AT model")
    p.add_argument("--train-batch", type=int, default=128, help="PGD-AT global batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=["eval", "train"], default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(1)
    prepare(Path(args.dir))
    rows = []
    capacity = {n: cpu_capacity(n) for n in args.procs if n > 1}
    for n, c in capacity.items():
        logger.info("control: %d concurrent CPU-bound processes do %.2fx the work of one", n, c)
    for kind in ([args.only] if args.only else ["eval", "train"]):
        base = None
        for n in args.procs:
            r = launch(kind, n, args)
            if base is None:
                base = r
            speed = base["seconds"] / r["seconds"]
            same = (r.get("robust") == base.get("robust")) if kind == "eval" else None
            cpu = base["cpu_s_max"] / r["cpu_s_max"]
            rows.append((kind, n, r["seconds"], r["launcher_wall_s"], speed, r["cpu_s_max"], cpu, same,
                         r.get("robust_accuracy", r.get("loss"))))
    print("| measurement | processes | wall (s) | launcher wall (s) | speed-up | CPU s, busiest rank | "
          "speed-up in CPU s | flags = 1 process | value |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, n, s, w, sp, c, cs, same, val in rows:
        what = "standard-suite evaluate" if kind == "eval" else "PGD-AT epoch (fit)"
        print(f"| {what} | {n} | {s:.1f} | {w:.1f} | {sp:.2f}x | {c:.1f} | {cs:.2f}x | "
              f"{'-' if same is None else same} | {val:.4f} |")
    for n, c in capacity.items():
        print(f"\ncontrol (before the runs): {n} concurrent CPU-bound one-thread processes did {c:.2f}x the "
              "work of one: the ceiling of the speed-ups above on this machine at that time")


if __name__ == "__main__":
    main()
