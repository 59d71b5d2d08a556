"""Backbone benchmark (issue 2): printed side by side in one run.

1. robustdeq Anderson vs torchdeq Anderson: same cell, same batch, same tolerance (relative 1e-3
   per sample for us; torchdeq stops when the batch maximum is below tol), same memory m=5 and
   lambda 1e-4: wall time and iterations to the tolerance. Target: robustdeq <= 0.8x torchdeq.
2. IFT backward vs full backpropagation through 30 Anderson iterations: peak memory (the rise of
   the process's peak RSS, measured in a fresh subprocess per variant) and time of forward +
   backward. Target: IFT <= 0.25x the memory.

Usage: python benchmarks/bench_backbone.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.simplefilter("ignore")

from robustdeq.config import SolverConfig  # noqa: E402
from robustdeq.deq import zoo  # noqa: E402
from robustdeq.deq.solvers import get_solver  # noqa: E402


def make_model(hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    # an untrained tanh cell with ||W|| = 0.9: a slow-ish contraction, like a trained DEQ
    return zoo.build("mlp_deq", hidden=hidden, init_gain=0.9, solver={"max_iter": 100})


def bench_solvers(repeats: int, batch: int, hidden: int, tol: float, device: str = "cpu"):
    from torchdeq.solver.anderson import anderson_solver
    model = make_model(hidden).to(device)
    x = torch.rand(batch, 1, 8, 8).to(device)
    with torch.no_grad():
        u = model.inject(x)
        f = lambda z: model.cell(z, u)
        z0 = torch.zeros(batch, hidden, device=device)
        ours = get_solver(SolverConfig(name="anderson", m=5, lam=1e-4, max_iter=100, tol=tol, stop_mode="rel"))

        def run_ours():
            return ours.solve(f, z0)

        def run_ref():
            return anderson_solver(f, z0, max_iter=100, tol=tol, stop_mode="rel", m=5, lam=1e-4)

        for _ in range(3):
            run_ours(); run_ref()
        t_ours, t_ref = [], []
        for _ in range(repeats):  # interleaved so that machine load affects both alike
            t = time.perf_counter(); r_ours = run_ours(); t_ours.append(time.perf_counter() - t)
            t = time.perf_counter(); r_ref = run_ref(); t_ref.append(time.perf_counter() - t)
        z_ref, _, info = r_ref
        rel_ref = ((f(z_ref) - z_ref).norm(dim=1) / (f(z_ref).norm(dim=1) + 1e-9))
        rel_ours = ((f(r_ours.z) - r_ours.z).norm(dim=1) / (f(r_ours.z).norm(dim=1) + 1e-9))
        nstep_ref = int(info["nstep"].max())
    return {
        "ours_time_ms": 1e3 * statistics.median(t_ours), "ref_time_ms": 1e3 * statistics.median(t_ref),
        "ours_iters_max": int(r_ours.steps.max()), "ours_iters_mean": float(r_ours.steps.float().mean()),
        "ours_nfe": r_ours.nfe, "ref_iters": nstep_ref,
        "ours_max_rel_residual": float(rel_ours.max()), "ref_max_rel_residual": float(rel_ref.max()),
    }


def _memory_child(mode: str, batch: int, hidden: int) -> None:
    """Run in a subprocess: one forward+backward, print the peak-RSS rise and the time."""
    from robustdeq import FullBackprop, ImplicitGrad, gradient
    torch.set_num_threads(1)
    model = make_model(hidden).double()
    model.solver_config = SolverConfig(name="anderson", max_iter=30, tol=0.0)   # exactly 30 iterations
    x = torch.rand(batch, 1, 8, 8, dtype=torch.float64)
    est = FullBackprop() if mode == "full" else ImplicitGrad(SolverConfig(max_iter=30, tol=1e-6))
    with gradient(model, est):  # warm-up at a small batch (allocator, lazy init)
        model(x[:2]).sum().backward()
    model.zero_grad()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with gradient(model, est):
        model(x).pow(2).sum().backward()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_rise_mb": (peak - base) / 1024.0, "time_s": dt}))


def bench_memory(batch: int, hidden: int, repeats: int = 3):
    out = {}
    for mode in ("ift", "full"):
        runs = []
        for _ in range(repeats):
            res = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(batch),
                                  "--hidden", str(hidden)], capture_output=True, text=True, check=True)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        out[mode] = {"rss_rise_mb": statistics.median(r["rss_rise_mb"] for r in runs),
                     "time_s": statistics.median(r["time_s"] for r in runs)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--child", default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="device of the solver comparison (the memory "
                   "comparison measures process RSS and always runs on the CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _memory_child(args.child, args.batch, args.hidden)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("\n## Anderson: robustdeq vs torchdeq (same cell, batch 256, hidden 256, rel tol 1e-3, m=5)")
    s = bench_solvers(args.repeats, 256, 256, 1e-3, args.device)
    print("| solver | median time (ms) | iterations | max rel. residual |")
    print("|---|---|---|---|")
    print(f"| robustdeq Anderson | {s['ours_time_ms']:.2f} | {s['ours_iters_max']} (max), "
          f"{s['ours_iters_mean']:.1f} (mean per sample) | {s['ours_max_rel_residual']:.2e} |")
    print(f"| torchdeq Anderson | {s['ref_time_ms']:.2f} | {s['ref_iters']} | {s['ref_max_rel_residual']:.2e} |")
    print(f"time ratio robustdeq / torchdeq = {s['ours_time_ms'] / s['ref_time_ms']:.2f} (target <= 0.8)")

    print(f"\n## IFT backward vs full backpropagation through 30 Anderson iterations "
          f"(batch {args.batch}, hidden {args.hidden}, float64)")
    m = bench_memory(args.batch, args.hidden)
    print("| gradient | peak memory rise (MB) | forward+backward time (s) |")
    print("|---|---|---|")
    for k, name in (("ift", "IFT (implicit)"), ("full", "full backprop")):
        print(f"| {name} | {m[k]['rss_rise_mb']:.1f} | {m[k]['time_s']:.3f} |")
    print(f"memory ratio IFT / full = {m['ift']['rss_rise_mb'] / max(m['full']['rss_rise_mb'], 1e-9):.3f} (target <= 0.25); "
          f"time ratio = {m['ift']['time_s'] / m['full']['time_s']:.2f}")


if __name__ == "__main__":
    main()
