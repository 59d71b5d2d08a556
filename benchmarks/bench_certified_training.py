"""Certified training of DEQs against explicit baselines, on MNIST-5k and digits.

    python benchmarks/bench_certified_training.py [--datasets mnist5k digits] [--epochs 10]
        [--suite standard] [--n-bracket 200] [--smoothing-n 2000] [--smoothing-images 200]
        [--hidden 64] [--lr 1e-3] [--scale 0.5] [--save-dir DIR]
        [--rows ibp-deq ibp-stem-deq ibp-cnn lipschitz-margin-deq noise-deq]

Per dataset, side by side, every model trained for the same epochs (Adam at ``--lr``, cosine
schedule, batch 64, seed 0):

- Linf 0.1: ``ibp`` (Gowal et al. 2018) on two DEQs whose interval fixed point is unique
  (``mlp_deq`` relu, ``norm="interval"``, on the pixels; ``stem_deq``: the CNN's convolutions
  feeding the same kind of equilibrium layer) and on a feed-forward CNN of similar parameter count
  (``ff_cnn`` without GroupNorm, one hidden layer); training radius 0.15 after one warm-up epoch,
  ramped over half the epochs, kappa 1 -> 0.5. Certified accuracy by IBP (the DEQ through
  ``robustdeq.certify.certify``, which also checks that the model's own solver reaches the
  certified fixed point; the CNN by ``ibp_certify_feedforward``), clean accuracy beside it.
- L2 radius 1.0: ``lipschitz-margin`` (Tsuzuku et al. 2018) on the spectral-normalised ``mlp_deq``
  (training radius 1.0, ramped), certified by the Lipschitz radius of ``certify`` (one pass), vs
  randomized smoothing (Cohen et al. 2019; sigma 0.5, ``--smoothing-n`` noise samples, alpha
  0.001) of a DEQ of the same architecture trained with Gaussian noise (sigma 0.5), on the first
  ``--smoothing-images`` test images; time per image for both.
- The bracket of each base model on the first ``--n-bracket`` test images: certified <= robust
  (the ``--suite`` attacks) <= clean, with the count of certified samples an attack broke.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import torch

from robustdeq.certify import certify
from robustdeq.certify.ibp import ibp_certify_feedforward
from robustdeq.defenses.objectives import make_objective
from robustdeq.deq import zoo
from robustdeq.eval import evaluate
from robustdeq.train import Trainer

logger = logging.getLogger("bench_certified_training")

BATCH = 64
SOLVER = {"name": "fixed_point", "max_iter": 60, "tol": 1e-6, "stop_mode": "abs"}


def _data(name):
    if name == "mnist5k":
        from robustdeq.data import load_mnist5k
        return load_mnist5k("train") + load_mnist5k("test") + ((1, 28, 28), 0.1307, 0.3081)
    from robustdeq.data import load_dataset
    return load_dataset("digits", "train") + load_dataset("digits", "test") + ((1, 8, 8), 0.3, 0.4)


def _models(shape, mean, std, hidden=64, scale=0.5):
    pool = 7 if shape[1] == 28 else 4
    deq = dict(in_shape=list(shape), hidden=hidden, mean=mean, std=std, solver=SOLVER)
    return {
        "ibp-deq": ("mlp_deq", {**deq, "act": "relu", "norm": "interval", "scale": scale}),
        "ibp-stem-deq": ("stem_deq", {**deq, "mean": [mean], "std": [std], "channels": 16, "blocks": 1,
                                      "pool": pool, "act": "relu", "norm": "interval", "scale": scale}),
        "ibp-cnn": ("ff_cnn", {"in_shape": list(shape), "channels": 16, "blocks": 1, "pool": pool,
                               "norm": "none", "hidden": hidden if shape[1] == 28 else 24 * hidden // 64}),
        "lipschitz-margin-deq": ("mlp_deq", {**deq, "act": "tanh", "norm": "spectral", "scale": 0.5}),
        "noise-deq": ("mlp_deq", {**deq, "act": "tanh", "norm": "spectral", "scale": 0.5}),
    }


def _objective(row, epochs, steps_per_epoch):
    warm, ramp = steps_per_epoch, max(1, (epochs * steps_per_epoch) // 2)
    if row.startswith("ibp"):
        return make_objective("ibp", eps=0.15, warmup=warm, ramp=ramp, kappa=0.5)
    if row.startswith("lipschitz"):
        return make_objective("lipschitz_margin", eps=1.0, warmup=warm, ramp=ramp)
    return make_objective("gaussian_noise", sigma=0.5)


def _train(row, name, opts, x, y, xt, yt, epochs, lr):
    torch.manual_seed(0)
    model = zoo.build(name, **opts)
    obj = _objective(row, epochs, -(-x.shape[0] // BATCH))
    t0 = time.perf_counter()
    Trainer(model, obj, {"epochs": epochs, "batch_size": BATCH, "lr": lr, "seed": 0}).fit(x, y, xt, yt)
    return model.eval(), time.perf_counter() - t0


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _linf_certified(row, model, x, y, eps):
    t0 = time.perf_counter()
    if row == "ibp-cnn":
        r = ibp_certify_feedforward(model, x, y, eps)
        cert = r.certified & (model(x).argmax(1) == y)
    else:
        rep = certify(model, x, y, eps_linf=(eps,), eps_l2=(), methods=["ibp"], batch_size=500)
        cert = torch.tensor([bool(s.details["linf"][f"{eps:g}"]["certified"]) for s in rep.results])
    return float(cert.float().mean()), (time.perf_counter() - t0) / x.shape[0]


def _l2_certified(model, x, y, eps):
    t0 = time.perf_counter()
    rep = certify(model, x, y, eps_l2=(eps,), methods=["lipschitz"], batch_size=500)
    cert = torch.tensor([r.radius > eps and r.details["correct"] for r in rep.results])
    return float(cert.float().mean()), (time.perf_counter() - t0) / x.shape[0]


def _smoothing(model, x, y, radius, n):
    from robustdeq.certify.smoothing import certify as smooth_certify, make_config
    t0 = time.perf_counter()
    rep = smooth_certify(model, x, y, make_config(sigma=0.5, n=n, alpha=0.001, batch_size=1000, radii=(radius,)))
    cert = [bool(r.correct) and r.radius > radius for r in rep.results]
    return sum(cert) / len(cert), (time.perf_counter() - t0) / x.shape[0]


def _bracket(model, x, y, threat, eps, methods, suite):
    t0 = time.perf_counter()
    rep = evaluate(model, x, y, threat=threat, eps=[eps], suite=suite, certify={"methods": methods}, seed=0,
                   progress=False)
    chk = next(c for c in rep.checks if c.name == "certified_but_broken")
    row = chk.details["bracket"][0]
    return {"certified": row["certified_base"], "attacked": row["attacked_base"], "clean": rep.clean_accuracy,
            "alarms": int(chk.value), "suite": suite, "seconds": time.perf_counter() - t0}


def run(dataset, epochs, suite, n_bracket, smoothing_n, smoothing_images, hidden=64, lr=1e-3, rows=None,
        scale=0.5, save_dir=None):
    x, y, xt, yt, shape, mean, std = _data(dataset)
    out = {"dataset": dataset, "epochs": epochs, "hidden": hidden, "lr": lr, "rows": {}}
    for row, (name, opts) in _models(shape, mean, std, hidden, scale).items():
        if rows and row not in rows:
            continue
        model, t_train = _train(row, name, opts, x, y, xt, yt, epochs, lr)
        if save_dir:
            from robustdeq.checkpoint import save_checkpoint
            save_checkpoint(f"{save_dir}/{dataset}-{row}.pt", model, model_config=model.robustdeq_config)
        r = {"model": name, "params": sum(p.numel() for p in model.parameters()), "train_s": t_train,
             "clean": _accuracy(model, xt, yt)}
        if row.startswith("ibp"):
            r["linf_0.1_certified"], r["cert_s_per_image"] = _linf_certified(row, model, xt, yt, 0.1)
            r["bracket"] = _bracket(model, xt[:n_bracket], yt[:n_bracket], "Linf", 0.1, ["ibp"], suite)
        elif row.startswith("lipschitz"):
            r["l2_1.0_certified"], r["cert_s_per_image"] = _l2_certified(model, xt, yt, 1.0)
            r["l2_1.0_certified_first"], _ = _l2_certified(model, xt[:smoothing_images], yt[:smoothing_images], 1.0)
            r["bracket"] = _bracket(model, xt[:n_bracket], yt[:n_bracket], "L2", 1.0, ["lipschitz"], suite)
        else:
            r["smoothed_l2_1.0_certified"], r["cert_s_per_image"] = _smoothing(
                model, xt[:smoothing_images], yt[:smoothing_images], 1.0, smoothing_n)
        out["rows"][row] = r
        print(json.dumps({row: r}), flush=True)
    return out


def table(res) -> str:
    lines = [f"### {res['dataset']} ({res['epochs']} epochs, hidden {res['hidden']}, lr {res['lr']:g})", "",
             "| model | params | clean | certified | time / image (s) | bracket: certified <= robust <= clean (alarms) | train (s) |",
             "|---|---|---|---|---|---|---|"]
    for row, r in res["rows"].items():
        if "linf_0.1_certified" in r:
            cert = f"Linf 0.1: {100 * r['linf_0.1_certified']:.1f} %"
        elif "l2_1.0_certified" in r:
            cert = (f"L2 1.0: {100 * r['l2_1.0_certified']:.1f} % (first images: "
                    f"{100 * r['l2_1.0_certified_first']:.1f} %)")
        else:
            cert = f"L2 1.0, smoothed: {100 * r['smoothed_l2_1.0_certified']:.1f} % (first images)"
        b = r.get("bracket")
        br = (f"{100 * b['certified']:.0f} <= {100 * b['attacked']:.0f} <= {100 * b['clean']:.0f} % "
              f"({b['alarms']})") if b else "-"
        lines.append(f"| {row} | {r['params']} | {100 * r['clean']:.1f} % | {cert} | {r['cert_s_per_image']:.4f} "
                     f"| {br} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"], choices=["mnist5k", "digits"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--suite", default="standard")
    ap.add_argument("--n-bracket", type=int, default=200)
    ap.add_argument("--smoothing-n", type=int, default=2000)
    ap.add_argument("--smoothing-images", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=64, help="DEQ width (and the CNN's hidden layer on MNIST)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scale", type=float, default=0.5, help="bound on || |W| ||_2 of the IBP DEQ")
    ap.add_argument("--save-dir", default=None, help="write each trained model there as a checkpoint")
    ap.add_argument("--rows", nargs="+", default=None,
                    choices=["ibp-deq", "ibp-stem-deq", "ibp-cnn", "lipschitz-margin-deq", "noise-deq"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    for d in args.datasets:
        res = run(d, args.epochs, args.suite, args.n_bracket, args.smoothing_n, args.smoothing_images,
                  args.hidden, args.lr, args.rows, args.scale, args.save_dir)
        print(table(res), flush=True)
    print(f"bench_certified_training took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
