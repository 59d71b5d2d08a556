"""Randomized-smoothing benchmark (issue 12): plain smoothing vs serialized smoothing (SRS).

For each sigma: trains a DEQ with Gaussian noise augmentation at that sigma (``--defense
gaussian-noise``; digits: ``mlp_deq`` hidden 64, 12 epochs; mnist5k: the zoo's ``mdeq``, 3 epochs),
then certifies the first ``--images`` test images with CERTIFY (Cohen et al. 2019; n0, n,
alpha 0.001) using independent solves ("plain") and with SRS variants (Gao et al. 2024), each a
spec ``srs:S=3,K=400[,kmax=2000][,start=clean]`` (S solver steps per warm batch, K checked
estimation samples re-solved from scratch, kmax: adaptive check count in [K, kmax], start: chain /
clean). Prints time per image, the solver's steps and the cell rows computed per noise sample,
certified accuracy at L2 radii 0 / 0.25 / 0.5 / 0.75 / 1.0, the abstain rate, the speed-up against
plain smoothing, and SRS's *uncorrected* certified accuracy (what the warm-started counts alone
would claim; not a valid certificate).

Timing on a shared machine: the images are certified in chunks of ``--chunk``, and every method
runs on a chunk before the next chunk starts (the order of the methods rotating), so that load
changes hit all methods alike. Chunk ``c`` uses noise seed ``c`` (an image's noise is the same for
every method).

Usage: python benchmarks/bench_smoothing.py [--dataset digits|mnist5k] [--images 100] [--n 10000]
       [--sigmas 0.25,0.5] [--methods plain,srs:S=1,K=400,...] [--json out.json] [--cache DIR]
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

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_METHODS = ("plain;srs:S=1,K=400;srs:S=3,K=400;srs:S=5,K=400;srs:S=1,K=400,start=clean;"
                   "srs:S=3,K=400,start=clean;srs:S=5,K=400,kmax=2000;srs:S=5,K=1000")


def parse_method(spec: str) -> tuple:
    """``plain[:B=2000]`` -> ("plain ...", {...}); ``srs:S=3,K=400[,kmax=2000][,start=clean][,B=2000]``
    -> (name, SmoothingConfig options); B: batch size (default --batch)."""
    spec = spec.strip()
    if spec == "plain" or spec.startswith("plain:"):
        kv = dict(p.split("=", 1) for p in spec[6:].split(",") if p)
        opts = {"batch_size": int(kv.pop("B"))} if "B" in kv else {}
        if kv:
            raise SystemExit(f"unknown keys in {spec!r}: {sorted(kv)}")
        return "plain (independent solves)" + (f", batch {opts['batch_size']}" if opts else ""), opts
    if not spec.startswith("srs:"):
        raise SystemExit(f"unknown method {spec!r}: plain[:B=..] or "
                         "srs:S=..,K=..[,kmax=..][,start=chain|clean][,B=..]")
    kv = dict(p.split("=", 1) for p in spec[4:].split(","))
    opts = {"srs_steps": int(kv.pop("S")), "check_samples": int(kv.pop("K"))}
    if "B" in kv:
        opts["batch_size"] = int(kv.pop("B"))
    if "kmax" in kv:
        opts["check_max"] = int(kv.pop("kmax"))
    if "start" in kv:
        opts["srs_start"] = kv.pop("start")
    if kv:
        raise SystemExit(f"unknown keys in {spec!r}: {sorted(kv)}")
    name = f"SRS S={opts['srs_steps']}, K={opts['check_samples']}"
    if "check_max" in opts:
        name += f"..{opts['check_max']} (adaptive)"
    if opts.get("srs_start") == "clean":
        name += ", clean start"
    if "batch_size" in opts:
        name += f", batch {opts['batch_size']}"
    return name, opts


def train(dataset: str, sigma: float, epochs: int, cache):
    from robustdeq.defenses.recipes import recipe
    out_dir = None if cache is None else os.path.join(cache, f"{dataset}-sigma{sigma:g}")
    objective = recipe("gaussian-noise", sigma=sigma, seed=0).objective
    if dataset == "digits":
        from robustdeq.cli import train_model
        model, _, (xt, yt) = train_model(
            "mlp_deq", {"hidden": 64, "mean": 0.3, "std": 0.4}, {"epochs": epochs, "batch_size": 32, "lr": 3e-3},
            objective=objective, seed=0, out_dir=out_dir)
        return model, xt, yt, "mlp_deq (hidden 64)"
    from robustdeq.config import TrainConfig
    from robustdeq.data import load_mnist5k
    from robustdeq.deq import zoo
    from robustdeq.train import Trainer
    x, y = load_mnist5k("train")
    xt, yt = load_mnist5k("test")
    torch.manual_seed(0)
    model = zoo.build("mdeq")
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, optimizer="adam", schedule="cosine", seed=0)
    Trainer(model, objective, cfg, out_dir=out_dir, tensorboard=False).fit(x, y)
    return model, xt, yt, "mdeq (zoo defaults)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist5k"])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=None, help="default 12 (digits) / 3 (mnist5k)")
    ap.add_argument("--sigmas", default="0.25,0.5")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="';'-separated method specs")
    ap.add_argument("--chunk", type=int, default=10, help="images per interleaved timing chunk")
    ap.add_argument("--cache", default=None, help="folder for the trained models (resumed if present)")
    ap.add_argument("--solver", default=None,
                    help='JSON SolverConfig fields replacing the trained model\'s for certification, e.g. '
                         '\'{"tol": 0, "max_iter": 30}\' (the paper\'s fixed-iteration from-scratch solves)')
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from robustdeq.certify.smoothing import certify, summarize

    methods = [parse_method(m) for m in args.methods.split(";") if m.strip()]
    epochs = args.epochs or (12 if args.dataset == "digits" else 3)
    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        t0 = time.perf_counter()
        model, xt, yt, desc = train(args.dataset, sigma, epochs, args.cache)
        model.eval()
        train_s = time.perf_counter() - t0
        if args.solver:
            model.solver_config = model.solver_config.replace(**json.loads(args.solver))
            desc += f", certified with solver {args.solver}"
        with torch.no_grad():
            clean = float(torch.cat([(model(xt[i:i + 250]).argmax(1) == yt[i:i + 250])
                                     for i in range(0, xt.shape[0], 250)]).float().mean())
        x, y = xt[:args.images], yt[:args.images]
        print(f"\n== {args.dataset}, sigma {sigma:g}: noise-trained {desc}, clean test accuracy {100 * clean:.1f}% "
              f"(trained {epochs} epochs in {train_s:.0f} s); {args.images} test images, n0 {args.n0}, "
              f"n {args.n}, alpha 0.001, batch {args.batch}; chunks of {args.chunk}, interleaved ==")
        results = {name: [] for name, _ in methods}
        for c, start in enumerate(range(0, x.shape[0], args.chunk)):
            xc, yc = x[start:start + args.chunk], y[start:start + args.chunk]
            rot = c % len(methods)
            for name, opts in methods[rot:] + methods[:rot]:
                rep = certify(model, xc, yc, **{"sigma": sigma, "n0": args.n0, "n": args.n, "alpha": 0.001,
                                                "batch_size": args.batch, "radii": RADII, "seed": c, **opts})
                results[name] += rep.results
            print(f"  chunk {c + 1}: {min(start + args.chunk, x.shape[0])} images done", flush=True)
        head = (["method", "s/image", "solver steps/sample", "cell rows/sample", "speed-up (time)",
                 "speed-up (cell rows)"] + [f"cert@{r:g}" for r in RADII] + ["abstain", "checked/image"])
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        base_t = base_c = None
        for name, opts in methods:
            sm = summarize(results[name], RADII)
            tpi, ce = sm["time_per_image_s"], sm["cell_evals_per_noise_sample"]
            if base_t is None and "srs_steps" not in opts:   # the first plain method is the reference
                base_t, base_c = tpi, ce
            acc = sm["certified_accuracy"]
            srs = sm.get("srs")
            cells = ([name, f"{tpi:.3f}", f"{sm['f_evals_per_noise_sample']:.2f}", f"{ce:.2f}",
                      f"{base_t / tpi:.2f}x" if base_t else "", f"{base_c / ce:.2f}x" if base_c else ""]
                     + [f"{100 * acc[f'{r:g}']:.1f}%" for r in RADII]
                     + [f"{100 * sm['abstain_rate']:.1f}%", f"{srs['checked_per_input']:.0f}" if srs else ""])
            print("| " + " | ".join(cells) + " |")
            row = {"dataset": args.dataset, "sigma": sigma, "method": name, "options": opts,
                   "time_per_image_s": tpi, "f_evals_per_noise_sample": sm["f_evals_per_noise_sample"],
                   "cell_evals_per_noise_sample": ce, "speedup_time": base_t / tpi if base_t else None,
                   "speedup_cell_evals": base_c / ce if base_c else None,
                   "certified_accuracy": acc, "abstain_rate": sm["abstain_rate"], "clean_accuracy": clean,
                   "images": len(results[name])}
            if srs:
                unc = srs["certified_accuracy_uncorrected"]
                row.update({"uncorrected": unc, "disagreement_rate": srs["disagreement_rate"],
                            "gained_rate": srs["gained_rate"], "checked_per_input": srs["checked_per_input"]})
                print("| " + " | ".join([f"  ({name} uncorrected, not valid)", "", "", "", "", ""]
                                        + [f"{100 * unc[f'{r:g}']:.1f}%" for r in RADII] + ["", ""]) + " |")
            rows.append(row)
        print("checked samples, SRS = c_hat but from scratch != c_hat / SRS != c_hat but from scratch = c_hat: "
              + "; ".join(f"{r['method']}: {100 * r['disagreement_rate']:.2f}% / {100 * r['gained_rate']:.2f}%"
                          for r in rows if r["sigma"] == sigma and "disagreement_rate" in r))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
