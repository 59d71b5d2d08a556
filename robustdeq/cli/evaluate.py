"""``robustdeq eval`` (an evaluation suite on a checkpoint) and ``robustdeq harden`` (a checkpoint
with and without an inference-time defense, side by side)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..registry import SUITES
from .common import (add_eval_args, floats, int_at_least, json_arg, load_for_eval, out_folder,
                     refuse_flag_keys, refuse_without, table, wrap_flagged, HELP_NO_RESUME)


def add_parsers(sub) -> None:
    """Add the ``eval`` and ``harden`` commands and their options to the subparsers ``sub``."""
    e = sub.add_parser("eval", help="run an evaluation suite on a checkpoint and write the report")
    add_eval_args(e, eps_default="0.1,0.2")
    e.add_argument("--suite", default="standard", type=suite_arg,
                   help=f"a suite ({', '.join(SUITES.names())}) or a comma list of attack names, e.g. "
                        "pgd-ift,pgd-unrolled,apgd-ce (default standard)")
    e.add_argument("--out", default=None, help="folder for report.json, report.md, plots, partial results")
    e.add_argument("--no-resume", action="store_true", help=HELP_NO_RESUME)
    e.add_argument("--batch-size", type=int_at_least(1), default=128,
                   help="attack batch size (default 128); under torchrun the processes share out these batches")
    e.add_argument("--certify", nargs="?", const="auto", default=None,
                   help="robustness bracket: certified <= robust <= attacked accuracy per eps; 'auto' "
                        "(Lipschitz + IBP) or a comma list of lipschitz, ibp, smoothing")
    e.add_argument("--smoothing", type=float, default=None, metavar="SIGMA",
                   help="bracket: also certify the Gaussian-smoothed classifier (compared with attacks on it)")
    e.add_argument("--smoothing-n", type=int_at_least(1), default=1000,
                   help="bracket: smoothing estimation noise samples (default 1000); the budget with "
                        "--smoothing-mode sequential or radius")
    e.add_argument("--srs-steps", type=int_at_least(0), default=0,
                   help="bracket: SRS solver steps (default 0: independent)")
    e.add_argument("--smoothing-mode", default="fixed", choices=["fixed", "sequential", "radius"],
                   help="bracket: fixed (Cohen et al., --smoothing-n samples), sequential (decide "
                        "'certified at eps' for every --eps with an anytime-valid test, stopping early; L2 "
                        "only) or radius (the largest radius with a per-input sample size)")
    e.add_argument("--smoothing-options", default=None, metavar="JSON",
                   help="bracket: further randomized-smoothing settings, e.g. '{\"alpha\": 0.01, "
                        "\"first_batch\": 50, \"futility_alpha\": 0.05, \"srs_check\": \"proof\"}' "
                        "(any field of SmoothingConfig without a flag of its own; unknown keys are an error)")
    e.add_argument("--solver-options", default=None, metavar="JSON",
                   help="solve the DEQ with this solver config for the whole evaluation instead of its "
                        "own, e.g. '{\"name\": \"anderson\", \"max_iter\": 100, \"tol\": 1e-6}'")
    e.add_argument("--strict", action="store_true",
                   help="exit with status 3 when a certified sample is broken by an attack (soundness alarm; a "
                        "break of the DEQ's own solver, where the exact fixed point the certificate covers "
                        "stays correct, is reported but does not fail)")
    e.set_defaults(func=cmd_eval)

    h = sub.add_parser("harden", help="wrap a checkpoint in an inference-time defense and evaluate both")
    add_eval_args(h, eps_default="0.1,0.2")
    h.set_defaults(wrap="entropy")
    h.add_argument("--suite", default="quick", choices=SUITES.names(), help="the suite (default quick)")
    h.add_argument("--out", default=None, help="folder for the reports of both models (default: none written)")
    h.add_argument("--no-resume", action="store_true",
                   help="evaluate again even if --out holds the reports (of other settings: overwritten)")
    h.set_defaults(func=cmd_harden)


def cmd_eval(args) -> int:
    """``robustdeq eval``: run an evaluation suite on a checkpoint, print the report and write
    it under ``--out``. Returns the exit status: 0, or 3 when ``--strict`` and a certified
    sample was broken by an attack (the ``certified_but_broken`` alarm; a break of the deployed
    solver alone is not one, see :mod:`robustdeq.eval.bracket`)."""
    from ..eval import evaluate
    refuse_without(args, "smoothing", "--smoothing SIGMA", {"smoothing_n": "--smoothing-n",
                                                            "srs_steps": "--srs-steps",
                                                            "smoothing_mode": "--smoothing-mode",
                                                            "smoothing_options": "--smoothing-options"})
    if args.strict and args.certify is None and args.smoothing is None:
        from ..errors import ConfigError
        raise ConfigError("--strict only applies with --certify (or --smoothing): without a certificate "
                          "nothing can be certified and broken; add --certify or drop --strict")
    eps = list(floats(args.eps, "--eps"))
    out_folder(args.out)
    certify = bracket_spec(args)  # its errors before the model and data are loaded
    solver = None
    if args.solver_options is not None:
        from ..config import SolverConfig, from_dict
        solver = from_dict(SolverConfig, json_arg(args.solver_options, "--solver-options"))
    model, x, y = load_for_eval(args)
    rep = evaluate(model, x, y, threat=args.norm, eps=eps, suite=args.suite,
                   steps=args.steps, seed=args.seed, out_dir=args.out, resume=not args.no_resume,
                   progress=not args.no_progress, tensorboard=bool(args.out), certify=certify,
                   batch_size=args.batch_size, solver=solver)
    print(rep.to_markdown())
    if rep.fired:
        print(f"\nchecks that fired: {', '.join(rep.fired)}")
    if args.out:
        print(f"\nwrote {Path(args.out) / 'report.json'}, report.md and plots")
    if args.strict and "certified_but_broken" in rep.fired:
        print("error: --strict: a certified sample was broken by an attack (certified_but_broken)", file=sys.stderr)
        return 3
    return 0


def suite_arg(text: str):
    """``--suite``: a registered suite name, or a comma list of attack names (``pgd-ift``,
    ``apgd-ce``, ``state-3``...; unknown names are a usage error listing the known ones)."""
    if text in SUITES.names():
        return text
    from ..registry import ATTACK_SPECS, is_attack_spec_name  # torch-free names
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if not is_attack_spec_name(n)]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown suite or attack name(s) {', '.join(unknown) or repr(text)}; suites: "
            f"{', '.join(SUITES.names())}; attacks (comma list): {', '.join(ATTACK_SPECS.names())}, state-<k>")
    return names


def bracket_spec(args):
    """The ``certify`` argument of ``evaluate`` from ``--certify`` / ``--smoothing``."""
    if args.certify is None and args.smoothing is None:
        return None
    if args.certify is not None:
        from ..errors import ConfigError
        from ..eval.bracket import BASE_METHODS
        parts = [m.strip() for m in args.certify.split(",")]
        known = ("auto", *BASE_METHODS, "smoothing")
        if not args.certify.strip() or any(m not in known for m in parts):
            raise ConfigError(f"--certify {args.certify!r}: expected auto or a comma list of "
                              f"{', '.join(known[1:])} (unknown or empty: "
                              f"{', '.join(repr(m) for m in parts if m not in known) or repr(args.certify)})")
    spec = {"methods": [m for m in (args.certify or "auto").split(",") if m not in ("auto", "smoothing", "")]
            if args.certify not in (None, "auto") else ["lipschitz", "ibp"]}
    if args.certify and "smoothing" in args.certify.split(",") and args.smoothing is None:
        from ..errors import ConfigError
        raise ConfigError("--certify smoothing needs --smoothing SIGMA")
    if args.smoothing is not None:
        spec["smoothing"] = smoothing_spec(args)
    return spec


# SmoothingConfig fields that have a flag of their own in ``robustdeq eval``
SMOOTHING_FLAGS = {"sigma": "--smoothing", "n": "--smoothing-n", "srs_steps": "--srs-steps",
                   "mode": "--smoothing-mode", "seed": "--seed"}


def smoothing_spec(args) -> dict:
    """The smoothing settings of the bracket from ``--smoothing``, ``--smoothing-n``,
    ``--srs-steps``, ``--smoothing-mode`` and ``--smoothing-options`` (validated here, before
    anything is loaded: an unknown or ill-typed key is a ConfigError)."""
    from ..certify.smoothing import make_config
    from ..errors import ConfigError
    extra = json_arg(args.smoothing_options, "--smoothing-options")
    refuse_flag_keys(extra, SMOOTHING_FLAGS, "--smoothing-options")
    spec = {"sigma": args.smoothing, "n": args.smoothing_n, "n0": min(100, args.smoothing_n),
            "srs_steps": args.srs_steps, "seed": args.seed, "mode": args.smoothing_mode}
    if args.srs_steps > 0 and extra.get("srs_check", "sample") != "proof":
        spec["check_samples"] = min(400, args.smoothing_n)  # re-solved checks, at most n
    spec.update(extra)
    make_config(spec)
    if args.smoothing_mode == "sequential" and args.norm != "L2":
        raise ConfigError(f"--smoothing-mode sequential decides fixed L2 radii; the {args.norm} bracket needs "
                          "a radius per sample: use --smoothing-mode radius or fixed, or --norm L2")
    return spec


def cmd_harden(args) -> int:
    """Evaluate a checkpoint with and without an inference-time defense, side by side."""
    from ..eval import evaluate
    floats(args.eps, "--eps")
    out_folder(args.out)
    if args.wrap == "none":
        from ..errors import ConfigError
        raise ConfigError("harden compares a checkpoint with and without an inference-time defense: "
                          "--wrap none leaves nothing to compare (use 'robustdeq eval')")
    args_plain = argparse.Namespace(**{**vars(args), "wrap": "none", "wrap_options": None})
    plain, x, y = load_for_eval(args_plain)
    defended = wrap_flagged(plain, args.wrap, args.wrap_options)
    rows, written = [], []
    for name, m in (("as trained", plain), (f"+ {args.wrap}", defended)):
        out = Path(args.out) / name.replace(" ", "_").replace("+", "with") if args.out else None
        if out is not None:
            written.append(str(out))
        rep = evaluate(m, x, y, threat=args.norm, eps=list(floats(args.eps)), suite=args.suite,
                       steps=args.steps, seed=args.seed, out_dir=out, resume=not args.no_resume,
                       progress=not args.no_progress)
        rows.append([name, f"{rep.clean_accuracy:.4f}"] + [f"{r.robust_accuracy:.4f}" for r in rep.results]
                    + [", ".join(rep.fired) or "-"])
    eps_cols = [f"robust @ {args.norm} {e:g}" for e in floats(args.eps)]
    print(table(rows, ["model", "clean"] + eps_cols + ["checks fired"]))
    if written:
        print(f"\nwrote the reports (report.json, report.md, plots) to {' and '.join(written)}")
    else:
        print("\nno report files written (pass --out <folder> to keep report.json and report.md of both)")
    return 0
