"""Certification benchmark on digits (issue: certify stability properties and certified robustness).

Trains four small models briefly on the digits training split and certifies them on the test split:

- undefended ``mlp_deq`` (tanh, no weight constraint),
- monotone ``mon_deq`` (Winston & Kolter 2020; Lipschitz bound of Pabbaraju et al. 2021),
- ``lyadeq`` (the Lyapunov-stable DEQ of robustdeq.defenses.lyapunov, trained with its penalty),
- a Lipschitz-constrained ``mlp_deq`` (spectral normalisation, ``scale``),

and prints: clean accuracy, fraction of samples with a stability certificate (and by basis: global
contraction / local rho(J) < 1 / Lyapunov decrease), mean certified L2 radius, certified accuracy at
L2 eps 0.1, 0.25, 0.5 (and at Linf eps via IBP or the L2 radius), and certification time per sample.
PGD-L2 (margin loss, 20 steps) at each certified sample's radius (minus 0.1%) must find nothing.
A row whose model cannot be built (e.g. LyaDEQ absent) is marked "not available".

Usage: python benchmarks/bench_certify.py [--epochs 4] [--n-test 450] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.simplefilter("ignore")

from robustdeq.certify import certify  # noqa: E402
from robustdeq.data import load_digits  # noqa: E402
from robustdeq.deq import zoo  # noqa: E402
from robustdeq.errors import ConfigError  # noqa: E402
from robustdeq.train import Trainer  # noqa: E402

EPS_L2 = (0.1, 0.25, 0.5)
EPS_LINF = (0.01, 0.03)


def rows(hidden: int, scale: float):
    """(label, zoo name, options, objective factory)"""
    def lya_objective():
        from robustdeq.defenses.lyapunov import LyapunovStability
        return LyapunovStability(condition="map")
    return [
        ("undefended DEQ (mlp_deq)", "mlp_deq", dict(hidden=hidden), None),
        ("monotone DEQ (mon_deq)", "mon_deq", dict(hidden=hidden), None),
        ("LyaDEQ (lyadeq)", "lyadeq", dict(hidden=hidden, icnn_hidden=(hidden, hidden)), lya_objective),
        (f"Lipschitz-constrained DEQ (mlp_deq, spectral, scale {scale})", "mlp_deq",
         dict(hidden=hidden, norm="spectral", scale=scale), None),
    ]


def pgd_l2_inside(model, x, y, radius, steps=20):
    """Per-sample-radius PGD (L2, margin loss, random start) at the certified radius minus 1e-3
    relative slack, with a strict solver: returns the number of successes (must be 0)."""
    from robustdeq.config import SolverConfig
    model.solver_config = SolverConfig(name="anderson", max_iter=100, tol=1e-6, stop_mode="abs")
    g = torch.Generator().manual_seed(0)
    e = (radius * (1 - 1e-3)).view(-1, 1, 1, 1)
    d = torch.randn(x.shape, generator=g)
    xa = (x + d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * e * 0.5).clamp(0, 1)
    alpha = 2.5 * e / steps
    for _ in range(steps):
        xa = xa.detach().requires_grad_(True)
        logits = model(xa)
        other = logits.clone()
        other[torch.arange(len(y)), y] = -float("inf")
        loss = (other.max(1).values - logits.gather(1, y[:, None]).squeeze(1)).sum()
        grad, = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            delta = xa + alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) - x
            n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            xa = (x + delta * torch.clamp(e / n.clamp_min(1e-12), max=1.0)).clamp(0, 1)
    with torch.no_grad():
        return int((model(xa).argmax(1) != y).sum())


def run_row(label, name, options, objective, data, args):
    xtr, ytr, xte, yte = data
    torch.manual_seed(args.seed)
    try:
        model = zoo.build(name, **options)
        obj = objective() if objective is not None else None
    except (ConfigError, ImportError, ModuleNotFoundError) as e:
        return {"model": label, "available": False, "reason": str(e)}
    t = time.perf_counter()
    Trainer(model, obj, {"epochs": args.epochs, "batch_size": 64, "lr": args.lr, "seed": args.seed},
            tensorboard=False).fit(xtr, ytr)
    train_s = time.perf_counter() - t
    model.eval()
    rep = certify(model, xte, yte, eps_l2=EPS_L2, eps_linf=EPS_LINF, seed=args.seed)
    s = rep.summary
    out = {"model": label, "available": True, "train_s": train_s,
           "clean_accuracy": s["clean_accuracy"], "stable": s["stable_fraction"],
           "contraction": s["contraction_fraction"], "local": s["local_fraction"],
           "lyapunov": s["lyapunov_fraction"], "mean_radius": s["mean_radius"],
           "cert_l2": s["certified_accuracy_l2"], "cert_linf": s.get("certified_accuracy_linf"),
           "ibp_linf": s.get("ibp_certified_linf"), "time_per_sample_s": rep.timing["per_sample_s"],
           "lip_logits": rep.global_certificates.get("lipschitz", {}).get("lip_logits"),
           "lip_z": rep.global_certificates["contraction"]["lip_z"],
           "radius_method": rep.global_certificates.get("lipschitz", {}).get("method")}
    radius = torch.tensor([r.radius for r in rep.results], dtype=torch.float32)
    cert = radius > 0
    out["pgd_certified"] = int(cert.sum())
    out["pgd_successes"] = pgd_l2_inside(model, xte[cert], yte[cert], radius[cert]) if bool(cert.any()) else 0
    if args.save:
        rep.save(os.path.join(args.save, name + ("_" + options.get("norm", "") if "norm" in options else "")))
    return out


def fmt(v, nd=3):
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--n-test", type=int, default=450)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--save", default=None, help="folder for each model's certificate.json/.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    xte, yte = xte[:args.n_test], yte[:args.n_test]
    data = (xtr, ytr, xte, yte)
    results = [run_row(*r, data, args) for r in rows(args.hidden, args.scale)]
    total = time.perf_counter() - t0
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, digits: {len(xtr)} train / "
          f"{len(xte)} test, hidden {args.hidden}, {args.epochs} epochs each (Adam lr {args.lr})\n")
    head = ("| model | clean acc | stable (any) | contraction | local rho<1 | Lyapunov | mean L2 radius | "
            + " | ".join(f"cert acc L2@{e}" for e in EPS_L2) + " | "
            + " | ".join(f"cert acc Linf@{e}" for e in EPS_LINF) + " | time / sample (ms) | PGD-L2 at radius: successes / certified |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        if not r["available"]:
            print(f"| {r['model']} | not available ({r['reason']}) |" + " |" * (head.count("|") - 3))
            continue
        l2 = " | ".join(fmt(r["cert_l2"][f"{e:g}"]) for e in EPS_L2)
        linf = " | ".join(f"{fmt(r['cert_linf'][f'{e:g}'])} (IBP {fmt(r['ibp_linf'][f'{e:g}'])})"
                          for e in EPS_LINF)
        print(f"| {r['model']} | {fmt(r['clean_accuracy'])} | {fmt(r['stable'])} | {fmt(r['contraction'])} | "
              f"{fmt(r['local'])} | {fmt(r['lyapunov'])} | {fmt(r['mean_radius'], 4)} | {l2} | {linf} | "
              f"{1000 * r['time_per_sample_s']:.2f} | {r['pgd_successes']} / {r['pgd_certified']} |")
    print()
    for r in results:
        if r["available"]:
            print(f"- {r['model']}: Lip_z(f) <= {fmt(r['lip_z'], 4)}; Lip(x -> logits) <= "
                  f"{fmt(r['lip_logits'], 2)} ({r['radius_method']}); trained in {r['train_s']:.1f} s")
    print(f"\ntotal wall time {total:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results, "total_s": total, "args": vars(args)}, fh, indent=1)


if __name__ == "__main__":
    main()
