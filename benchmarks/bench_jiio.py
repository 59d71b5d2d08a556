"""JIIO-AT vs PGD-AT-7: time per training epoch and worst-case robust accuracy (digits, tiny
mlp_deq, CPU), per seed.

The issue's goal: JIIO-AT at least 3x faster per epoch than PGD-AT-7 at no more than 2 points
lower worst-case robust accuracy, over 3 seeds. One JIIO iteration costs one cell evaluation + one
VJP, so JIIO-K AT costs about 2K + (re-solve + training backward) cell evaluations against
PGD-7's 7 x (forward + adjoint solve) + the training step. This script measures both on the same
model initialisation, data order, optimiser and seed:

* time per epoch, measured side by side: every configuration trains its own model, and the
  configurations take turns batch by batch (the order rotating from batch to batch), so the load
  of other jobs on the machine hits them alike; an epoch's time is the sum of its batches' times
  (objective + backward + optimiser step, one torch thread). The ratio is taken per seed over the
  epochs after the first (warm-up). Also reported: cell evaluations per batch (forward + VJPs,
  machine independent) and the minimum per-batch time over interleaved repeats on one shared model;
* clean accuracy and worst-case robust accuracy on the test split: the per-sample worst case over
  the evaluation harness's ``quick`` suite (PGD-20 with the implicit and the unrolled gradient,
  cross-entropy and CW-margin losses; :func:`robustdeq.eval.evaluate`) and JIIO-80.

Run: ``python benchmarks/bench_jiio.py`` (1 min on an idle 2-core CPU, 4-5 min under load),
``--quick`` for a smoke run. Configurations: ``--jiio 20 15 "12,alpha_final=0.0125"`` (iterations,
then JIIOAT options; default: the former default "20,select=best", the default (14 evaluations,
select "next": the same iterates as "15,select=last", one evaluation cheaper) and "15,select=last").
Figures depend on the machine; the ratios are what matters.
"""
from __future__ import annotations

import argparse
import ast
import logging
import time
import warnings

import torch

from robustdeq.attacks.jiio import JIIO
from robustdeq.data import load_digits, make_loader
from robustdeq.deq import zoo
from robustdeq.deq.jiio import CostCounter
from robustdeq.defenses.objectives import JIIOAT, PGDAT
from robustdeq.errors import NonConvergenceWarning
from robustdeq.eval import AttackSpec, evaluate


def parse_jiio(spec: str):
    """``"K"`` or ``"K,key=value,..."`` -> (name, JIIOAT options)."""
    head, *rest = spec.split(",")
    opts = {"iters": int(head)}
    for kv in rest:
        k, v = kv.split("=", 1)
        try:
            opts[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            opts[k.strip()] = v.strip()
    name = f"JIIO-AT-{head}" + ("" if not rest else "(" + ",".join(rest) + ")")
    return name, opts


def build_objectives(args, seed):
    objs = {"PGD-AT-7": PGDAT(eps=args.eps, steps=7, seed=seed)}
    for spec in args.jiio:
        name, opts = parse_jiio(spec)
        objs[name] = JIIOAT(eps=args.eps, seed=seed, **opts)
    return objs


def train_interleaved(objs, epochs, x, y, seed, hidden, lr):
    """Train one model per objective, the objectives taking turns batch by batch.

    Returns {name: model}, {name: [epoch seconds]}, {name: cell evaluations per batch}."""
    models, opts, times, costs = {}, {}, {}, {}
    for n in objs:
        torch.manual_seed(seed)
        models[n] = zoo.build("mlp_deq", hidden=hidden)
        opts[n] = torch.optim.Adam(models[n].parameters(), lr=lr)
        times[n], costs[n] = [], 0
    names = list(objs)
    nb = 0
    counters = {n: CostCounter(models[n]) for n in names}
    for c in counters.values():
        c.__enter__()
    try:
        for ep in range(epochs):
            for m in models.values():
                m.train()
            ep_t = dict.fromkeys(names, 0.0)
            for i, (xb, yb) in enumerate(make_loader(x, y, 64, shuffle=True, seed=seed + ep)):
                order = names[i % len(names):] + names[:i % len(names)]
                for n in order:
                    model, opt = models[n], opts[n]
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss, _ = objs[n](model, xb, yb)
                    loss.backward()
                    opt.step()
                    ep_t[n] += time.perf_counter() - t0
                nb += 1
            for n in names:
                times[n].append(ep_t[n])
    finally:
        for c in counters.values():
            c.__exit__(None, None, None)
    for n in names:
        costs[n] = counters[n].total / nb
        models[n].eval()
    return models, times, costs


def jiio80(target, *, eps, norm, steps, seed):
    """The suite's extra unit: the JIIO attack with 80 iterations (its defaults otherwise)."""
    return JIIO(target, eps=eps, norm=norm, iters=80)


def evaluate_worst(model, x, y, eps, seed):
    """Clean and worst-case robust accuracy: harness ``quick`` suite + JIIO-80, per sample."""
    suite = ["pgd-ift", "pgd-unrolled", "pgd-ift-margin", "pgd-unrolled-margin",
             AttackSpec("jiio-80", jiio80, scope="deq", needs="deq",
                        description="JIIO attack, 80 joint iterations")]
    rep = evaluate(model, x, y, eps=eps, suite=suite, steps=20, seed=seed, cascade=True, checks=False,
                   batch_size=256)
    return {"clean": float(rep.clean_accuracy), "worst": float(rep.robust_accuracy(eps))}


def batch_times(model, objectives, x, y, repeats):
    """Per-batch time (objective + backward) of each objective on the same model and batch,
    interleaved, ``repeats`` times: the minimum is robust to other load on the machine."""
    out = {n: [] for n in objectives}
    model.train()
    for _ in range(repeats):
        for n, obj in objectives.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss, _ = obj(model, x, y)
            loss.backward()
            out[n].append(time.perf_counter() - t0)
    model.eval()
    return {n: min(v) for n, v in out.items()}


def _ms(v):
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(v) > 1 else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--jiio", nargs="+", default=["20,select=best", "15,select=last", "14"],
                    help='JIIO-AT configurations: "K" or "K,option=value,..." (JIIOAT options)')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--n-test", type=int, default=450, help="test digits for the accuracies")
    ap.add_argument("--repeats", type=int, default=15, help="repeats of the one-batch timing (0: skip)")
    ap.add_argument("--quick", action="store_true", help="2 epochs, 300 training digits, one seed")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", NonConvergenceWarning)
    logging.getLogger("robustdeq").setLevel(logging.WARNING)
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    xt, yt = xt[:args.n_test], yt[:args.n_test]
    if args.quick:
        args.epochs, args.seeds, args.repeats = 2, args.seeds[:1], 3
        x, y = x[:300], y[:300]
        xt, yt = xt[:150], yt[:150]

    t_start = time.perf_counter()
    names = list(build_objectives(args, 0))
    base = names[0]
    res = {n: {"time": [], "ratio": [], "evals": [], "clean": [], "worst": [], "gap": []} for n in names}
    ref_model = None
    for seed in args.seeds:
        objs = build_objectives(args, seed)
        models, times, costs = train_interleaved(objs, args.epochs, x, y, seed, args.hidden, args.lr)
        ref_model = ref_model or models[base]
        ev = {n: evaluate_worst(m, xt, yt, args.eps, seed) for n, m in models.items()}
        for n in names:
            t = sum(times[n][1:] or times[n])          # epochs after the first (warm-up)
            tb = sum(times[base][1:] or times[base])
            r = res[n]
            r["time"].append(t / max(1, len(times[n]) - 1))
            r["ratio"].append(tb / t)
            r["evals"].append(costs[n])
            r["clean"].append(ev[n]["clean"])
            r["worst"].append(ev[n]["worst"])
            r["gap"].append(100 * (ev[n]["worst"] - ev[base]["worst"]))
            print(f"  seed {seed} {n:<24}: {r['time'][-1]:.2f} s/epoch ({r['ratio'][-1]:.2f}x), "
                  f"{costs[n]:.0f} cell evals/batch, clean {ev[n]['clean']:.3f}, "
                  f"worst {ev[n]['worst']:.3f} ({r['gap'][-1]:+.1f} pt)", flush=True)

    bts = None
    if args.repeats > 0:  # every objective on the same model (PGD-AT-7, first seed) and batch of 64
        bts = batch_times(ref_model, build_objectives(args, 0), x[:64], y[:64], args.repeats)

    print(f"\nJIIO-AT vs PGD-AT-7 on digits (mlp_deq hidden {args.hidden}, Linf eps {args.eps}, "
          f"{args.epochs} epochs, batch 64, Adam {args.lr}, seeds {args.seeds}, torch threads 1; "
          f"worst case over the harness's quick suite + JIIO-80 on {xt.shape[0]} test digits; "
          f"{time.perf_counter() - t_start:.0f} s)")
    hdr = (f"{'objective':<26} {'s/epoch':>8} {'speed-up per seed':>22} {'ms/batch':>9} "
           f"{'evals/batch':>11} {'clean':>13} {'worst case':>13} {'gap per seed (pt)':>22} {'mean gap':>9}")
    print(hdr)
    print("-" * len(hdr))
    ok = []
    for n in names:
        r = res[n]
        ratios = "/".join(f"{v:.2f}" for v in r["ratio"])
        gaps = "/".join(f"{v:+.1f}" for v in r["gap"])
        mb = f"{1e3 * bts[n]:.1f}" if bts else "-"
        print(f"{n:<26} {_ms(r['time'])[0]:>8.2f} {ratios:>22} {mb:>9} {_ms(r['evals'])[0]:>11.0f} "
              "{:.3f}+-{:.3f} ".format(*_ms(r["clean"])).rjust(14)
              + "{:.3f}+-{:.3f}".format(*_ms(r["worst"])).rjust(13)
              + f" {gaps:>22} {_ms(r['gap'])[0]:>+8.1f}")
        if n != base and min(r["ratio"]) >= 3 and _ms(r["gap"])[0] >= -2:
            ok.append(n)
    print("JIIO-AT-K without options: JIIOAT's defaults otherwise (select \"next\"); "
          "s/epoch: mean epoch time (epochs after the first), configurations interleaved batch by "
          "batch; speed-up: PGD-AT-7's epoch time / this one's, per seed; ms/batch: minimum over "
          f"{args.repeats} interleaved timings of objective + backward on one batch of 64 (the "
          "PGD-AT-7 model of the first seed); evals: cell evaluations + VJPs per batch; gap: worst-"
          "case robust accuracy minus PGD-AT-7's, per seed")
    print("goal (>= 3x faster per epoch on every seed, mean worst-case gap >= -2 points): "
          + (f"met by {', '.join(ok)}" if ok else "NOT met by any JIIO configuration tried"))


if __name__ == "__main__":
    main()
