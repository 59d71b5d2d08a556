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
of hidden width 256 (``--train-model conv_deq``: the zoo's conv DEQ), batch 128 (global; each of N
ranks takes 128/N), for ``--train-epochs`` epochs: the first includes one-off start-up costs, the
steady-state figure is the mean of the later epochs. The training worker also counts the
collectives (calls and bytes) of ``fit``, per step.

The machine may be shared: ``--repeats R`` runs every measurement R times, interleaving the
process counts (1, 2, 2, 1, ...), records the load average before each run and repeats the CPU
control each round; the table gives the median over the repeats and the speed-up of the medians
(also of the best runs).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
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
        tr = Trainer(model, PGDAT(eps=0.1, steps=7),
                     {"epochs": args.train_epochs, "batch_size": args.train_batch, "lr": 1e-3}, tensorboard=False)
        rd.barrier()
        counts = _count_collectives()
        t0, c0 = time.perf_counter(), time.process_time()
        hist = tr.fit(x, y)
        result["seconds"] = time.perf_counter() - t0
        _count_collectives(stop=True)
        steps = args.train_epochs * -(-args.n_train // args.train_batch)
        result["collectives"] = {k: {"calls": v[0], "bytes": v[1], "calls_per_step": v[0] / steps}
                                 for k, v in counts.items()}
        result["steps"] = steps
        result["epoch_times_s"] = [h["epoch_time_s"] for h in hist]
        later = result["epoch_times_s"][1:] or result["epoch_times_s"]
        result["epoch_time_s"] = sum(later) / len(later)  # steady state: the epochs after the first
        result["loss"] = hist[-1]["loss"]
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


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list",
                "barrier", "reduce", "gather", "scatter", "all_to_all")
_saved: dict = {}


def _count_collectives(stop: bool = False) -> dict:
    """Count the torch.distributed calls (and tensor bytes) made through the public API until
    called again with ``stop=True``; returns the live ``{name: [calls, bytes]}``."""
    import torch.distributed as dist
    if stop:
        for name, fn in _saved.items():
            setattr(dist, name, fn)
        _saved.clear()
        return {}
    counts: dict = {}

    def wrap(name, fn):
        def counted(*a, **k):
            c = counts.setdefault(name, [0, 0])
            c[0] += 1
            t = a[0] if a and isinstance(a[0], torch.Tensor) else None
            c[1] += t.numel() * t.element_size() if t is not None else 0
            return fn(*a, **k)
        return counted
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            _saved[name] = getattr(dist, name)
            setattr(dist, name, wrap(name, _saved[name]))
    return counts


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


def step_scaling(args, procs, repeats: int = 3, steps: int = 2) -> dict:
    """A control for the PGD-AT figure, in this process (one thread, no process group): CPU
    seconds of one training step (objective + backward) on the global batch and on a 1/procs
    slice of it, interleaved, minimum over ``repeats``. Their ratio is the speed-up ``procs``
    processes can reach at most when a step costs nothing but the objective (a step's fixed costs,
    such as the per-iteration dispatch of the solver's small tensor operations, do not split)."""
    from robustdeq.data import load_digits
    from robustdeq.defenses.objectives import PGDAT
    model = _build_model(args.train_hidden, args.train_model)
    obj = PGDAT(eps=0.1, steps=7)
    x, y = load_digits("train")
    sizes = [args.train_batch, -(-args.train_batch // procs)]
    best = {b: float("inf") for b in sizes}

    def step(b, i):
        lo = (i * b) % max(1, x.shape[0] - b)
        loss, _ = obj(model, x[lo:lo + b], y[lo:lo + b])
        loss.backward()
        model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in sizes:  # warm-up
            step(b, 0)
        for _ in range(repeats):
            for b in sizes:
                c = time.process_time()
                for i in range(steps):
                    step(b, i + 1)
                best[b] = min(best[b], (time.process_time() - c) / steps)
    return {"batch": sizes[0], "slice": sizes[1], "step_s": best[sizes[0]], "slice_step_s": best[sizes[1]],
            "ceiling": best[sizes[0]] / best[sizes[1]]}


def launch(kind: str, procs: int, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           str(HERE), "--worker", kind, "--dir", args.dir, "--n-eval", str(args.n_eval),
           "--n-train", str(args.n_train), "--batch-size", str(args.batch_size), "--device", args.device,
           "--train-hidden", str(args.train_hidden), "--train-model", args.train_model,
           "--train-batch", str(args.train_batch), "--train-epochs", str(args.train_epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    res = json.loads((Path(args.dir) / f"{kind}_{procs}.json").read_text())
    res["launcher_wall_s"] = wall
    res["load_before"] = load
    logger.info("%s on %d process(es): %.2f s, epochs %s (load average %.1f before)", kind, procs, res["seconds"],
                res.get("epoch_times_s", "-"), load)
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
    p.add_argument("--train-epochs", type=int, default=2,
                   help="PGD-AT epochs (the figure: the mean epoch time after the first)")
    p.add_argument("--repeats", type=int, default=1, help="run each measurement this many times, interleaved")
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
    kinds = [args.only] if args.only else ["eval", "train"]
    runs: dict = {(k, n): [] for k in kinds for n in args.procs}
    controls: dict = {n: [] for n in args.procs if n > 1}
    scaling = {}
    if "train" in kinds:
        for n in controls:
            scaling[n] = step_scaling(args, n)
            logger.info("control: a PGD-AT step at batch %d costs %.3f CPU s, at %d %.3f: at most %.2fx with %d "
                        "processes", scaling[n]["batch"], scaling[n]["step_s"], scaling[n]["slice"],
                        scaling[n]["slice_step_s"], scaling[n]["ceiling"], n)
    for rep in range(args.repeats):
        for n in controls:
            controls[n].append(cpu_capacity(n))
            logger.info("control: %d concurrent CPU-bound processes do %.2fx the work of one (load %.1f)",
                        n, controls[n][-1], os.getloadavg()[0])
        for kind in kinds:
            order = args.procs if rep % 2 == 0 else list(reversed(args.procs))  # interleaved
            for n in order:
                runs[(kind, n)].append(launch(kind, n, args))
    med = statistics.median
    print(f"{args.repeats} repeat(s), process counts interleaved; medians (minima in brackets)\n")
    print("| measurement | processes | time (s) | speed-up (of medians) | speed-up (of minima) | CPU s, busiest "
          "rank | speed-up in CPU s | load average before | flags = 1 process | value |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        key = "seconds" if kind == "eval" else "epoch_time_s"
        base = runs[(kind, args.procs[0])]
        b_med, b_min = med(r[key] for r in base), min(r[key] for r in base)
        b_cpu = med(r["cpu_s_max"] for r in base)
        for n in args.procs:
            rs = runs[(kind, n)]
            t = [r[key] for r in rs]
            cpu = med(r["cpu_s_max"] for r in rs)
            same = all(r.get("robust") == base[0].get("robust") for r in rs) if kind == "eval" else None
            what = "standard-suite evaluate" if kind == "eval" else "PGD-AT epoch (steady state)"
            val = med(r.get("robust_accuracy", r.get("loss")) for r in rs)
            loads = ", ".join(f"{r['load_before']:.1f}" for r in rs)
            print(f"| {what} | {n} | {med(t):.2f} ({min(t):.2f}) | {b_med / med(t):.2f}x | {b_min / min(t):.2f}x | "
                  f"{cpu:.1f} | {b_cpu / cpu:.2f}x | {loads} | {'-' if same is None else same} | {val:.4f} |")
        if kind == "train":
            for n in args.procs:
                r = runs[(kind, n)][0]
                per = ", ".join(f"{k} {v['calls_per_step']:.2f}/step ({v['bytes'] / max(1, v['calls']):.0f} B each)"
                                for k, v in sorted(r["collectives"].items()))
                print(f"\ncollectives of fit on {n} process(es), {r['steps']} steps, per rank: {per or 'none'}; "
                      f"epoch times {', '.join(f'{e:.2f}' for e in r['epoch_times_s'])} s")
    for n, sc in scaling.items():
        print(f"\ncontrol (one process, one thread, min of 3): a PGD-AT step costs {sc['step_s']:.3f} CPU s at batch "
              f"{sc['batch']} and {sc['slice_step_s']:.3f} at {sc['slice']}: {sc['ceiling']:.2f}x, the most {n} "
              "processes can gain on this model and batch however cheap the communication")
    for n, c in controls.items():
        print(f"\ncontrol: {n} concurrent CPU-bound one-thread processes did {', '.join(f'{v:.2f}' for v in c)}x "
              "the work of one (one value per repeat): the ceiling of the wall-clock speed-ups at that time")


if __name__ == "__main__":
    main()
