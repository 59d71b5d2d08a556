"""Defenses on digits: clean / robust accuracy, training time per epoch, inference time.

    python benchmarks/bench_defenses.py [--epochs 10] [--n-eval 200] [--n-eval-ier 50]
        [--out /tmp/robustdeq_bench_defenses] [--only KEY ...] [--force] [--table benchmarks/defenses_table.md]

About an hour on a shared 2-core CPU (training is ~4 min of it; AutoAttack inside the ``standard``
suite is ~95% of the evaluation time, and the input-entropy-reduction row, attacked through the
defense and its two adaptive views, is the most expensive: ~40 min for 50 samples). Rows can run
in separate processes with the same ``--out`` (``--only trades+ier`` once ``trades`` is trained).

Rows (all trained on ``load_digits("train")`` with the same optimiser, schedule, epochs, batch size
and seed; the adversarial objectives with Linf eps = 0.1):

==================  =========================================================================
``undefended``      ``mlp_deq`` (hidden 64), cross-entropy
``pgd-at``          ``mlp_deq``, PGD-AT, 7 steps (alpha = 2.5 eps / 7), warm-started IFT
``trades``          ``mlp_deq``, TRADES (beta 6, 10 KL steps)
``trades-ris``      ``mlp_deq``, TRADES on random intermediate states (Yang et al. 2023), n ~ U{1..8}
                    (the paper's forward budget N = 8; the model's own max_iter is 30)
``lyadeq``          ``zoo.build("lyadeq")`` (same backbone options), CE + Lyapunov penalty
``lyadeq-at``       LyaDEQ, PGD-AT-7 + Lyapunov penalty
``trades+ier``      the ``trades`` model wrapped in ``EntropyDefense`` (inference time only)
``jiio-at``         ``mlp_deq``, JIIO-AT (JIIOAT's defaults: 14 JIIO iterations, select
                    "next", fixed-point, sign steps; 20, "best" before 2026-12-01)
``ff-cnn-pgd-at``   ``ff_cnn`` (channels 20: parameter count close to the DEQ), PGD-AT-7
==================  =========================================================================

Each model is evaluated with ``robustdeq.eval.evaluate`` (Linf, eps 0.1 and 0.2, the ``standard``
suite: PGD with IFT and unrolled gradients, intermediate-state attacks and their ensemble,
AutoAttack standard; for the defense also every adaptive view; ``cascade=True``, i.e. every attack
runs on the samples all earlier attacks left robust, which keeps the per-sample worst case exact)
on the first ``--n-eval`` test samples (the input-entropy-reduction row on the first ``--n-eval-ier``
of them, with TRADES reported on the same prefix). Robust accuracy = the report's per-sample worst case over
all attacks and views.

Training time per epoch = mean ``epoch_time_s`` of the Trainer history (one thread); inference
time = median over repeats of one clean forward of the whole evaluation batch, per sample.

Everything is resumable: the Trainer checkpoints every epoch under ``OUT/<key>/train``, the
harness keeps finished attack units under ``OUT/<key>/eval/partial``, and each finished row is
written to ``OUT/<key>.json`` (skipped on the next run unless ``--force``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

EPS_TRAIN = 0.1
EPS_EVAL = (0.1, 0.2)
DEQ_OPTIONS = dict(hidden=64, mean=0.3, std=0.4)
FF_OPTIONS = dict(channels=20)

# key -> (label, architecture, options, recipe name, recipe options)
ROWS = {
    "undefended": ("DEQ, undefended", "mlp_deq", DEQ_OPTIONS, "none", {}),
    "pgd-at": ("DEQ + PGD-AT-7", "mlp_deq", DEQ_OPTIONS, "pgd-at", dict(eps=EPS_TRAIN, steps=7)),
    "trades": ("DEQ + TRADES", "mlp_deq", DEQ_OPTIONS, "trades", dict(eps=EPS_TRAIN)),
    "trades-ris": ("DEQ + TRADES, random intermediate states", "mlp_deq", DEQ_OPTIONS,
                   "trades-random-state", dict(eps=EPS_TRAIN, max_state=8)),
    "lyadeq": ("LyaDEQ", "lyadeq", DEQ_OPTIONS, "lyadeq", {}),
    "lyadeq-at": ("LyaDEQ + PGD-AT-7", "lyadeq", DEQ_OPTIONS, "lyadeq-at", dict(eps=EPS_TRAIN, steps=7)),
    "trades+ier": ("DEQ + TRADES + input-entropy reduction", None, None, None, None),
    "jiio-at": ("DEQ + JIIO-AT", "mlp_deq", DEQ_OPTIONS, "jiio-at", dict(eps=EPS_TRAIN)),
    "ff-cnn-pgd-at": ("feed-forward CNN + PGD-AT-7", "ff_cnn", FF_OPTIONS, "pgd-at",
                      dict(eps=EPS_TRAIN, steps=7)),
}
DEQ_KEYS = ("undefended", "pgd-at", "trades", "trades-ris", "lyadeq", "lyadeq-at", "trades+ier", "jiio-at")
DEQ_DEFENSES = tuple(k for k in DEQ_KEYS if k != "undefended")


def ier_options(eps_train: float) -> dict:
    """EntropyDefense settings for digits: the paper's 4 rounds x (2 solver steps, 10 input steps),
    radius = the training eps (the paper: 8/255 = its eps on CIFAR-10), step = radius / 4 (the
    paper: 2/255 = (8/255) / 4)."""
    return dict(rounds=4, solver_steps=2, inner_steps=10, radius=eps_train, step_size=eps_train / 4)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def predict_params(model) -> int:
    """Parameters on the x -> logits path (LyaDEQ's Lyapunov network only shapes training)."""
    lya = getattr(model, "lyapunov_fn", None)
    return n_params(model) - (n_params(lya) if lya is not None else 0)


def train_row(key, out, args, x, y):
    from robustdeq.config import TrainConfig
    from robustdeq.defenses.recipes import recipe
    from robustdeq.deq import zoo
    from robustdeq.train import Trainer
    _, arch, options, rname, ropts = ROWS[key]
    rec = recipe(rname, **dict(ropts))
    if rec.model is not None and rec.model != arch:
        raise RuntimeError(f"recipe {rname} needs architecture {rec.model}, the row uses {arch}")
    torch.manual_seed(args.seed)
    model = zoo.build(arch, **options)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer="adam",
                      schedule="cosine", seed=args.seed)
    trainer = Trainer(model, rec.objective, cfg, out_dir=out / key / "train", tensorboard=False)
    counts = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        history = trainer.fit(x, y)
        wall = time.perf_counter() - t0
    for w in caught:
        counts[w.category.__name__] = counts.get(w.category.__name__, 0) + 1
    describe = getattr(rec.objective, "describe", None)
    info = {"recipe": rname, "recipe_options": ropts, "architecture": arch, "options": options,
            "objective": describe() if callable(describe) else type(rec.objective).__name__,
            "history": history, "train_wall_s_this_run": wall, "train_warnings": counts}
    return model, info


def inference_ms(model, x, repeats: int) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        model(x[:8])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / x.shape[0]


def eval_row(key, model, out, args, xt, yt):
    from robustdeq.eval import evaluate

    def cb(d):
        print(f"    [{key}] eps {d['eps']:g} {d['key']}: worst case so far {d['cumulative_accuracy']:.3f}"
              + (" (resumed)" if d["resumed"] else ""), flush=True)

    counts = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        report = evaluate(model, xt, yt, threat="Linf", eps=list(EPS_EVAL), suite="standard",
                          cascade=True, out_dir=out / key / "eval", seed=0, callback=cb)
        wall = time.perf_counter() - t0
    for w in caught:
        counts[w.category.__name__] = counts.get(w.category.__name__, 0) + 1
    res = {
        "clean_accuracy": report.clean_accuracy,
        "n": int(xt.shape[0]),
        "robust_accuracy": {str(r.eps): r.robust_accuracy for r in report.results},
        "robust_flags": {str(r.eps): [bool(v) for v in r.robust] for r in report.results},
        "clean_flags": [f != "clean" for f in report.results[0].first_success],
        "attacks": {str(r.eps): [{"key": a.key, "cumulative_accuracy": a.cumulative_accuracy,
                                  "new_successes": a.new_successes, "seconds": a.seconds,
                                  "resumed": a.resumed} for a in r.attacks] for r in report.results},
        "checks": [{"name": c.name, "fired": c.fired, "skipped": c.skipped, "message": c.message,
                    "value": c.value} for c in report.checks],
        "notes": report.notes, "timings": report.timings, "eval_wall_s_this_run": wall,
        "eval_warnings": counts,
        "solver": report.clean.get("solver") if isinstance(report.clean, dict) else None,
    }
    return res


def run_row(key, out, args, data, models):
    x, y, xt, yt = data
    path = out / f"{key}.json"
    if path.is_file() and not args.force:
        print(f"== {key}: done earlier ({path})", flush=True)
        return json.loads(path.read_text())
    print(f"== {key}: {ROWS[key][0]}", flush=True)
    t0 = time.perf_counter()
    if key == "trades+ier":
        from robustdeq.defenses.entropy import EntropyDefense
        if "trades" not in models:  # trained in an earlier run: the Trainer resumes at its last epoch
            models["trades"] = train_row("trades", out, args, x, y)
        base, tinfo = models["trades"]
        base.eval()
        model = EntropyDefense(base, **ier_options(EPS_TRAIN))
        info = {"defense": model.describe(), "wraps": "trades", "history": tinfo["history"]}
        xt, yt = xt[:args.n_eval_ier], yt[:args.n_eval_ier]
    else:
        model, info = train_row(key, out, args, x, y)
        models[key] = (model, info)
    model.eval()
    hist = info.get("history") or []
    epoch_times = [h["epoch_time_s"] for h in hist]
    row = {
        "key": key, "label": ROWS[key][0],
        "params": n_params(model), "predict_params": predict_params(model),
        "train": info,
        "train_s_per_epoch": statistics.mean(epoch_times) if epoch_times else None,
        "inference_ms_per_sample": inference_ms(model, xt, args.repeats),
    }
    row["eval"] = eval_row(key, model, out, args, xt, yt)
    row["row_wall_s_this_run"] = time.perf_counter() - t0
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row, indent=1, default=str))
    os.replace(tmp, path)
    ra = row["eval"]["robust_accuracy"]
    print(f"== {key}: clean {row['eval']['clean_accuracy']:.3f}, robust "
          + ", ".join(f"eps {e}: {v:.3f}" for e, v in ra.items())
          + f", {row['train_s_per_epoch'] or 0:.1f} s/epoch, row took {row['row_wall_s_this_run']:.0f} s",
          flush=True)
    return row


def fmt_pct(v):
    return "—" if v is None else f"{100 * v:.1f}"


def table(rows, args) -> str:
    e1, e2 = (str(e) for e in EPS_EVAL)
    lines = [
        f"| model | params | clean acc (%) | robust acc eps {e1} (%) | robust acc eps {e2} (%) "
        "| train s/epoch | inference ms/sample |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in ROWS:
        r = rows.get(key)
        if r is None:
            continue
        p = f"{r['params']:,}"
        if r["predict_params"] != r["params"]:
            p += f" ({r['predict_params']:,} on the x→logits path)"
        tr = "—" if r["train_s_per_epoch"] is None else f"{r['train_s_per_epoch']:.1f}"
        if key == "trades+ier":
            tr += " (TRADES; IER adds no training)"
        ra = r["eval"]["robust_accuracy"]
        label = r["label"] + (f" (first {r['eval']['n']} samples)" if r["eval"]["n"] != args.n_eval else "")
        lines.append(f"| {label} | {p} | {fmt_pct(r['eval']['clean_accuracy'])} | {fmt_pct(ra.get(e1))} "
                     f"| {fmt_pct(ra.get(e2))} | {tr} | {r['inference_ms_per_sample']:.3f} |")
    return "\n".join(lines)


def controlled_timing(out, args, x, y) -> dict:
    """PGD-AT-7 vs JIIO-AT training cost under the same load: one pass over the training set
    (objective + backward, no optimiser step, so the model does not change) with each objective,
    interleaved ``--timing-repeats`` times, on each of the two trained models; the minimum per
    objective is robust to other load on the machine."""
    path = out / "timing.json"
    if path.is_file() and not args.force:
        return json.loads(path.read_text())
    from robustdeq.data import make_loader
    from robustdeq.defenses.recipes import recipe
    objectives = {k: recipe(ROWS[k][3], **dict(ROWS[k][4])).objective for k in ("pgd-at", "jiio-at")}
    res = {}
    for mkey in ("pgd-at", "jiio-at"):
        model, _ = train_row(mkey, out, args, x, y)  # resumes at the last epoch: no training
        model.train()
        times = {k: [] for k in objectives}
        for rep in range(args.timing_repeats):
            for okey, obj in objectives.items():
                loader = make_loader(x, y, args.batch_size, shuffle=True, seed=args.seed + rep)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    for xb, yb in loader:
                        model.zero_grad(set_to_none=True)
                        loss, _ = obj(model, xb, yb)
                        loss.backward()
                    times[okey].append(time.perf_counter() - t0)
        res[mkey] = {k: {"min_s": min(v), "all_s": v} for k, v in times.items()}
        res[mkey]["ratio_pgd_over_jiio"] = min(times["pgd-at"]) / min(times["jiio-at"])
        print(f"   timing on the {mkey} model: PGD-AT-7 {min(times['pgd-at']):.2f} s/epoch, "
              f"JIIO-AT {min(times['jiio-at']):.2f} s/epoch, ratio {res[mkey]['ratio_pgd_over_jiio']:.2f}",
              flush=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)
    return res


def goals(rows, args, timing=None) -> list:
    e1 = str(EPS_EVAL[0])
    out = []
    ff = rows.get("ff-cnn-pgd-at")
    # rows evaluated on fewer samples are not comparable here (see the subset note)
    deq = {k: rows[k] for k in DEQ_DEFENSES if k in rows and rows[k]["eval"]["n"] == args.n_eval}
    if ff and deq:
        for e in (str(e) for e in EPS_EVAL):
            best = max(deq, key=lambda k: deq[k]["eval"]["robust_accuracy"][e])
            b = deq[best]["eval"]["robust_accuracy"][e]
            f = ff["eval"]["robust_accuracy"][e]
            out.append(f"- Best DEQ defense vs feed-forward PGD-AT at eps {e}: {deq[best]['label']} "
                       f"{fmt_pct(b)}% vs {fmt_pct(f)}% -> **{'met' if b > f else 'not met'}**")
    j, p = rows.get("jiio-at"), rows.get("pgd-at")
    if j and p:
        ratio = p["train_s_per_epoch"] / j["train_s_per_epoch"]
        diffs = {e: j["eval"]["robust_accuracy"][e] - p["eval"]["robust_accuracy"][e] for e in (str(e) for e in EPS_EVAL)}
        speed_ok = ratio >= 3
        acc_ok = diffs[e1] >= -0.02
        controlled = ""
        if timing:
            rs = [timing[m]["ratio_pgd_over_jiio"] for m in ("pgd-at", "jiio-at") if m in timing]
            controlled = (" (Trainer history, rows trained at different times on a shared machine); "
                          "interleaved under the same load: "
                          + " and ".join(f"{timing[m]['ratio_pgd_over_jiio']:.2f}x on the {m} model"
                                         for m in ("pgd-at", "jiio-at") if m in timing))
            borderline = any(r >= 3 for r in rs + [ratio]) and not all(r >= 3 for r in rs + [ratio])
            speed_ok = speed_ok and all(r >= 3 for r in rs)
        else:
            borderline = False
        out.append(f"- JIIO-AT vs PGD-AT-7: {ratio:.2f}x faster per epoch{controlled} (goal >= 3x: "
                   f"**{'met' if speed_ok else 'not met'}**{' (borderline)' if borderline else ''}); robust accuracy difference at eps {e1} "
                   f"{100 * diffs[e1]:+.1f} points (goal >= -2: **{'met' if acc_ok else 'not met'}**; "
                   f"at eps {EPS_EVAL[1]}: {100 * diffs[str(EPS_EVAL[1])]:+.1f} points) -> "
                   f"**{'met' if speed_ok and acc_ok else 'not met'}**")
    return out


def subset_notes(rows, args) -> list:
    """Rows evaluated on a prefix of the test samples, and TRADES on the same prefix."""
    out = []
    t = rows.get("trades")
    for key, r in rows.items():
        n = r["eval"]["n"]
        if n == args.n_eval or t is None or len(t["eval"]["clean_flags"]) < n:
            continue
        clean = sum(t["eval"]["clean_flags"][:n]) / n
        rob = {e: sum(f[:n]) / n for e, f in t["eval"]["robust_flags"].items()}
        out.append(f"- {r['label']} was evaluated on the first {n} test samples only (cost); on the "
                   f"same samples DEQ + TRADES (undefended by IER) has clean {fmt_pct(clean)}%, robust "
                   + ", ".join(f"{fmt_pct(v)}% at eps {e}" for e, v in rob.items()) + ".")
    return out


def checks_summary(rows) -> list:
    out = []
    for key in ROWS:
        r = rows.get(key)
        if r is None:
            continue
        fired = [c for c in r["eval"]["checks"] if c["fired"]]
        skipped = [c["name"] for c in r["eval"]["checks"] if c.get("skipped")]
        if fired:
            for c in fired:
                out.append(f"- {r['label']}: `{c['name']}` fired: {c['message']}")
        if skipped:
            out.append(f"- {r['label']}: skipped checks: {', '.join(skipped)}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--n-eval-ier", type=int, default=50,
                    help="test samples for the input-entropy-reduction row (a prefix of the --n-eval "
                         "ones); TRADES is also reported on that prefix")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing-repeats", type=int, default=3,
                    help="interleaved PGD-AT-7 / JIIO-AT epoch passes for the controlled timing (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/robustdeq_bench_defenses")
    ap.add_argument("--table", default=str(Path(__file__).resolve().parent / "defenses_table.md"))
    ap.add_argument("--only", nargs="+", choices=list(ROWS), help="run only these rows")
    ap.add_argument("--force", action="store_true", help="recompute rows already written")
    args = ap.parse_args(argv)
    if args.n_eval_ier is None or args.n_eval_ier > args.n_eval:
        args.n_eval_ier = args.n_eval

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from robustdeq.data import load_digits
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    xt, yt = xt[:args.n_eval], yt[:args.n_eval]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows, models = {}, {}
    keys = args.only or list(ROWS)
    for key in ROWS:  # table order; trades before trades+ier
        if key in keys:
            rows[key] = run_row(key, out, args, (x, y, xt, yt), models)
    for key in ROWS:  # rows finished by earlier runs
        if key not in rows and (out / f"{key}.json").is_file():
            rows[key] = json.loads((out / f"{key}.json").read_text())
    timing = None
    if args.timing_repeats > 0 and "pgd-at" in rows and "jiio-at" in rows:
        print("== controlled timing: PGD-AT-7 vs JIIO-AT, interleaved", flush=True)
        timing = controlled_timing(out, args, x, y)
    total = time.perf_counter() - t_start
    walls = {k: r.get("row_wall_s_this_run") for k, r in rows.items()}

    header = (f"Digits (scikit-learn, 8x8), {x.shape[0]} training / first {xt.shape[0]} test samples; "
              f"{args.epochs} epochs, Adam lr {args.lr:g} (cosine), batch {args.batch_size}, seed {args.seed}; "
              f"adversarial training at Linf eps {EPS_TRAIN}; evaluation: robustdeq.eval.evaluate, "
              f"suite `standard`, cascade, 20 steps, worst case over all attacks and views. "
              f"Input-entropy reduction: {ier_options(EPS_TRAIN)}. "
              f"Torch {torch.__version__}, {args.threads} thread(s), {platform.machine()} "
              f"({os.cpu_count()} cores, shared). Train and inference times are wall clock on that shared "
              f"machine, measured row by row at different times; the interleaved PGD-AT / JIIO-AT timing "
              f"under Goals is the load-robust comparison.")
    text = "\n".join([header, "", table(rows, args), "", *subset_notes(rows, args), "", "Goals:", *goals(rows, args, timing), "",
                      "Gradient-masking and DEQ checks that fired:", *(checks_summary(rows) or ["- none"])])
    print()
    print(text)
    text += ("\n\nWall time per row when it was computed (training + evaluation, s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in walls.items() if v is not None) + "\n")
    print(f"\nthis run took {total:.0f} s")
    Path(args.table).write_text(text)


if __name__ == "__main__":
    main()
