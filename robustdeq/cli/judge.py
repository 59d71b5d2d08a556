"""``robustdeq judge``: a checkpoint's accuracy on adversarial examples produced elsewhere."""
from __future__ import annotations

import json

from .common import HELP_CHECKPOINT


def add_parser(sub) -> None:
    """Add the ``judge`` command and its options to the subparsers ``sub``."""
    j = sub.add_parser("judge", help="a checkpoint's accuracy on adversarial examples produced elsewhere "
                                     "(refusing any outside the eps ball or [0, 1])")
    j.add_argument("checkpoint", help=HELP_CHECKPOINT)
    j.add_argument("adversarial", metavar="ADV.pt",
                   help="a torch file (read with weights_only=True) holding x_adv, eps, norm and either x "
                        "and y (clean inputs, labels) or dataset (+ split, indices)")
    j.add_argument("--data-root", default=None, help="folder of a dataset the file refers to")
    j.add_argument("--json", action="store_true", help="print the verdict as JSON")
    j.set_defaults(func=cmd_judge)


def cmd_judge(args) -> int:
    """``robustdeq judge``: a checkpoint's accuracy on a file of adversarial examples (with a
    95 % confidence interval), printed as a line or, with ``--json``, as JSON. Returns the exit
    status (0)."""
    from ..checkpoint import load_model
    from ..eval.card import judge_file
    model, _ = load_model(args.checkpoint)
    v = judge_file(model, args.adversarial, root=args.data_root)
    if args.json:
        print(json.dumps(v, indent=2))
        return 0
    print(f"{args.checkpoint} on {args.adversarial}: accuracy {100 * v['accuracy']:.2f} % "
          f"({v['correct']}/{v['n_samples']}; 95 % CI [{100 * v['ci'][0]:.1f} %, {100 * v['ci'][1]:.1f} %]) "
          f"under {v['norm']} eps = {v['eps']:g}; clean accuracy {100 * v['clean_accuracy']:.2f} %")
    return 0
