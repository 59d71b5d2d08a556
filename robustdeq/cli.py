"""The ``robustdeq`` command line: demo, train, attack, eval, certify, harden.

The CLI maps flags onto the library's typed configs; the library never sees argparse.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger("robustdeq.cli")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _json_arg(text: Optional[str], what: str) -> dict:
    if not text:
        return {}
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {what} must be a JSON object: {e}")
    if not isinstance(val, dict):
        raise SystemExit(f"error: {what} must be a JSON object, got {type(val).__name__}")
    return val


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _load_data(name: str, root: Optional[str], split: str, limit: Optional[int] = None):
    from .data import load_dataset
    x, y = load_dataset(name, split, root=root)
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y


# ------------------------------------------------------------------------------------ train
DEMO_MODEL = {"name": "mlp_deq",
              "options": {"hidden": 128, "mean": 0.3, "std": 0.4, "norm": "spectral", "scale": 0.9}}
DEMO_TRAIN = {"epochs": 15, "batch_size": 32, "lr": 3e-3}


def train_model(model_name: str, model_options: dict, train_options: dict, *, dataset="digits",
                root=None, out_dir=None, objective=None, progress=False, seed=0, resume=True):
    """Build a model from the zoo and train it; returns (model, history, test data)."""
    import torch
    from .deq import zoo
    from .data import dataset_info
    from .train import Trainer
    info = dataset_info(dataset)
    opts = {"in_shape": list(info["shape"]), "num_classes": info["num_classes"], **model_options}
    torch.manual_seed(seed)
    model = zoo.build(model_name, **opts)
    x, y = _load_data(dataset, root, "train")
    xt, yt = _load_data(dataset, root, "test")
    trainer = Trainer(model, objective, {"seed": seed, **train_options}, out_dir=out_dir,
                      progress=progress, metadata={"dataset": dataset})
    hist = trainer.fit(x, y, xt, yt, resume=resume)
    return model, hist, (xt, yt)


def cmd_train(args) -> int:
    from .defenses.recipes import recipe
    rec = recipe(args.defense, **_json_arg(args.defense_options, "--defense-options"))
    objective = rec.objective
    model_opts = _json_arg(args.model_options, "--model-options")
    if rec.model is not None:
        args.model = rec.model
    model, hist, _ = train_model(args.model, model_opts,
                                 {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                  **_json_arg(args.train_options, "--train-options")},
                                 dataset=args.dataset, root=args.data_root, out_dir=args.out,
                                 objective=objective, progress=not args.no_progress, seed=args.seed,
                                 resume=not args.no_resume)
    last = hist[-1] if hist else {}
    print(f"trained {args.model} on {args.dataset}: test accuracy {last.get('val_accuracy', float('nan')):.4f}; "
          f"checkpoint {Path(args.out) / 'checkpoint.pt'}")
    return 0


# ------------------------------------------------------------------------------------- demo
def solver_table(summary: dict) -> str:
    rows = [["test accuracy", f"{summary['test_accuracy']:.4f}"],
            ["mean solver iterations", f"{summary['solver']['mean_steps']:.2f}"],
            ["converged fraction", f"{summary['solver']['converged_fraction']:.4f}"],
            ["mean final residual", f"{summary['solver']['mean_residual']:.2e}"],
            ["max final residual", f"{summary['solver']['max_residual']:.2e}"],
            ["training time (s)", f"{summary['train_time_s']:.1f}"]]
    return _table(rows, ["metric", "value"])


DEMO_ROWS = (("PGD (IFT)", "pgd-ift"), ("PGD (unrolled)", "pgd-unrolled"),
             ("intermediate-state", "state"), ("AutoAttack standard", "autoattack"))


def demo_rows(report) -> dict:
    """Accuracy after each attack group of a cascaded ``standard`` evaluation, per eps."""
    out = {}
    for r in report.results:
        col = {"clean": report.clean_accuracy}
        for label, prefix in DEMO_ROWS:
            hits = [a for a in r.attacks if a.spec.startswith(prefix)]
            col[label] = hits[-1].cumulative_accuracy if hits else None
        col["worst case"] = r.robust_accuracy
        out[f"{r.eps:g}"] = col
    return out


def _demo_eval(model, x, y, out_dir, progress):
    from .eval import evaluate
    return evaluate(model, x, y, threat="Linf", eps=[0.1, 0.2], suite="standard", steps=20, seed=0,
                    cascade=True, out_dir=out_dir, progress=progress)


def cmd_demo(args) -> int:
    from .train import evaluate_clean
    from .defenses.recipes import recipe
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    train_opts = dict(DEMO_TRAIN)
    if args.epochs is not None:
        train_opts["epochs"] = args.epochs
    model, hist, (xt, yt) = train_model(DEMO_MODEL["name"], DEMO_MODEL["options"], train_opts,
                                        out_dir=out / "undefended", progress=progress,
                                        seed=args.seed, resume=not args.no_resume)
    train_time = sum(h.get("epoch_time_s", 0.0) for h in hist)  # per-epoch compute (resume-safe)
    ev = evaluate_clean(model, xt, yt)
    summary = {
        "dataset": "digits", "model": DEMO_MODEL, "train": train_opts, "train_time_s": train_time,
        "test_accuracy": ev["accuracy"],
        "solver": {k: ev[k] for k in ("mean_steps", "converged_fraction", "mean_residual", "max_residual")},
        "checkpoint": str(out / "undefended" / "checkpoint.pt"),
        "tensorboard": str(out / "undefended" / "tb"),
    }
    print("== robustdeq demo: DEQ on scikit-learn digits ==")
    print(solver_table(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.skip_eval:
        print(f"\nwrote {out / 'summary.json'}, {summary['checkpoint']}, TensorBoard log {summary['tensorboard']}")
        return 0

    n = min(args.samples, xt.shape[0])
    xs, ys = xt[:n], yt[:n]
    # the hardened model: same architecture, trained with the chosen recipe
    rec = recipe(args.defense, eps=0.1) if args.defense != "none" else recipe("none")
    hard_opts = dict(DEMO_MODEL["options"]) if rec.model is None else {"hidden": 128, "mean": 0.3, "std": 0.4}
    hard, hhist, _ = train_model(rec.model or DEMO_MODEL["name"], hard_opts, train_opts,
                                 out_dir=out / args.defense, objective=rec.objective, progress=progress,
                                 seed=args.seed, resume=not args.no_resume)
    summary["hardened"] = {"defense": args.defense, "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in hhist),
                           "test_accuracy": evaluate_clean(hard, xt, yt)["accuracy"],
                           "checkpoint": str(out / args.defense / "checkpoint.pt")}
    reports = {"undefended": _demo_eval(model, xs, ys, out / "eval_undefended", progress),
               args.defense: _demo_eval(hard, xs, ys, out / f"eval_{args.defense}", progress)}
    tables = {name: demo_rows(rep) for name, rep in reports.items()}
    header = ["attack (accuracy after it, Linf)"] + [f"{name} eps {e}" for name in tables for e in tables[name]]
    labels = ["clean"] + [l for l, _ in DEMO_ROWS] + ["worst case"]
    rows = []
    for label in labels:
        row = [label]
        for name in tables:
            for e, col in tables[name].items():
                v = col.get(label)
                row.append("n/a" if v is None else f"{100 * v:.1f}%")
        rows.append(row)
    print(f"\n== robustness on {n} test samples (standard suite, cascaded: each row is the accuracy "
          "after that attack and every one above it) ==")
    print(_table(rows, header))
    fired = {name: rep.fired for name, rep in reports.items() if rep.fired}
    if fired:
        print(f"checks that fired: {fired}")
    summary["robustness"] = {"samples": n, "tables": tables, "checks_fired": fired,
                             "reports": {name: str(out / f"eval_{name}") for name in reports}}

    from .certify import certify
    cert = certify(model, xs, ys, eps_l2=(0.1, 0.25, 0.5))
    cert.save(out / "certificate")
    summary["certificate"] = cert.summary
    print(f"\n== certificate of the undefended DEQ ({n} test samples) ==")
    print(cert.brief())
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {out / 'summary.json'}, checkpoints, evaluation reports and TensorBoard logs under {out}")
    return 0


# ---------------------------------------------------------------------------- attack / eval
WRAPPERS = ("none", "entropy")


def _load_for_eval(args):
    """Load a checkpoint (and wrap it in an inference-time defense), plus the evaluation data."""
    from .checkpoint import load_model
    model, ck = load_model(args.checkpoint)
    model.eval()
    dataset = args.dataset or json.loads(json.dumps(ck.metadata)).get("dataset", "digits")
    x, y = _load_data(dataset, args.data_root, args.split, args.n)
    model = wrap_model(model, args.wrap, _json_arg(args.wrap_options, "--wrap-options"))
    return model, x, y


def wrap_model(model, wrap: str, options: dict):
    """Wrap ``model`` in the inference-time defense ``wrap`` ("none" returns it unchanged)."""
    from .errors import ConfigError
    if wrap not in WRAPPERS:
        raise ConfigError(f"unknown inference-time defense {wrap!r}; expected one of {', '.join(WRAPPERS)}")
    if wrap == "entropy":
        from .defenses.entropy import EntropyDefense
        return EntropyDefense(model, **options).eval()
    return model


def cmd_attack(args) -> int:
    import torch
    from . import attacks
    model, x, y = _load_for_eval(args)
    eps = _floats(args.eps)
    if len(eps) != 1:
        raise SystemExit(f"error: attack takes one --eps, got {args.eps!r}")
    params = {"eps": eps[0], "norm": args.norm, "seed": args.seed, **_json_arg(args.options, "--options")}
    if args.attack in ("pgd", "state"):
        params.setdefault("steps", args.steps)
    if args.grad and args.attack in ("pgd", "fgsm"):
        params["grad"] = args.grad
    atk = attacks.build(args.attack, model, **params)
    t0 = time.perf_counter()
    x_adv = atk(x, y)
    dt = time.perf_counter() - t0
    clean = attacks.accuracy(model, x, y)
    robust_flags = attacks.predict(model, x_adv) == y
    robust = float((robust_flags & (attacks.predict(model, x) == y)).float().mean())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x_adv": x_adv.cpu(), "x": x.cpu(), "y": y.cpu(), "robust": robust_flags.cpu(),
                "attack": json.dumps(atk.describe(), default=str)}, out)
    print(_table([[atk.name, f"{clean:.4f}", f"{robust:.4f}", f"{dt:.1f}"]],
                 ["attack", "clean accuracy", "robust accuracy", "time (s)"]))
    print(f"\nwrote adversarial examples to {out} (load with torch.load(path, weights_only=True))")
    return 0


def cmd_eval(args) -> int:
    from .eval import evaluate
    model, x, y = _load_for_eval(args)
    rep = evaluate(model, x, y, threat=args.norm, eps=list(_floats(args.eps)), suite=args.suite,
                   steps=args.steps, seed=args.seed, out_dir=args.out, resume=not args.no_resume,
                   progress=not args.no_progress, tensorboard=bool(args.out))
    print(rep.to_markdown())
    if rep.fired:
        print(f"\nchecks that fired: {', '.join(rep.fired)}")
    if args.out:
        print(f"\nwrote {Path(args.out) / 'report.json'}, report.md and plots")
    return 0


def cmd_harden(args) -> int:
    """Evaluate a checkpoint with and without an inference-time defense, side by side."""
    from .eval import evaluate
    args_plain = argparse.Namespace(**{**vars(args), "wrap": "none"})
    plain, x, y = _load_for_eval(args_plain)
    defended = wrap_model(plain, args.wrap, _json_arg(args.wrap_options, "--wrap-options"))
    rows = []
    for name, m in (("as trained", plain), (f"+ {args.wrap}", defended)):
        out = Path(args.out) / name.replace(" ", "_").replace("+", "with") if args.out else None
        rep = evaluate(m, x, y, threat=args.norm, eps=list(_floats(args.eps)), suite=args.suite,
                       steps=args.steps, seed=args.seed, out_dir=out, progress=not args.no_progress)
        rows.append([name, f"{rep.clean_accuracy:.4f}"] + [f"{r.robust_accuracy:.4f}" for r in rep.results]
                    + [", ".join(rep.fired) or "-"])
    eps_cols = [f"robust @ {args.norm} {e:g}" for e in _floats(args.eps)]
    print(_table(rows, ["model", "clean"] + eps_cols + ["checks fired"]))
    return 0


def _add_eval_args(p, *, eps_default: str) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's dataset")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("-n", type=int, default=200, help="number of samples (default 200)")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--eps", default=eps_default)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wrap", default="none", choices=list(WRAPPERS), help="inference-time defense")
    p.add_argument("--wrap-options", default=None, help="JSON options of the inference-time defense")
    p.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------------------------- certify
def _floats(text: Optional[str]) -> tuple:
    if not text:
        return ()
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise SystemExit(f"error: expected comma-separated numbers, got {text!r}")


def cmd_certify(args) -> int:
    from .certify.api import certify_checkpoint
    rep = certify_checkpoint(args.checkpoint, dataset=args.dataset, split=args.split, root=args.data_root,
                             n=args.n, out_dir=args.out, eps_l2=_floats(args.eps_l2),
                             eps_linf=_floats(args.eps_linf), progress=not args.no_progress)
    print(rep.to_markdown())
    if args.out:
        print(f"\nwrote {Path(args.out) / 'certificate.json'} and certificate.md")
    return 0


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustdeq", description="Adversarial robustness of deep equilibrium models")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the zoo's small models run fastest on one; 0 = torch default)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a DEQ on the bundled digits and report (default job)")
    d.add_argument("--out", default="robustdeq-demo", help="output folder (default ./robustdeq-demo)")
    d.add_argument("--epochs", type=int, default=None, help="override the number of training epochs")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--samples", type=int, default=100, help="test samples for the evaluation and certificate (AutoAttack on a DEQ costs about a second per sample)")
    d.add_argument("--defense", default="jiio-at", help="training recipe of the hardened model (see robustdeq train)")
    d.add_argument("--skip-eval", action="store_true", help="only train and report the undefended DEQ")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--no-resume", action="store_true", help="retrain even if a checkpoint exists")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model from the zoo")
    t.add_argument("--model", default="mlp_deq", help="zoo name (mlp_deq, conv_deq, mon_deq, lyadeq, ...)")
    t.add_argument("--model-options", default=None, help='JSON, e.g. \'{"hidden": 64}\'')
    t.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar10", "synthetic"])
    t.add_argument("--data-root", default=None, help="folder with MNIST idx / CIFAR-10 binary files")
    t.add_argument("--defense", default="none",
                   help="none, pgd-at, pgd-at-random-state, trades, trades-random-state, jiio-at, lyadeq, lyadeq-at")
    t.add_argument("--defense-options", default=None, help="JSON options of the training objective")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--train-options", default=None, help="JSON, other TrainConfig options")
    t.add_argument("--out", required=True, help="output folder (checkpoint.pt, history.json, tb/)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-resume", action="store_true")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("attack", help="run one attack on a checkpoint and save the adversarial examples")
    _add_eval_args(a, eps_default="0.1")
    a.add_argument("--attack", default="pgd", help="fgsm, pgd, state, autoattack, torchattack, jiio")
    a.add_argument("--grad", default=None, help="gradient for pgd/fgsm: ift, phantom, unrolled, full")
    a.add_argument("--options", default=None, help="JSON, other attack parameters")
    a.add_argument("--out", default="adversarial.pt")
    a.set_defaults(func=cmd_attack)

    e = sub.add_parser("eval", help="run an evaluation suite on a checkpoint and write the report")
    _add_eval_args(e, eps_default="0.1,0.2")
    e.add_argument("--suite", default="standard", choices=["quick", "standard", "full"])
    e.add_argument("--out", default=None, help="folder for report.json, report.md, plots, partial results")
    e.add_argument("--no-resume", action="store_true")
    e.set_defaults(func=cmd_eval)

    h = sub.add_parser("harden", help="wrap a checkpoint in an inference-time defense and evaluate both")
    _add_eval_args(h, eps_default="0.1,0.2")
    h.set_defaults(wrap="entropy")
    h.add_argument("--suite", default="quick", choices=["quick", "standard", "full"])
    h.add_argument("--out", default=None)
    h.set_defaults(func=cmd_harden)

    c = sub.add_parser("certify", help="certify stability and robustness of a checkpoint")
    c.add_argument("checkpoint")
    c.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar10", "synthetic"])
    c.add_argument("--data-root", default=None)
    c.add_argument("--split", default="test")
    c.add_argument("-n", type=int, default=None, help="number of samples (default: the whole split)")
    c.add_argument("--eps-l2", default="0.1,0.25,0.5", help="comma-separated L2 radii")
    c.add_argument("--eps-linf", default="", help="comma-separated Linf radii (IBP)")
    c.add_argument("--out", default=None, help="folder for certificate.json / certificate.md")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_certify)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    from .errors import RobustDEQError
    try:
        return int(args.func(args) or 0)
    except RobustDEQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
