"""``robustdeq certify``: deterministic certificates of a checkpoint, or randomized smoothing."""
from __future__ import annotations

from pathlib import Path

from ..registry import DATASETS
from .common import (add_device_arg, device_of, floats, int_at_least, load_data, out_folder, refuse_without,
                     HELP_CHECKPOINT, HELP_DATA_ROOT, HELP_NO_PROGRESS, HELP_SPLIT)


def add_parser(sub) -> None:
    """Add the ``certify`` command and its options to the subparsers ``sub``."""
    c = sub.add_parser("certify", help="certify stability and robustness of a checkpoint")
    c.add_argument("checkpoint", help=HELP_CHECKPOINT)
    c.add_argument("--dataset", default=None, choices=DATASETS.names(),
                   help="default: the checkpoint's dataset")
    c.add_argument("--data-root", default=None, help=HELP_DATA_ROOT)
    c.add_argument("--split", default="test", help=HELP_SPLIT)
    c.add_argument("-n", type=int_at_least(1), default=None, help="number of samples (default: the whole split)")
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
    c.add_argument("--mode", default="fixed", choices=["fixed", "sequential", "radius"],
                   help="smoothing: fixed (n samples, Clopper-Pearson), sequential (decide each of --radii "
                        "with an anytime-valid test, stopping early; n is the budget) or radius (the "
                        "largest radius, per-input sample size; n is the budget)")
    c.add_argument("--srs-check", default="sample", choices=["sample", "proof", "auto"],
                   help="smoothing with SRS: correct warm-started counts by re-solved checks (sample), prove "
                        "each warm-started class from the contraction certificate (proof), or proof where "
                        "available (auto)")
    c.add_argument("--tolerance", type=float, default=0.05,
                   help="smoothing --mode radius: stop when the radius cannot grow by more than this")
    c.add_argument("--first-batch", type=int_at_least(1), default=100,
                   help="smoothing --mode sequential/radius: the first estimation batch; later batches double "
                        "up to --batch-size (default 100)")
    c.add_argument("--futility-alpha", type=float, default=0.01,
                   help="smoothing --mode sequential/radius: level of the upper confidence sequence that stops "
                        "sampling early for a radius that will not be certified (default 0.01; an error there "
                        "only loses a certificate)")
    c.add_argument("--futility", default=None, choices=["sequence", "projected"],
                   help="smoothing --mode sequential: give a radius up when the upper confidence sequence falls "
                        "below its threshold (sequence), or also when it would stay uncertified at the end of "
                        "the budget at that upper rate (projected, the default: fewer samples on borderline "
                        "inputs; either only withholds certificates)")
    c.add_argument("--final-alpha-fraction", type=float, default=0.25,
                   help="smoothing --mode sequential/radius: share of --alpha spent on one Clopper-Pearson test "
                        "at exactly n samples (the budget) for inputs still undecided there; the confidence "
                        "sequence gets the rest (union bound; default 0.25, 0 turns the final test off)")
    c.add_argument("--batch-size", type=int_at_least(1), default=400,
                   help="smoothing: noise samples solved together (default 400)")
    c.add_argument("--check-alpha-fraction", type=float, default=0.5,
                   help="smoothing with SRS --srs-check sample: share of --alpha spent on the agreement "
                        "bound (default 0.5)")
    c.add_argument("--check-slack", type=float, default=0.1,
                   help="smoothing with SRS and --check-max: the radius (in units of sigma) the adaptive "
                        "number of checks may cost (default 0.1)")
    c.add_argument("--clip", action="store_true",
                   help="smoothing: smooth f(clip(x + noise, 0, 1)) instead of f(x + noise)")
    c.add_argument("--seed", type=int, default=0, help="smoothing: noise seed")
    c.add_argument("--out", default=None, help="folder for certificate.json / certificate.md")
    c.add_argument("--no-progress", action="store_true", help=HELP_NO_PROGRESS)
    add_device_arg(c)
    c.set_defaults(func=cmd_certify)


SMOOTHING_ONLY = {"noise_n": "--n/--noise-n", "n0": "--n0", "alpha": "--alpha", "srs_steps": "--srs-steps",
                  "check_samples": "--check-samples", "check_max": "--check-max",
                  "srs_start": "--srs-start", "radii": "--radii", "mode": "--mode",
                  "srs_check": "--srs-check", "tolerance": "--tolerance", "seed": "--seed",
                  "first_batch": "--first-batch", "futility_alpha": "--futility-alpha", "futility": "--futility",
                  "final_alpha_fraction": "--final-alpha-fraction", "batch_size": "--batch-size",
                  "check_alpha_fraction": "--check-alpha-fraction",
                  "check_slack": "--check-slack", "clip": "--clip"}
# option dest -> (flag, the condition under which it applies, said as a flag)
APPLIES = {"srs_check": ("--srs-check", lambda a: a.srs_steps > 0, "--srs-steps > 0"),
           "srs_start": ("--srs-start", lambda a: a.srs_steps > 0, "--srs-steps > 0"),
           "check_samples": ("--check-samples", lambda a: a.srs_steps > 0 and a.srs_check != "proof",
                             "--srs-steps > 0 and --srs-check sample/auto"),
           "check_max": ("--check-max", lambda a: a.srs_steps > 0 and a.srs_check != "proof",
                         "--srs-steps > 0 and --srs-check sample/auto"),
           "first_batch": ("--first-batch", lambda a: a.mode != "fixed", "--mode sequential or radius"),
           "futility_alpha": ("--futility-alpha", lambda a: a.mode != "fixed", "--mode sequential or radius"),
           "final_alpha_fraction": ("--final-alpha-fraction", lambda a: a.mode != "fixed",
                                    "--mode sequential or radius"),
           "tolerance": ("--tolerance", lambda a: a.mode == "radius", "--mode radius"),
           "futility": ("--futility", lambda a: a.mode == "sequential", "--mode sequential"),
           "check_alpha_fraction": ("--check-alpha-fraction", lambda a: a.srs_steps > 0 and a.srs_check != "proof",
                                    "--srs-steps > 0 and --srs-check sample/auto"),
           "check_slack": ("--check-slack", lambda a: a.check_max > 0, "--check-max")}


def refuse_inapplicable(args) -> None:
    """ConfigError naming a smoothing option given where it has no effect (it would be ignored)."""
    from ..errors import ConfigError
    from .common import given
    for dest, (flag, applies, needed) in APPLIES.items():
        if given(args, dest) and not applies(args):
            raise ConfigError(f"{flag} only applies with {needed}; here it would be ignored: drop {flag} "
                              "or change the mode it belongs to")


def cmd_certify(args) -> int:
    """``robustdeq certify``: the deterministic certificates of a checkpoint on a dataset split
    (or, with ``--smoothing SIGMA``, randomized-smoothing certificates), printed in Markdown
    and saved under ``--out``. Returns the exit status (0)."""
    from ..certify import certify_checkpoint
    refuse_without(args, "smoothing", "--smoothing SIGMA", SMOOTHING_ONLY)
    device_of(args)  # a device that is not there: said before anything is loaded
    eps_l2, eps_linf = floats(args.eps_l2, "--eps-l2"), floats(args.eps_linf, "--eps-linf")
    out_folder(args.out)
    dataset = args.dataset
    if dataset is None:  # like eval: the checkpoint's dataset
        from ..checkpoint import load_checkpoint
        dataset = load_checkpoint(args.checkpoint).metadata.get("dataset", "digits")
    if args.data_root is None:
        load_data(dataset, None, args.split, 1)  # a missing data folder is named as --data-root
    if args.smoothing is not None:
        return _certify_smoothing(args, dataset)
    rep = certify_checkpoint(args.checkpoint, "deterministic", dataset=dataset, split=args.split,
                             root=args.data_root, n_inputs=args.n, out_dir=args.out, eps_l2=eps_l2,
                             map_location=device_of(args),
                             eps_linf=eps_linf, progress=not args.no_progress)
    print(rep.to_markdown())
    if args.out:
        print(f"\nwrote {Path(args.out) / 'certificate.json'} and certificate.md")
    return 0


def _certify_smoothing(args, dataset: str) -> int:
    """``robustdeq certify CHECKPOINT --smoothing SIGMA``: randomized-smoothing certificates."""
    from ..certify import certify_checkpoint
    radii = floats(args.radii, "--radii") if args.radii else None
    refuse_inapplicable(args)
    opts = {"sigma": args.smoothing, "n": args.noise_n, "n0": args.n0, "alpha": args.alpha,
            "srs_steps": args.srs_steps, "seed": args.seed, "srs_start": args.srs_start,
            "check_max": args.check_max, "mode": args.mode, "srs_check": args.srs_check,
            "tolerance": args.tolerance, "first_batch": args.first_batch,
            "futility_alpha": args.futility_alpha, "futility": args.futility, "batch_size": args.batch_size,
            "final_alpha_fraction": args.final_alpha_fraction,
            "check_alpha_fraction": args.check_alpha_fraction, "check_slack": args.check_slack,
            "clip": bool(args.clip)}
    if args.srs_steps > 0 and args.srs_check != "proof":  # re-solved checks, at most n by default
        opts["check_samples"] = (args.check_samples if args.check_samples is not None
                                 else min(400, args.noise_n) if args.noise_n >= 1 else 400)
    if radii:
        opts["radii"] = radii
    rep = certify_checkpoint(args.checkpoint, "smoothing", dataset=dataset, split=args.split, root=args.data_root,
                             n_inputs=args.n, out_dir=args.out, progress=not args.no_progress,
                             map_location=device_of(args), **opts)
    print(rep.to_markdown())
    if args.out:
        print(f"\nwrote {Path(args.out) / 'certificate.json'}, certificate.md and certified_accuracy.png")
    return 0
