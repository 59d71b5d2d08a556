"""Backbone benchmark: printed side by side in one run.

1. robustdeq Anderson vs torchdeq Anderson: same cell, same batch, same tolerance (relative 1e-3
   per sample for us; torchdeq stops when the batch maximum is below tol), same memory m=5 and
   lambda 1e-4: wall time and iterations to the tolerance. Target: robustdeq <= 0.8x torchdeq.
2. Anderson's per-iteration cost on small batches (the attacks' shrinking batches): the current
   ``Anderson`` vs the previous implementation kept here as a reference (``AndersonBefore``),
   interleaved, same cell (mlp_deq, hidden 64), 30 iterations without early stop; also the time
   of the 30 evaluations of the cell alone and the largest difference between the two solutions.
3. IFT backward vs full backpropagation through 30 Anderson iterations: peak memory (the rise of
   the process's peak RSS, measured in a fresh subprocess per variant) and time of forward +
   backward. Target: IFT <= 0.25x the memory.

Usage: python benchmarks/bench_backbone.py [--repeats 20] [--only overhead]
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
from robustdeq.deq.solvers import Anderson, get_solver  # noqa: E402
from torch import Tensor  # noqa: E402


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


class AndersonBefore(Anderson):
    """The previous ``Anderson.propose`` (per-step safeguard bookkeeping on every sample), kept
    as the reference of the small-batch overhead comparison."""

    def _failed(self, gn2: Tensor, mem: dict) -> Tensor:
        """(B,) bool: the extrapolated iterate's squared residual ``gn2`` exceeds ``safeguard**2``
        times the smallest one so far (growth after a plain step is the map's own: not blamed)."""
        return (gn2 > (self.config.safeguard ** 2) * mem["ref"]) & mem["mixed"]

    def _ref(self, gn2: Tensor, mem: dict) -> Tensor:
        return torch.minimum(gn2, mem["ref"])

    def residual_buffer(self, state, z):
        mem = state.memory
        G = mem.get("G")
        if G is None or G.shape[1:] != z.shape:
            return None
        buf = mem["pending"] = G[mem["n"] % self.config.m]   # the slot propose stores g in
        return buf

    def propose(self, state, z, fz, g):
        cfg = self.config
        mem = state.memory
        m = cfg.m
        if "F" not in mem:
            b, d = z.shape
            mem["F"] = z.new_empty(m, b, d)     # images f(X_i), slot i % m
            mem["G"] = z.new_empty(m, b, d)     # residuals G_i = f(X_i) - X_i
            mem["H"] = z.new_zeros(b, m, m)     # Gram matrix <G_i, G_j>
            mem["ones"] = z.new_ones(b, m, 1)
            mem["n"] = 0
            if cfg.safeguard > 0:
                mem["valid"] = torch.zeros(b, m, dtype=torch.bool, device=z.device)  # slot usable
                mem["ref"] = None                                                   # min_j ||g_j||^2
                mem["mixed"] = torch.zeros(b, dtype=torch.bool, device=z.device)     # z_k extrapolated
                mem["cool"] = torch.zeros(b, dtype=torch.long, device=z.device)      # plain steps left
                mem["backoff"] = torch.full((b,), m, dtype=torch.long, device=z.device)
        F, G, H = mem["F"], mem["G"], mem["H"]
        pending = mem.pop("pending", None)
        if torch.is_grad_enabled():  # keep autograd history valid for full backpropagation
            F, G, H = F.clone(), G.clone(), H.clone()
        slot = mem["n"] % m
        F[slot] = fz
        if g is not pending:  # not already written there by step()
            G[slot] = g
        mem["n"] += 1
        n = min(mem["n"], m)
        if n * g.numel() <= 1 << 18:   # small: one product over the memory (fewest operations)
            row = torch.linalg.vecdot(G[:n], g).t()                          # (B, n): <G_i, g>
        else:  # large: one slot at a time (each product stays in cache)
            row = torch.stack([torch.linalg.vecdot(G[i], g) for i in range(n)], 1)
        H[:, slot, :n] = row
        H[:, :n, slot] = row
        mem["F"], mem["G"], mem["H"] = F, G, H
        valid = mem.get("valid")
        restarted = False
        if valid is not None:
            gn2 = row[:, slot].detach()                                     # ||g_k||^2
            if mem["ref"] is not None:
                grew = self._failed(gn2, mem)
                if bool(grew.any()):
                    mem["cool"] = torch.where(grew, mem["backoff"], mem["cool"])
                    mem["backoff"] = torch.where(grew, (2 * mem["backoff"]).clamp_(max=2 * m), mem["backoff"])
            cooling = mem["cool"] > 0
            if bool(cooling.any()):       # restarted samples: plain steps while cooling down
                valid = valid & ~cooling[:, None]
                mem["cool"] = (mem["cool"] - 1).clamp_(min=0)
            valid[:, slot] = True
            mem["valid"], mem["ref"] = valid, gn2 if mem["ref"] is None else self._ref(gn2, mem)
            n_valid = valid[:, :n].sum(dim=1)
            mem["mixed"] = n_valid > 1    # the proposal below combines >= 2 slots
            restarted = not bool((n_valid == n).all())
        if n == 1:
            return fz if cfg.beta == 1 else z + cfg.beta * g
        # Tikhonov term lam * (mean squared residual in memory): scale invariant, so the
        # acceleration does not fade as residuals shrink (an absolute lam dominates tiny G G^T)
        if restarted:  # masked slots: zero rows/columns, unit diagonal, zero right-hand side
            v = valid[:, :n].to(H.dtype)
            Hn = H[:, :n, :n] * v[:, :, None] * v[:, None, :]
            diag = Hn.diagonal(dim1=1, dim2=2)
            diag.add_(diag.sum(dim=1, keepdim=True) * (cfg.lam / v.sum(dim=1, keepdim=True)))
            diag.add_(1 - v)
            rhs = v[..., None]
        else:
            Hn = H[:, :n, :n].clone()
            diag = Hn.diagonal(dim1=1, dim2=2)
            diag.add_(diag.sum(dim=1, keepdim=True), alpha=cfg.lam / n)
            rhs = mem["ones"][:, :n]
        c, info = torch.linalg.solve_ex(Hn, rhs)
        alpha = c[..., 0]
        alpha = alpha / alpha.sum(dim=1, keepdim=True)                      # (B, n)
        if bool(info.any()):  # singular (all G_i = 0, an exact fixed point): a plain step
            plain = torch.zeros_like(alpha)
            plain[:, slot] = 1
            alpha = torch.where((info != 0)[:, None], plain, alpha)
        z_f = _combine(alpha, F[:n])                                      # sum_i a_i f(X_i)
        if cfg.beta == 1.0:
            return z_f
        # beta f + (1 - beta) X  =  f - (1 - beta) G
        return z_f - (1 - cfg.beta) * _combine(alpha, G[:n])



def _combine(alpha: Tensor, M: Tensor) -> Tensor:
    """The previous combination ``sum_i alpha[:, i] M[i]`` (alpha (B, n), M (n, B, D))."""
    if M.shape[-1] >= 192:
        return torch.bmm(alpha[:, None], M.transpose(0, 1))[:, 0]
    return (alpha.t()[..., None] * M).sum(0)


def bench_anderson_overhead(repeats: int, batches=(2, 16, 256), hidden: int = 64, iters: int = 30):
    """Per-iteration time of 30 Anderson iterations (no early stop): current vs previous."""
    torch.manual_seed(0)
    model = zoo.build("mlp_deq", hidden=hidden, init_gain=0.9)
    cfg = SolverConfig(name="anderson", max_iter=iters, tol=0.0)
    rows = []
    for b in batches:
        x = torch.rand(b, 1, 8, 8)
        with torch.no_grad():
            u = model.inject(x)
            f = lambda z: model.cell(z, u)  # noqa: E731
            z0 = torch.zeros(b, hidden)
            new, old = Anderson(cfg), AndersonBefore(cfg)

            def cell_alone():
                z = z0
                for _ in range(iters):
                    z = f(z)
            for _ in range(3):
                new.solve(f, z0); old.solve(f, z0); cell_alone()
            t_new, t_old, t_f = [], [], []
            for _ in range(repeats):  # interleaved: machine load affects all three alike
                t = time.perf_counter(); r_new = new.solve(f, z0); t_new.append(time.perf_counter() - t)
                t = time.perf_counter(); r_old = old.solve(f, z0); t_old.append(time.perf_counter() - t)
                t = time.perf_counter(); cell_alone(); t_f.append(time.perf_counter() - t)
            ops_new, ops_old = _ops_per_iter(new, f, z0, iters), _ops_per_iter(old, f, z0, iters)
        us = lambda ts: 1e6 * statistics.median(ts) / iters  # noqa: E731
        rows.append({"batch": b, "new_us": us(t_new), "old_us": us(t_old), "cell_us": us(t_f),
                     "max_abs_diff": float((r_new.z - r_old.z).abs().max()),
                     "ops_new": ops_new, "ops_old": ops_old})
    return rows


def _ops_per_iter(solver, f, z0, iters: int) -> float:
    """Top-level torch operator calls per iteration of ``solver.solve(f, z0)`` (cell included):
    the count that the per-operator dispatch overhead multiplies, independent of machine load."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        solver.solve(f, z0)
    top = sum(1 for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    return top / iters


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
    p.add_argument("--only", choices=["overhead"], default=None,
                   help="run only Anderson's small-batch overhead comparison")
    p.add_argument("--device", default="cpu", help="device of the solver comparison (the memory "
                   "comparison measures process RSS and always runs on the CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _memory_child(args.child, args.batch, args.hidden)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("\n## Anderson per iteration, current vs previous implementation (mlp_deq hidden 64, "
          "m=5, 30 iterations, no early stop)")
    print("| batch | previous (us/iter) | current (us/iter) | current / previous | cell alone (us/iter) "
          "| bookkeeping previous -> current (us/iter) | torch ops/iter previous -> current "
          "| max abs diff of z |")
    print("|---|---|---|---|---|---|---|---|")
    for r in bench_anderson_overhead(args.repeats):
        print(f"| {r['batch']} | {r['old_us']:.0f} | {r['new_us']:.0f} | {r['new_us'] / r['old_us']:.2f} "
              f"| {r['cell_us']:.0f} | {r['old_us'] - r['cell_us']:.0f} -> {r['new_us'] - r['cell_us']:.0f} "
              f"| {r['ops_old']:.1f} -> {r['ops_new']:.1f} | {r['max_abs_diff']:.1e} |")
    if args.only == "overhead":
        return
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
