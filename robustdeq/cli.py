"""The ``robustdeq`` command line: demo, train, attack, eval, certify, harden, federate.

The CLI maps flags onto the library's typed configs; the library never sees argparse.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from ._support import round_floats
from .config import Norm

logger = logging.getLogger("robustdeq.cli")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _json_arg(text: Optional[str], what: str) -> dict:
    from .errors import ConfigError
    if not text:
        return {}
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} must be a JSON object, e.g. '{{\"key\": 1}}': {e}") from None
    if not isinstance(val, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(val).__name__} {text!r}")
    return val


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``robustdeq: error: ...``, exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"robustdeq: error: {message}{hint}\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if val < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {val}")
        return val
    parse.__name__ = "int"
    return parse


def _positive_float(text: str) -> float:
    import math
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (val > 0 and math.isfinite(val)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return val


_positive_float.__name__ = "float"


def _out_folder(path: Optional[str], flag: str = "--out") -> Optional[Path]:
    """``path`` as an output folder: an existing file there is a ConfigError naming ``flag``."""
    from .errors import ConfigError
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file; {flag} names an output folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return p


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _load_data(name: str, root: Optional[str], split: str, limit: Optional[int] = None):
    from .data import load_dataset
    from .errors import DataError
    try:
        x, y = load_dataset(name, split, root=root)
    except DataError as e:
        if root is None and "root=" in str(e):  # the library's wording names the Python argument
            raise DataError(f"dataset {name!r} is read from a local folder: pass --data-root <folder> "
                            "(nothing is downloaded)") from None
        raise
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y


# ------------------------------------------------------------------------------------ train
DEMO_MODEL = {"name": "mlp_deq",
              "options": {"hidden": 128, "mean": 0.3, "std": 0.4, "norm": "spectral", "scale": 0.9}}
DEMO_TRAIN = {"epochs": 15, "batch_size": 32, "lr": 3e-3}
#: ``robustdeq train``'s defaults are the demo's recipe (about 0.98 test accuracy on digits)
DIGITS_STATS = ("mean", "std")


def default_model_options(model: str, dataset: str) -> dict:
    """The options ``robustdeq train`` uses for ``model`` unless ``--model-options`` overrides them:
    the demo's for ``mlp_deq`` (its input statistics on digits only)."""
    if model != DEMO_MODEL["name"]:
        return {}
    return {k: v for k, v in DEMO_MODEL["options"].items() if dataset == "digits" or k not in DIGITS_STATS}


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
    user_opts = _json_arg(args.model_options, "--model-options")
    if rec.model is not None:
        if args.model is not None and args.model != rec.model:
            from .errors import ConfigError
            raise ConfigError(f"--defense {args.defense} trains its own architecture ({rec.model}), not "
                              f"--model {args.model}: drop --model or choose another defense")
        args.model = rec.model
    args.model = args.model or "mlp_deq"
    model_opts = {**default_model_options(args.model, args.dataset), **user_opts}
    _out_folder(args.out)
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
    out = _out_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    train_opts = dict(DEMO_TRAIN)
    if args.epochs is not None:
        train_opts["epochs"] = args.epochs
    print(f"training the undefended DEQ ({train_opts['epochs']} epochs) into {out / 'undefended'}",
          flush=True)
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
    (out / "summary.json").write_text(json.dumps(round_floats(summary), indent=2))
    if args.skip_eval:
        print(f"\nwrote {out / 'summary.json'}, {summary['checkpoint']}, TensorBoard log {summary['tensorboard']}")
        return 0

    n = min(args.samples, xt.shape[0])
    xs, ys = xt[:n], yt[:n]
    # the hardened model: same architecture, trained with the chosen recipe
    rec = recipe(args.defense, eps=0.1) if args.defense != "none" else recipe("none")
    hard_opts = dict(DEMO_MODEL["options"]) if rec.model is None else {"hidden": 128, "mean": 0.3, "std": 0.4}
    print(f"\ntraining the hardened model ({args.defense}, {train_opts['epochs']} epochs) into "
          f"{out / args.defense}", flush=True)
    hard, hhist, _ = train_model(rec.model or DEMO_MODEL["name"], hard_opts, train_opts,
                                 out_dir=out / args.defense, objective=rec.objective, progress=progress,
                                 seed=args.seed, resume=not args.no_resume)
    summary["hardened"] = {"defense": args.defense, "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in hhist),
                           "test_accuracy": evaluate_clean(hard, xt, yt)["accuracy"],
                           "checkpoint": str(out / args.defense / "checkpoint.pt")}
    reports = {}
    for name, m in (("undefended", model), (args.defense, hard)):
        print(f"\nevaluating the {name} model on {n} test samples (standard suite, AutoAttack included: "
              "minutes)", flush=True)
        reports[name] = _demo_eval(m, xs, ys, out / f"eval_{name}", progress)
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
    (out / "summary.json").write_text(json.dumps(round_floats(summary), indent=2, default=str))
    print(f"\nwrote {out / 'summary.json'}, checkpoints, evaluation reports and TensorBoard logs under {out}")
    return 0


# ---------------------------------------------------------------------------- attack / eval
from .registry import (ATTACKS, DATASETS, MODELS, RECIPES, SOLVERS,  # noqa: E402 - torch-free name registries
                       SUITES, WRAPPERS)


def _load_for_eval(args):
    """Load a checkpoint (and wrap it in an inference-time defense), plus the evaluation data."""
    from .checkpoint import load_model
    model, ck = load_model(args.checkpoint)
    model.eval()
    dataset = args.dataset or ck.metadata.get("dataset", "digits")
    x, y = _load_data(dataset, args.data_root, args.split, args.n)
    model = wrap_model(model, args.wrap, _json_arg(args.wrap_options, "--wrap-options"))
    return model, x, y


def wrap_model(model, wrap: str, options: dict):
    """Wrap ``model`` in the inference-time defense ``wrap`` ("none" returns it unchanged)."""
    from .errors import ConfigError
    defense = WRAPPERS.get(wrap)  # a ConfigError naming the known defenses
    if defense is not None:
        import inspect
        known = [k for k in inspect.signature(defense.__init__).parameters if k not in ("self", "model")]
        from .errors import reject_unknown
        reject_unknown(options, known, f"--wrap {wrap} (--wrap-options)")
        try:
            return defense(model, **options).eval()
        except (TypeError, ValueError) as e:  # ConfigError is a ValueError
            raise ConfigError(f"--wrap-options {json.dumps(options)}: {e}") from None
    if options:
        raise ConfigError(f"--wrap-options {json.dumps(options)} given with --wrap none: choose a defense "
                          f"with --wrap ({', '.join(w for w in WRAPPERS if w != 'none')}) or drop the options")
    return model


def cmd_attack(args) -> int:
    import torch
    from . import attacks
    from .errors import ConfigError
    eps = _floats(args.eps, "--eps")
    if len(eps) != 1:
        raise ConfigError(f"attack takes one --eps, got {args.eps!r}")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; attack --out names the file to write")
    options = _json_arg(args.options, "--options")
    model, x, y = _load_for_eval(args)
    if args.attack == "torchattack":
        params = torchattack_params(options, eps=eps[0], norm=args.norm, steps=args.steps, seed=args.seed)
    else:
        params = {"eps": eps[0], "norm": args.norm, "seed": args.seed, **options}
        if args.attack in ("pgd", "state"):
            params.setdefault("steps", args.steps)
    if args.grad:
        if args.attack not in ("pgd", "fgsm"):
            raise ConfigError(f"--grad is for --attack pgd or fgsm, not {args.attack!r}")
        params["grad"] = args.grad
    atk = attacks.build(args.attack, model, **params)
    if getattr(atk, "eps", 0) is None:
        print(f"note: {atk.name} has no eps: its examples are not bounded by --eps", file=sys.stderr)
    t0 = time.perf_counter()
    x_adv = _run_attack(atk, x, y, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    clean = attacks.accuracy(model, x, y)
    robust_flags = attacks.predict(model, x_adv) == y
    robust = float((robust_flags & (attacks.predict(model, x) == y)).float().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x_adv": x_adv.cpu(), "x": x.cpu(), "y": y.cpu(), "robust": robust_flags.cpu(),
                "attack": json.dumps(atk.describe(), default=str)}, out)
    print(_table([[atk.name, f"{clean:.4f}", f"{robust:.4f}", f"{dt:.1f}"]],
                 ["attack", "clean accuracy", "robust accuracy", "time (s)"]))
    print(f"\nwrote adversarial examples to {out} (load with torch.load(path, weights_only=True))")
    return 0


def torchattack_params(options: dict, *, eps: float, norm: str, steps: int, seed: int) -> dict:
    """Parameters of ``--attack torchattack``: the class named by ``options["attack"]`` gets
    ``--eps``, ``--norm`` and ``--steps`` only where it has such a parameter (and ``options`` does
    not set it); every other option is the class's own."""
    import inspect
    from .attacks.bridge import resolve_class
    from .errors import ConfigError
    if "attack" not in options:
        raise ConfigError("--attack torchattack needs the torchattacks class in --options, e.g. "
                          "--options '{\"attack\": \"PGD\"}' or '{\"attack\": \"CW\", \"c\": 1.0}'")
    cls = resolve_class(options["attack"])
    accepted = inspect.signature(cls.__init__).parameters
    params = {"seed": seed, **options}
    for key, value in (("eps", eps), ("norm", norm), ("steps", steps)):
        if key in accepted and key not in options:
            params[key] = value
    return params


def _run_attack(atk, x, y, *, progress: bool):
    """``atk(x, y)``; with ``progress``, a line on stderr and a bar that follows the stages of
    long attacks (AutoAttack's sub-attacks)."""
    if not progress:
        return atk(x, y)
    from tqdm.auto import tqdm
    from ._support import progress_reporter
    print(f"running {atk.name} on {x.shape[0]} samples", file=sys.stderr, flush=True)
    bar = tqdm(total=x.shape[0], desc=atk.name, unit="sample", leave=False)

    def show(status):
        if "done" in status and "total" in status:
            bar.total = int(status["total"])
            bar.n = int(status["done"])
        if "stage" in status:
            bar.set_postfix_str(str(status["stage"]), refresh=False)
        bar.refresh()
    try:
        with progress_reporter(show):
            return atk(x, y)
    finally:
        bar.close()


def cmd_eval(args) -> int:
    from .eval import evaluate
    eps = list(_floats(args.eps, "--eps"))
    _out_folder(args.out)
    model, x, y = _load_for_eval(args)
    certify = _bracket_spec(args)
    rep = evaluate(model, x, y, threat=args.norm, eps=eps, suite=args.suite,
                   steps=args.steps, seed=args.seed, out_dir=args.out, resume=not args.no_resume,
                   progress=not args.no_progress, tensorboard=bool(args.out), certify=certify,
                   batch_size=args.batch_size)
    print(rep.to_markdown())
    if rep.fired:
        print(f"\nchecks that fired: {', '.join(rep.fired)}")
    if args.out:
        print(f"\nwrote {Path(args.out) / 'report.json'}, report.md and plots")
    if args.strict and "certified_but_broken" in rep.fired:
        print("error: --strict: a certified sample was broken by an attack (certified_but_broken)", file=sys.stderr)
        return 3
    return 0


def _suite_arg(text: str):
    """``--suite``: a registered suite name, or a comma list of attack names (``pgd-ift``,
    ``apgd-ce``, ``state-3``...; unknown names are a usage error listing the known ones)."""
    if text in SUITES.names():
        return text
    from .eval.suites import is_attack_name  # (imports torch) registers the built-in attack names
    from .registry import ATTACK_SPECS
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if not is_attack_name(n)]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown suite or attack name(s) {', '.join(unknown) or repr(text)}; suites: "
            f"{', '.join(SUITES.names())}; attacks (comma list): {', '.join(ATTACK_SPECS.names())}, state-<k>")
    return names


def _bracket_spec(args):
    """The ``certify`` argument of ``evaluate`` from ``--certify`` / ``--smoothing``."""
    if args.certify is None and args.smoothing is None:
        return None
    spec = {"methods": [m for m in (args.certify or "auto").split(",") if m not in ("auto", "smoothing", "")]
            if args.certify not in (None, "auto") else ["lipschitz", "ibp"]}
    if args.certify and "smoothing" in args.certify.split(",") and args.smoothing is None:
        from .errors import ConfigError
        raise ConfigError("--certify smoothing needs --smoothing SIGMA")
    if args.smoothing is not None:
        spec["smoothing"] = {"sigma": args.smoothing, "n": args.smoothing_n, "n0": min(100, args.smoothing_n),
                             "srs_steps": args.srs_steps,
                             "check_samples": min(400, args.smoothing_n), "seed": args.seed}
    return spec


def cmd_harden(args) -> int:
    """Evaluate a checkpoint with and without an inference-time defense, side by side."""
    from .eval import evaluate
    _floats(args.eps, "--eps")
    _out_folder(args.out)
    if args.wrap == "none":
        from .errors import ConfigError
        raise ConfigError("harden compares a checkpoint with and without an inference-time defense: "
                          "--wrap none leaves nothing to compare (use 'robustdeq eval')")
    args_plain = argparse.Namespace(**{**vars(args), "wrap": "none", "wrap_options": None})
    plain, x, y = _load_for_eval(args_plain)
    defended = wrap_model(plain, args.wrap, _json_arg(args.wrap_options, "--wrap-options"))
    rows, written = [], []
    for name, m in (("as trained", plain), (f"+ {args.wrap}", defended)):
        out = Path(args.out) / name.replace(" ", "_").replace("+", "with") if args.out else None
        if out is not None:
            written.append(str(out))
        rep = evaluate(m, x, y, threat=args.norm, eps=list(_floats(args.eps)), suite=args.suite,
                       steps=args.steps, seed=args.seed, out_dir=out, progress=not args.no_progress)
        rows.append([name, f"{rep.clean_accuracy:.4f}"] + [f"{r.robust_accuracy:.4f}" for r in rep.results]
                    + [", ".join(rep.fired) or "-"])
    eps_cols = [f"robust @ {args.norm} {e:g}" for e in _floats(args.eps)]
    print(_table(rows, ["model", "clean"] + eps_cols + ["checks fired"]))
    if written:
        print(f"\nwrote the reports (report.json, report.md, plots) to {' and '.join(written)}")
    else:
        print("\nno report files written (pass --out <folder> to keep report.json and report.md of both)")
    return 0


def _add_eval_args(p, *, eps_default: str) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's dataset")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("-n", type=_int_at_least(1), default=200, help="number of samples (default 200)")
    p.add_argument("--norm", default="Linf", choices=[n.value for n in Norm])
    p.add_argument("--eps", default=eps_default)
    p.add_argument("--steps", type=_int_at_least(1), default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wrap", default="none", choices=WRAPPERS.names(), help="inference-time defense")
    p.add_argument("--wrap-options", default=None, help="JSON options of the inference-time defense")
    p.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------------------------- certify
def _floats(text: Optional[str], what: str = "--eps") -> tuple:
    """Comma-separated non-negative radii; a ConfigError naming ``what`` otherwise."""
    import math
    from .errors import ConfigError
    if not text:
        return ()
    try:
        vals = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated numbers, got {text!r}") from None
    bad = [v for v in vals if not (v >= 0 and math.isfinite(v))]
    if bad:
        raise ConfigError(f"{what} values must be finite and >= 0, got {text!r}")
    return vals


def cmd_certify(args) -> int:
    from .certify.api import certify_checkpoint
    eps_l2, eps_linf = _floats(args.eps_l2, "--eps-l2"), _floats(args.eps_linf, "--eps-linf")
    _out_folder(args.out)
    dataset = args.dataset
    if dataset is None:  # like eval: the checkpoint's dataset
        from .checkpoint import load_checkpoint
        dataset = load_checkpoint(args.checkpoint).metadata.get("dataset", "digits")
    if args.data_root is None:
        _load_data(dataset, None, args.split, 1)  # a missing data folder is named as --data-root
    if args.smoothing is not None:
        return _certify_smoothing(args, dataset)
    rep = certify_checkpoint(args.checkpoint, dataset=dataset, split=args.split, root=args.data_root,
                             n=args.n, out_dir=args.out, eps_l2=eps_l2,
                             eps_linf=eps_linf, progress=not args.no_progress)
    print(rep.to_markdown())
    if args.out:
        print(f"\nwrote {Path(args.out) / 'certificate.json'} and certificate.md")
    return 0


def _certify_smoothing(args, dataset: str) -> int:
    """``robustdeq certify CHECKPOINT --smoothing SIGMA``: randomized-smoothing certificates."""
    from .certify.smoothing import certify_checkpoint as smoothing_checkpoint
    radii = _floats(args.radii, "--radii") if args.radii else None
    opts = {"sigma": args.smoothing, "n": args.noise_n, "n0": args.n0, "alpha": args.alpha,
            "srs_steps": args.srs_steps, "seed": args.seed, "srs_start": args.srs_start,
            "check_max": args.check_max}
    opts["check_samples"] = (args.check_samples if args.check_samples is not None
                             else min(400, args.noise_n) if args.noise_n >= 1 else 400)
    if radii:
        opts["radii"] = radii
    rep = smoothing_checkpoint(args.checkpoint, dataset=dataset, split=args.split, root=args.data_root,
                               n_inputs=args.n, out_dir=args.out, progress=not args.no_progress, **opts)
    print(rep.to_markdown())
    if args.out:
        print(f"\nwrote {Path(args.out) / 'certificate.json'}, certificate.md and certified_accuracy.png")
    return 0


# ---------------------------------------------------------------------------------- federate
def cmd_federate(args) -> int:
    """Federated DEQ training in Flower's simulation engine (the ``federated`` extra)."""
    from .federated import FederatedConfig, parse_budgets
    from .federated.run import federate
    out = _out_folder(args.out)
    cfg = FederatedConfig.from_dict({
        "clients": args.clients, "rounds": args.rounds, "partition": args.partition,
        "budgets": parse_budgets(args.budgets), "solver": args.solver, "tol": args.tol,
        "defense": args.defense, "defense_options": _json_arg(args.defense_options, "--defense-options"),
        "fusion": args.fusion, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
        "lr": args.lr, "dataset": args.dataset, "data_root": args.data_root, "model": args.model,
        **({"model_options": _json_arg(args.model_options, "--model-options")} if args.model_options else {}),
        "seed": args.seed, "eval_suite": args.eval_suite, "eval_samples": args.eval_samples,
        "eval_eps": args.eps, "eval_steps": args.steps, "client_timeout": args.timeout,
    })
    res = federate(cfg, out, progress=not args.no_progress, resume=not args.no_resume, cpus=args.cpus)
    rows = [[str(r["round"]), f"{r['accuracy']:.4f}",
             "n/a" if r.get("robust_accuracy") is None else f"{r['robust_accuracy']:.4f}",
             f"{r['bytes_up']:,}", f"{r['bytes_down']:,}",
             str(len(r["clients_dropped"]) + len(r["clients_rejected"]))] for r in res.rounds]
    print(_table(rows, ["round", "accuracy", f"robust ({cfg.eval_threat.value} {cfg.eval_eps:g})",
                        "bytes up", "bytes down", "clients left out"]))
    print(f"\nwrote {out / 'summary.json'}, report.md, accuracy.png, checkpoint.pt and tb/ under {out}")
    return 0


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="robustdeq", description="Adversarial robustness of deep equilibrium models. "
                "Without a command, runs the demo (robustdeq demo).")
    p.add_argument("--version", action="version", version=f"robustdeq {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    p.add_argument("--threads", type=_int_at_least(0), default=1,
                   help="torch CPU threads (default 1: the zoo's small models run fastest on one; 0 = torch default)")
    sub = p.add_subparsers(dest="command")

    d = sub.add_parser("demo", help="train a DEQ on the bundled digits and report (default job)")
    d.add_argument("--out", default="robustdeq-demo", help="output folder (default ./robustdeq-demo)")
    d.add_argument("--epochs", type=_int_at_least(1), default=None, help="override the number of training epochs")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--samples", type=_int_at_least(1), default=100, help="test samples for the evaluation and certificate (AutoAttack on a DEQ costs about a second per sample)")
    d.add_argument("--defense", default="jiio-at", help="training recipe of the hardened model (see robustdeq train)")
    d.add_argument("--skip-eval", action="store_true", help="only train and report the undefended DEQ")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--no-resume", action="store_true", help="retrain even if a checkpoint exists")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model from the zoo")
    t.add_argument("--model", default=None, help=f"zoo name ({', '.join(MODELS.names())})")
    t.add_argument("--model-options", default=None,
                   help='JSON, e.g. \'{"hidden": 64}\'; mlp_deq defaults to the demo\'s options '
                        + json.dumps(DEMO_MODEL["options"]))
    t.add_argument("--dataset", default="digits", choices=DATASETS.names(),
                   help="mnist5k: 5,000 real MNIST images (needs the 'data' extra)")
    t.add_argument("--data-root", default=None, help="folder with MNIST idx / CIFAR-10 binary files")
    t.add_argument("--defense", default="none", help=", ".join(RECIPES.names()))
    t.add_argument("--defense-options", default=None, help="JSON options of the training objective")
    t.add_argument("--epochs", type=_int_at_least(1), default=DEMO_TRAIN["epochs"],
                   help=f"default {DEMO_TRAIN['epochs']} (the demo's recipe)")
    t.add_argument("--batch-size", type=_int_at_least(1), default=DEMO_TRAIN["batch_size"],
                   help=f"default {DEMO_TRAIN['batch_size']}")
    t.add_argument("--lr", type=_positive_float, default=DEMO_TRAIN["lr"],
                   help=f"learning rate (default {DEMO_TRAIN['lr']:g})")
    t.add_argument("--train-options", default=None, help="JSON, other TrainConfig options")
    t.add_argument("--out", required=True, help="output folder (checkpoint.pt, history.json, tb/)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-resume", action="store_true")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("attack", help="run one attack on a checkpoint and save the adversarial examples")
    _add_eval_args(a, eps_default="0.1")
    a.add_argument("--attack", default="pgd", help=", ".join(ATTACKS.names()))
    a.add_argument("--grad", default=None, help="gradient for pgd/fgsm: ift, phantom, unrolled, full "
                   "(pgd on a DEQ with ift: the joint iteration where solves converge; "
                   "--options '{\"method\": \"exact\"}' for exact solves at every step)")
    a.add_argument("--options", default=None, help="JSON, other attack parameters")
    a.add_argument("--out", default="adversarial.pt")
    a.set_defaults(func=cmd_attack)

    e = sub.add_parser("eval", help="run an evaluation suite on a checkpoint and write the report")
    _add_eval_args(e, eps_default="0.1,0.2")
    e.add_argument("--suite", default="standard", type=_suite_arg,
                   help=f"a suite ({', '.join(SUITES.names())}) or a comma list of attack names, e.g. "
                        "pgd-ift,pgd-unrolled,apgd-ce (default standard)")
    e.add_argument("--out", default=None, help="folder for report.json, report.md, plots, partial results")
    e.add_argument("--no-resume", action="store_true")
    e.add_argument("--batch-size", type=_int_at_least(1), default=128,
                   help="attack batch size (default 128); under torchrun the processes share out these batches")
    e.add_argument("--certify", nargs="?", const="auto", default=None,
                   help="robustness bracket: certified <= robust <= attacked accuracy per eps; 'auto' "
                        "(Lipschitz + IBP) or a comma list of lipschitz, ibp, smoothing")
    e.add_argument("--smoothing", type=float, default=None, metavar="SIGMA",
                   help="bracket: also certify the Gaussian-smoothed classifier (compared with attacks on it)")
    e.add_argument("--smoothing-n", type=int, default=1000, help="bracket: smoothing noise samples (default 1000)")
    e.add_argument("--srs-steps", type=int, default=0, help="bracket: SRS solver steps (default 0: independent)")
    e.add_argument("--strict", action="store_true",
                   help="exit with status 3 when a certified sample is broken by an attack (soundness alarm)")
    e.set_defaults(func=cmd_eval)

    h = sub.add_parser("harden", help="wrap a checkpoint in an inference-time defense and evaluate both")
    _add_eval_args(h, eps_default="0.1,0.2")
    h.set_defaults(wrap="entropy")
    h.add_argument("--suite", default="quick", choices=SUITES.names())
    h.add_argument("--out", default=None)
    h.set_defaults(func=cmd_harden)

    c = sub.add_parser("certify", help="certify stability and robustness of a checkpoint")
    c.add_argument("checkpoint")
    c.add_argument("--dataset", default=None, choices=DATASETS.names(),
                   help="default: the checkpoint's dataset")
    c.add_argument("--data-root", default=None)
    c.add_argument("--split", default="test")
    c.add_argument("-n", type=_int_at_least(1), default=None, help="number of samples (default: the whole split)")
    c.add_argument("--eps-l2", default="0.1,0.25,0.5", help="comma-separated L2 radii")
    c.add_argument("--eps-linf", default="", help="comma-separated Linf radii (IBP)")
    c.add_argument("--smoothing", type=float, default=None, metavar="SIGMA",
                   help="randomized-smoothing certificates with Gaussian noise SIGMA instead of the "
                        "deterministic ones (certified accuracy at --radii, abstain rate, time per image)")
    c.add_argument("--n", "--noise-n", dest="noise_n", type=int, default=10000,
                   help="smoothing: estimation noise samples per input (default 10000; -n is the number of "
                        "inputs; under torchrun write --noise-n, which torchrun's own options do not shadow)")
    c.add_argument("--n0", type=int, default=100, help="smoothing: selection noise samples (default 100)")
    c.add_argument("--alpha", type=float, default=0.001, help="smoothing: failure probability (default 0.001)")
    c.add_argument("--srs-steps", type=int, default=0,
                   help="smoothing: serialized randomized smoothing with this many solver steps per "
                        "warm-started batch (default 0: independent solves)")
    c.add_argument("--check-samples", type=int, default=None,
                   help="smoothing with SRS: estimation samples re-solved from scratch (default 400)")
    c.add_argument("--check-max", type=int, default=0,
                   help="smoothing with SRS: choose the number of re-solved samples per input in "
                        "[--check-samples, this] from the warm-started count (default 0: fixed)")
    c.add_argument("--srs-start", default="chain", choices=["chain", "clean"],
                   help="smoothing with SRS: warm-start each batch from the previous batch's fixed points "
                        "(chain, the paper's rule) or every sample from the clean input's fixed point")
    c.add_argument("--radii", default="", help="smoothing: comma-separated L2 radii (default 0,0.25,0.5,0.75,1)")
    c.add_argument("--seed", type=int, default=0, help="smoothing: noise seed")
    c.add_argument("--out", default=None, help="folder for certificate.json / certificate.md")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_certify)

    f = sub.add_parser("federate", help="federated DEQ training on Flower (needs the 'federated' extra)")
    f.add_argument("--clients", type=_int_at_least(1), default=8)
    f.add_argument("--rounds", type=_int_at_least(1), default=20)
    f.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (label skew)")
    f.add_argument("--budgets", default="30", help="solver iteration budgets, cycled over the clients (e.g. 5,10,30)")
    f.add_argument("--solver", default="anderson", choices=SOLVERS.names())
    f.add_argument("--tol", type=_positive_float, default=1e-3, help="the clients' solver tolerance")
    f.add_argument("--defense", default="none", help="local objective: a training recipe (see robustdeq train)")
    f.add_argument("--defense-options", default=None, help="JSON options of the local objective")
    f.add_argument("--fusion", default="fedavg", choices=["fedavg", "quality", "tolerance", "accuracy"],
                   help="fusion weights: n_k (fedavg) or n_k * q_k (quality: estimated distance from the "
                   "equilibrium; tolerance: residual vs tolerance; accuracy: local validation accuracy)")
    f.add_argument("--local-epochs", type=_int_at_least(1), default=1)
    f.add_argument("--batch-size", type=_int_at_least(1), default=32)
    f.add_argument("--lr", type=_positive_float, default=3e-3)
    f.add_argument("--model", default="mlp_deq", help=f"zoo name ({', '.join(MODELS.names())})")
    f.add_argument("--model-options", default=None, help="JSON model options")
    f.add_argument("--dataset", default="digits", choices=[d for d in DATASETS.names() if d != "mnist5k"])
    f.add_argument("--data-root", default=None)
    f.add_argument("--eval-suite", default="quick", choices=["none"] + SUITES.names(),
                   help="attacks run on the global model after every round (none: clean accuracy only)")
    f.add_argument("--eval-samples", type=_int_at_least(0), default=200, help="test samples attacked (0: all)")
    f.add_argument("--eps", type=_positive_float, default=0.1, help="Linf radius of the per-round evaluation")
    f.add_argument("--steps", type=_int_at_least(1), default=10, help="attack steps of the per-round evaluation")
    f.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds to wait for a round's replies")
    f.add_argument("--cpus", type=_int_at_least(1), default=1, help="cores of the simulation engine (default 1)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output folder (summary.json, report.md, accuracy.png, checkpoint.pt, tb/)")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--no-resume", action="store_true", help="start again even if the folder holds a run")
    f.set_defaults(func=cmd_federate)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (2 for a user error, printed on one line as
    ``robustdeq: error: ...``; ``--debug`` shows the traceback instead)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:  # the default job
        print("no command given: running the demo ('robustdeq --help' lists the commands)", file=sys.stderr)
        args = parser.parse_args(argv + ["demo"])
    _setup_logging(args.verbose)
    from .errors import RobustDEQError
    quiet, created = None, False
    try:
        if args.threads > 0:
            import torch
            torch.set_num_threads(args.threads)
        from .distributed import context as dist_context, init as init_distributed
        had_group = dist_context(auto_init=False) is not None
        group = init_distributed()  # under torchrun: train, eval and certify share the work
        created = group is not None and not had_group
        if group is not None and not group.is_main:  # rank 0 prints the results
            import os
            quiet, sys.stdout = sys.stdout, open(os.devnull, "w")
        return int(args.func(args) or 0)
    except (RobustDEQError, OSError) as e:
        if args.debug:
            raise
        msg = str(e) if isinstance(e, RobustDEQError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        print(f"robustdeq: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("robustdeq: interrupted", file=sys.stderr)
        return 130
    finally:
        if quiet is not None:
            sys.stdout.close()
            sys.stdout = quiet
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
