"""``robustdeq benchmark``: one model card per checkpoint under one protocol, and their leaderboard."""
from __future__ import annotations

from pathlib import Path

from ..config import Norm
from .common import (data_root_hint, int_at_least, one_radius, out_folder, HELP_CHECKPOINT, HELP_DATA_ROOT,
                     HELP_NO_PROGRESS, HELP_NORM, HELP_SEED, HELP_SPLIT)


def add_parser(sub) -> None:
    """Add the ``benchmark`` command and its options to the subparsers ``sub``."""
    from .evaluate import suite_arg
    b = sub.add_parser("benchmark", help="model cards of checkpoints evaluated under one protocol, "
                                         "and their leaderboard")
    b.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files (" + HELP_CHECKPOINT[2:] + ")")
    b.add_argument("--out", required=True,
                   help="folder: <checkpoint>/model_card.json|.md per checkpoint, leaderboard.md|.json")
    b.add_argument("--dataset", default=None, help="default: the first checkpoint's dataset")
    b.add_argument("--data-root", default=None, help=HELP_DATA_ROOT)
    b.add_argument("--split", default="test", help=HELP_SPLIT)
    b.add_argument("-n", type=int_at_least(1), default=200, help="number of samples (default 200)")
    b.add_argument("--norm", default="Linf", choices=[n.value for n in Norm], help=HELP_NORM)
    b.add_argument("--eps", default="0.1", help="the radius (one number, default 0.1)")
    b.add_argument("--suite", default="standard", type=suite_arg,
                   help="a suite or a comma list of attack names (default standard)")
    b.add_argument("--steps", type=int_at_least(1), default=20,
                   help="attack iterations (default 20; the native APGD units run 5x)")
    b.add_argument("--seed", type=int, default=0, help=HELP_SEED)
    b.add_argument("--batch-size", type=int_at_least(1), default=128, help="attack batch size (default 128)")
    b.add_argument("--save-adversarial", action="store_true",
                   help="write each checkpoint's worst-case adversarial examples (adversarial.pt, "
                        "the input of robustdeq judge)")
    b.add_argument("--no-checks", action="store_true",
                   help="skip the evaluation checks (gradient masking, non-convergence, ...); the cards "
                        "then list no check")
    b.add_argument("--no-progress", action="store_true", help=HELP_NO_PROGRESS)
    b.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args) -> int:
    """``robustdeq benchmark``: evaluate every checkpoint under one protocol, write a model
    card per checkpoint and the leaderboard under ``--out``, and print the leaderboard.
    Returns the exit status (0)."""
    from ..checkpoint import load_checkpoint
    from ..eval.card import benchmark_checkpoints
    eps = one_radius(args.eps, "benchmark (one model card per checkpoint)")
    out_folder(args.out)
    dataset = args.dataset or load_checkpoint(args.checkpoints[0]).metadata.get("dataset", "digits")
    with data_root_hint(dataset, args.data_root):
        cards = benchmark_checkpoints(args.checkpoints, args.out, dataset=dataset, split=args.split,
                                      root=args.data_root, n=args.n, eps=eps, threat=args.norm,
                                      suite=args.suite, save_adversarial=args.save_adversarial,
                                      steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                                      checks=not args.no_checks, progress=not args.no_progress)
    print((Path(args.out) / "leaderboard.md").read_text())
    print(f"wrote {len(cards)} model card(s) and leaderboard.md / leaderboard.json under {args.out}")
    return 0
