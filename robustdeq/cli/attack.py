"""``robustdeq attack``: one attack on a checkpoint; the adversarial examples are saved."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..registry import ATTACKS
from .common import add_eval_args, given, json_arg, load_for_eval, one_radius, table


def add_parser(sub) -> None:
    """Add the ``attack`` command and its options to the subparsers ``sub``."""
    a = sub.add_parser("attack", help="run one attack on a checkpoint and save the adversarial examples")
    add_eval_args(a, eps_default="0.1", steps_help=(
        "iterations: pgd and state take 20 by default; the other attacks their own budget (apgd-ce "
        "100, ...) unless --steps is given"))
    a.add_argument("--attack", default="pgd", choices=ATTACKS.names(),
                   help="an attack of robustdeq.registry.ATTACKS (default pgd)")
    a.add_argument("--grad", default=None, help="gradient for pgd/fgsm: ift, phantom, unrolled, full "
                   "(pgd on a DEQ with ift: the joint iteration where solves converge; "
                   "--options '{\"method\": \"exact\"}' for exact solves at every step)")
    a.add_argument("--options", default=None, help="JSON, other attack parameters")
    a.add_argument("--out", default="adversarial.pt",
                   help="file for the adversarial examples, the input of robustdeq judge (default adversarial.pt)")
    a.set_defaults(func=cmd_attack)


def cmd_attack(args) -> int:
    """``robustdeq attack``: run one attack on a checkpoint's evaluation samples, print clean
    and robust accuracy, and save the adversarial examples (with the attack's description and
    per-sample verdicts) to ``--out`` for ``robustdeq judge``. Returns the exit status (0)."""
    import torch
    from .. import attacks
    from ..attacks.base import correct_flags
    from ..errors import ConfigError
    from ..eval.card import ADV_SCHEMA
    eps = one_radius(args.eps, "attack")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; attack --out names the file to write")
    options = json_arg(args.options, "--options")
    model, x, y = load_for_eval(args)
    if args.attack == "torchattack":
        params = torchattack_params(options, eps=eps, norm=args.norm, steps=args.steps, seed=args.seed)
    else:
        both = [k for k in ("eps", "norm", "seed", "steps") if k in options and given(args, k)]
        if both:  # the JSON would silently override the flag
            raise ConfigError("--options: " + "; ".join(f"{k!r} is given by --{k} as well" for k in both))
        threat = [k for k in ("eps", "norm") if k in options]
        if threat:  # the file records the flags' threat model, which `robustdeq judge` checks
            raise ConfigError("--options: " + "; ".join(f"set {k!r} with --{k} (the examples file records "
                                                         f"--{k} for robustdeq judge)" for k in threat))
        params = {"eps": eps, "norm": args.norm, "seed": args.seed, **options}
        if args.attack in ("pgd", "state"):
            params.setdefault("steps", args.steps)
        elif given(args, "steps"):
            if not _takes(ATTACKS.get(args.attack), "steps"):
                raise ConfigError(f"--steps does not apply to --attack {args.attack} (it has no steps "
                                  "parameter; set its own budget in --options)")
            params["steps"] = args.steps
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
    # the one untargeted rule (a tie is wrong), as `robustdeq judge` and the evaluation
    robust_flags = correct_flags(model, x_adv, y)
    robust = float((robust_flags & correct_flags(model, x, y)).float().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    # the adversarial-examples file `robustdeq judge` reads, with the attack's description and
    # its per-sample verdicts as metadata
    torch.save({"schema": ADV_SCHEMA, "x_adv": x_adv.cpu(), "x": x.cpu(), "y": y.cpu(), "eps": float(eps),
                "norm": args.norm, "robust": robust_flags.cpu(),
                "attack": json.dumps(atk.describe(), default=str)}, out)
    print(table([[atk.name, f"{clean:.4f}", f"{robust:.4f}", f"{dt:.1f}"]],
                ["attack", "clean accuracy", "robust accuracy", "time (s)"]))
    print(f"\nwrote adversarial examples to {out} (robustdeq judge CHECKPOINT {out} re-judges them; "
          "load with torch.load(path, weights_only=True))")
    return 0


def _takes(cls, name: str) -> bool:
    """Whether the constructor of ``cls`` (or of a base class it forwards ``**options`` to) has
    the parameter ``name``."""
    import inspect
    return any(name in inspect.signature(k.__init__).parameters for k in cls.__mro__ if "__init__" in vars(k))


def torchattack_params(options: dict, *, eps: float, norm: str, steps: int, seed: int) -> dict:
    """Parameters of ``--attack torchattack``: the class named by ``options["attack"]`` gets
    ``--eps``, ``--norm`` and ``--steps`` only where it has such a parameter (and ``options`` does
    not set it); every other option is the class's own."""
    import inspect
    from ..attacks.bridge import resolve_class
    from ..errors import ConfigError
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
    from .._support import progress_reporter
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
