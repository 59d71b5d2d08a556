"""Randomized-smoothing benchmark: fixed-n CERTIFY, anytime-valid sequential certification, radius
mode, check-based serialized smoothing (SRS) and proven warm starts, side by side.

For each sigma: trains a DEQ with Gaussian noise augmentation at that sigma (``--defense
gaussian-noise``; ``mlp_deq`` hidden 64 for 12 epochs on digits, hidden 128 for 10 epochs on
mnist5k, ``--model-options`` for e.g. a contractive spectral-norm cell; ``--arch mdeq``: the zoo's
``mdeq`` on mnist5k, 3 epochs), then certifies the first
``--images`` test images (n0, alpha 0.001) with each method spec ``KIND[:k=v,...]``
(:func:`parse_method`): ``plain`` (Cohen et al. 2019, n samples), ``seq`` (decide every radius of
``--radii`` with a confidence sequence; n is the budget), ``radius`` (largest radius), ``srs``
(Gao et al. 2024 with the check-based correction: S steps, K checks), ``proof`` / ``seqproof``
(warm starts proven per sample from the contraction certificate, fixed n / sequential). Prints
CPU time (this thread's, one torch thread; the speed-ups are CPU-time ratios), wall time and
noise samples per image, the solver's steps and the cell rows computed per noise sample,
certified accuracy at ``--radii``, the abstain rate, the speed-up against the nearest plain method
listed above it (else the first method without warm starts),
the share of samples whose warm start was proven, and for warm-started methods the certificates
(image, radius) that the same method without warm starts gives and this one loses.

Timing on a shared machine: the images are certified in chunks of ``--chunk``, and every method
runs on a chunk before the next chunk starts (the order of the methods rotating), so that load
changes hit all methods alike. Chunk ``c`` uses noise seed ``c`` (an image's noise is the same for
every method).

Usage: python benchmarks/bench_smoothing.py [--dataset digits|mnist5k] [--arch mlp_deq|mdeq] [--images 100] [--n 10000]
       [--sigmas 0.25,0.5] [--radii 0.25,0.5,1.0] [--methods "plain;seq:n=100000;srs:S=1,K=400"]
       [--model-options JSON] [--json out.json] [--cache DIR]
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


KEYS = {"n": ("n", int), "B": ("batch_size", int), "S": ("srs_steps", int), "K": ("check_samples", int),
        "kmax": ("check_max", int), "start": ("srs_start", str), "tol": ("tolerance", float),
        "first": ("first_batch", int), "fut": ("futility", str),
        "final": ("final_alpha_fraction", float)}
KINDS = {"plain": ("plain (independent solves)", {}),
         "srs": ("SRS", {"srs_check": "sample"}),
         "seq": ("sequential", {"mode": "sequential"}),
         "radius": ("radius mode", {"mode": "radius"}),
         "proof": ("proven warm starts", {"srs_check": "proof"}),
         "seqproof": ("sequential, proven warm starts", {"mode": "sequential", "srs_check": "proof"})}


def parse_method(spec: str) -> tuple:
    """``KIND[:k=v,...]`` -> (name, SmoothingConfig options). KIND: plain (fixed-n CERTIFY), srs
    (check-based SRS; S and K required), seq (anytime-valid decisions at --radii), radius (largest
    radius), proof (fixed n, warm starts proven per sample; S required), seqproof (seq with proven
    warm starts). Keys: n (samples or budget), B (batch), S (warm steps), K, kmax, start
    (chain/clean), tol (radius mode), first (first sequential batch), fut (futility rule: sequence or
    projected; seq defaults to projected), final (share of alpha for the final fixed-n test; 0 turns it off)."""
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise SystemExit(f"unknown method {spec!r}: one of {', '.join(KINDS)} with ':k=v,...'")
    name, opts = KINDS[kind][0], dict(KINDS[kind][1])
    for part in (p for p in rest.split(",") if p):
        k, _, v = part.partition("=")
        if k not in KEYS:
            raise SystemExit(f"unknown key {k!r} in {spec!r}: {sorted(KEYS)}")
        opts[KEYS[k][0]] = KEYS[k][1](v)
    if kind == "srs" and not {"srs_steps", "check_samples"} <= set(opts):
        raise SystemExit(f"{spec!r}: srs needs S and K")
    if kind in ("proof", "seqproof") and "srs_steps" not in opts:
        raise SystemExit(f"{spec!r}: {kind} needs S")
    if rest:
        name += " (" + rest + ")"
    return name, opts


def _cold_key(opts: dict) -> tuple:
    """The options of a method without its warm starts (to find the cold method it compares to)."""
    warm = {"srs_steps", "srs_check", "srs_start", "check_samples", "check_max"}
    return tuple(sorted((k, v) for k, v in opts.items() if k not in warm))


def train(dataset: str, sigma: float, epochs: int, cache, model_options=None, arch: str = "mlp_deq"):
    from robustdeq.defenses.recipes import recipe
    tag = "" if not model_options else "-" + "-".join(f"{k}{v}" for k, v in sorted(model_options.items()))
    if arch != "mlp_deq":
        tag = f"-{arch}" + tag
    out_dir = None if cache is None else os.path.join(cache, f"{dataset}-sigma{sigma:g}{tag}")
    objective = recipe("gaussian-noise", sigma=sigma, seed=0).objective
    if arch == "mlp_deq":
        from robustdeq.train import train_model
        base = ({"hidden": 64, "mean": 0.3, "std": 0.4} if dataset == "digits"
                else {"hidden": 128, "mean": 0.13, "std": 0.31})
        opts = {**base, **(model_options or {})}
        model, _, (xt, yt) = train_model(
            "mlp_deq", opts, {"epochs": epochs, "batch_size": 32 if dataset == "digits" else 64, "lr": 3e-3},
            dataset=dataset, objective=objective, seed=0, out_dir=out_dir)
        return model, xt, yt, f"mlp_deq (hidden {opts['hidden']}" + (f", {model_options}" if model_options else "") + ")"
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
    ap.add_argument("--arch", default="mlp_deq", choices=["mlp_deq", "mdeq"],
                    help="the DEQ trained (mlp_deq: hidden 64 on digits, 128 on mnist5k; mdeq: mnist5k only)")
    ap.add_argument("--epochs", type=int, default=None, help="default 12 (digits) / 10 (mnist5k mlp_deq) / 3 (mdeq)")
    ap.add_argument("--sigmas", default="0.25,0.5")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="';'-separated method specs")
    ap.add_argument("--chunk", type=int, default=10, help="images per interleaved timing chunk")
    ap.add_argument("--cache", default=None, help="folder for the trained models (resumed if present)")
    ap.add_argument("--solver", default=None,
                    help='JSON SolverConfig fields replacing the trained model\'s for certification, e.g. '
                         '\'{"tol": 0, "max_iter": 30}\' (the paper\'s fixed-iteration from-scratch solves)')
    ap.add_argument("--radii", default=",".join(f"{r:g}" for r in RADII),
                    help="L2 radii of the table (decided per input by the sequential methods)")
    ap.add_argument("--model-options", default=None,
                    help='digits: JSON mlp_deq options, e.g. \'{"norm": "spectral", "scale": 0.9}\' (contractive)')
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from robustdeq.certify.smoothing import certify, summarize

    methods = [parse_method(m) for m in args.methods.split(";") if m.strip()]
    radii = tuple(float(r) for r in args.radii.split(","))
    model_options = json.loads(args.model_options) if args.model_options else None
    if args.arch == "mdeq" and args.dataset != "mnist5k":
        raise SystemExit("--arch mdeq: mnist5k only")
    epochs = args.epochs or (12 if args.dataset == "digits" else 10 if args.arch == "mlp_deq" else 3)
    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        t0 = time.perf_counter()
        model, xt, yt, desc = train(args.dataset, sigma, epochs, args.cache, model_options, args.arch)
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
        cpu = dict.fromkeys(results, 0.0)
        for name, opts in methods:   # untimed warm-up: imports and first calls, paid by no method
            certify(model, x[:1], y[:1], **{"sigma": sigma, "n0": 10, "alpha": 0.001, "batch_size": args.batch,
                                            "radii": radii, **opts, "n": 200})
        for c, start in enumerate(range(0, x.shape[0], args.chunk)):
            xc, yc = x[start:start + args.chunk], y[start:start + args.chunk]
            rot = c % len(methods)
            for name, opts in methods[rot:] + methods[:rot]:
                t_cpu = time.thread_time()
                rep = certify(model, xc, yc, **{"sigma": sigma, "n0": args.n0, "n": args.n, "alpha": 0.001,
                                                "batch_size": args.batch, "radii": radii, "seed": c, **opts})
                cpu[name] += time.thread_time() - t_cpu
                results[name] += rep.results
            print(f"  chunk {c + 1}: {min(start + args.chunk, x.shape[0])} images done", flush=True)
        head = (["method", "CPU s/image", "wall s/image", "samples/image", "solver steps/sample", "cell rows/sample", "speed-up (time)",
                 "speed-up (cell rows)"] + [f"cert@{r:g}" for r in radii]
                + ["abstain", "checked/image", "proven warm", "lost vs cold"])
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        base_t = base_c = None
        cold_key = {}
        for name, opts in methods:
            if "srs_steps" not in opts:
                cold_key.setdefault(_cold_key(opts), name)
        for name, opts in methods:
            sm = summarize(results[name], radii)
            tpi, ce = cpu[name] / len(results[name]), sm["cell_evals_per_noise_sample"]
            # the reference: the nearest plain (fixed-n, cold) method above, else the first cold one
            if (base_t is None and "srs_steps" not in opts) or not {"mode", "srs_steps", "srs_check"} & set(opts):
                base_t, base_c = tpi, ce
            acc = sm["certified_accuracy"]
            srs, proof = sm.get("srs"), sm.get("proof")
            ref = cold_key.get(_cold_key(opts)) if "srs_steps" in opts else None
            lost = None
            if ref is not None:
                lost = sum(a.certified_at(r) and not b.certified_at(r)
                           for a, b in zip(results[ref], results[name]) for r in radii)
            cells = ([name, f"{tpi:.3f}", f"{sm['time_per_image_s']:.3f}", f"{sm['samples_per_image']:.0f}", f"{sm['f_evals_per_noise_sample']:.2f}",
                      f"{ce:.2f}", f"{base_t / tpi:.2f}x" if base_t else "", f"{base_c / ce:.2f}x" if base_c else ""]
                     + [f"{100 * acc[f'{r:g}']:.1f}%" for r in radii]
                     + [f"{100 * sm['abstain_rate']:.1f}%", f"{srs['checked_per_input']:.0f}" if srs else "",
                        f"{100 * proof['proven_warm_fraction']:.1f}% ({proof['unproven']} unproven)" if proof else "",
                        "" if lost is None else str(lost)])
            print("| " + " | ".join(cells) + " |")
            row = {"dataset": args.dataset, "sigma": sigma, "method": name, "options": opts,
                   "cpu_per_image_s": tpi, "time_per_image_s": sm["time_per_image_s"], "samples_per_image": sm["samples_per_image"],
                   "f_evals_per_noise_sample": sm["f_evals_per_noise_sample"],
                   "cell_evals_per_noise_sample": ce, "speedup_time": base_t / tpi if base_t else None,
                   "speedup_cell_evals": base_c / ce if base_c else None,
                   "certified_accuracy": acc, "abstain_rate": sm["abstain_rate"], "clean_accuracy": clean,
                   "images": len(results[name]), "proof": proof, "lost_vs_cold": lost, "cold_reference": ref}
            if srs:
                unc = srs["certified_accuracy_uncorrected"]
                row.update({"uncorrected": unc, "disagreement_rate": srs["disagreement_rate"],
                            "gained_rate": srs["gained_rate"], "checked_per_input": srs["checked_per_input"]})
                print("| " + " | ".join([f"  ({name} uncorrected, not valid)", "", "", "", "", "", "", ""]
                                        + [f"{100 * unc.get(f'{r:g}', 0.0):.1f}%" for r in radii]
                                        + ["", "", "", ""]) + " |")
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
