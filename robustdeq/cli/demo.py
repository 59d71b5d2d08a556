"""``robustdeq demo`` (the default command): the demo recipe of :mod:`robustdeq.demo`."""
from __future__ import annotations

from .common import add_device_arg, device_of, int_at_least, out_folder, HELP_NO_PROGRESS, HELP_SEED


def add_parser(sub) -> None:
    """Add the ``demo`` command and its options to the subparsers ``sub``."""
    d = sub.add_parser("demo", help="train a DEQ on the bundled digits and report (default job)")
    d.add_argument("--out", default="robustdeq-demo", help="output folder (default ./robustdeq-demo)")
    d.add_argument("--epochs", type=int_at_least(1), default=None, help="override the number of training epochs")
    d.add_argument("--seed", type=int, default=0, help=HELP_SEED)
    d.add_argument("--samples", type=int_at_least(1), default=100, help="test samples for the evaluation and certificate")
    d.add_argument("--defense", default="jiio-at", help="training recipe of the hardened model (see robustdeq train)")
    d.add_argument("--skip-eval", action="store_true", help="only train and report the undefended DEQ")
    d.add_argument("--no-progress", action="store_true", help=HELP_NO_PROGRESS)
    d.add_argument("--no-resume", action="store_true", help="train and evaluate again even if the folder holds them")
    d.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                   help="processes: 2 evaluates the undefended model in a second process while the "
                        "hardened one trains and is evaluated (same reports); default 2 on a machine "
                        "with two or more cores, else 1")
    add_device_arg(d)
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    """``robustdeq demo``: on the bundled digits, train an undefended DEQ and one hardened with
    ``--defense``, evaluate both and certify the undefended one (:func:`robustdeq.demo.run_demo`;
    two jobs at a time by default where two cores are available). Returns the exit status
    (0)."""
    import os

    from ..demo import run_demo
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = args.jobs if args.jobs is not None else (2 if cores >= 2 else 1)
    run_demo(out_folder(args.out), epochs=args.epochs, seed=args.seed, samples=args.samples,
             defense=args.defense, skip_eval=args.skip_eval, progress=not args.no_progress,
             resume=not args.no_resume, say=lambda text: print(text, flush=True), device=device_of(args),
             jobs=jobs)
    return 0
