"""``robustdeq federate``: federated DEQ training in Flower's simulation engine."""
from __future__ import annotations

from ..registry import DATASETS, MODELS, SOLVERS, SUITES
from .common import (add_device_arg, device_of, int_at_least, json_arg, out_folder, positive_float, table,
                     HELP_DATA_ROOT, HELP_NO_PROGRESS, HELP_SEED)


def add_parser(sub) -> None:
    """Add the ``federate`` command and its options to the subparsers ``sub``."""
    f = sub.add_parser("federate", help="federated DEQ training on Flower (needs the 'federated' extra)")
    f.add_argument("--clients", type=int_at_least(1), default=8, help="number of simulated clients (default 8)")
    f.add_argument("--rounds", type=int_at_least(1), default=20, help="federated rounds (default 20)")
    f.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (label skew)")
    f.add_argument("--budgets", default="30", help="solver iteration budgets, cycled over the clients (e.g. 5,10,30)")
    f.add_argument("--solver", default="anderson", choices=SOLVERS.names(), help="the clients' forward solver (default anderson)")
    f.add_argument("--tol", type=positive_float, default=1e-3, help="the clients' solver tolerance")
    f.add_argument("--defense", default="none", help="local objective: a training recipe (see robustdeq train)")
    f.add_argument("--defense-options", default=None, help="JSON options of the local objective")
    f.add_argument("--fusion", default="fedavg", choices=["fedavg", "quality", "tolerance", "accuracy"],
                   help="fusion weights: n_k (fedavg) or n_k * q_k (quality: estimated distance from the "
                   "equilibrium; tolerance: residual vs tolerance; accuracy: local validation accuracy)")
    f.add_argument("--local-epochs", type=int_at_least(1), default=1,
                   help="epochs each client trains per round (default 1)")
    f.add_argument("--batch-size", type=int_at_least(1), default=32, help="the clients' batch size (default 32)")
    f.add_argument("--lr", type=positive_float, default=3e-3, help="the clients' learning rate (default 0.003)")
    f.add_argument("--model", default=None, help=f"zoo name ({', '.join(MODELS.names())}; default: mlp_deq, "
                   "or the architecture of a --defense that has its own, such as lyadeq)")
    f.add_argument("--model-options", default=None, help="JSON model options")
    f.add_argument("--dataset", default="digits", choices=[d for d in DATASETS.names() if d != "mnist5k"],
                   help="the data partitioned over the clients (default digits)")
    f.add_argument("--data-root", default=None, help=HELP_DATA_ROOT)
    f.add_argument("--eval-suite", default="quick", choices=["none"] + SUITES.names(),
                   help="attacks run on the global model after every round (none: clean accuracy only)")
    f.add_argument("--eval-samples", type=int_at_least(0), default=200, help="test samples attacked (0: all)")
    f.add_argument("--eps", type=positive_float, default=0.1, help="Linf radius of the per-round evaluation")
    f.add_argument("--steps", type=int_at_least(1), default=10, help="attack steps of the per-round evaluation")
    f.add_argument("--timeout", type=positive_float, default=600.0, help="seconds to wait for a round's replies")
    f.add_argument("--cpus", type=int_at_least(1), default=1, help="cores of the simulation engine (default 1)")
    f.add_argument("--seed", type=int, default=0, help=HELP_SEED)
    add_device_arg(f)
    f.add_argument("--out", required=True, help="output folder (summary.json, report.md, accuracy.png, checkpoint.pt, tb/)")
    f.add_argument("--no-progress", action="store_true", help=HELP_NO_PROGRESS)
    f.add_argument("--no-resume", action="store_true", help="start again even if the folder holds a run")
    f.set_defaults(func=cmd_federate)


def cmd_federate(args) -> int:
    """Federated DEQ training in Flower's simulation engine (the ``federated`` extra)."""
    from ..federated import FederatedConfig, parse_budgets
    from ..defenses.recipes import recipe
    from ..errors import ConfigError
    from ..federated.run import federate
    rec = recipe(args.defense, **json_arg(args.defense_options, "--defense-options"))
    if rec.model is not None and args.model is not None and args.model != rec.model:
        raise ConfigError(f"--defense {args.defense} trains its own architecture ({rec.model}), not "
                          f"--model {args.model}: drop --model or choose another defense")
    device = device_of(args)  # a device that is not there: said before anything is written
    out = out_folder(args.out)
    cfg = FederatedConfig.from_dict({
        "clients": args.clients, "rounds": args.rounds, "partition": args.partition,
        "budgets": parse_budgets(args.budgets), "solver": args.solver, "tol": args.tol,
        "defense": args.defense, "defense_options": json_arg(args.defense_options, "--defense-options"),
        "fusion": args.fusion, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
        "lr": args.lr, "dataset": args.dataset, "data_root": args.data_root, "model": args.model,
        **({"model_options": json_arg(args.model_options, "--model-options")} if args.model_options else {}),
        "seed": args.seed, "eval_suite": args.eval_suite, "eval_samples": args.eval_samples,
        "eval_eps": args.eps, "eval_steps": args.steps, "client_timeout": args.timeout, "device": device,
    })
    res = federate(cfg, out, progress=not args.no_progress, resume=not args.no_resume, cpus=args.cpus)
    rows = [[str(r["round"]), f"{r['accuracy']:.4f}",
             "n/a" if r.get("robust_accuracy") is None else f"{r['robust_accuracy']:.4f}",
             f"{r['bytes_up']:,}", f"{r['bytes_down']:,}",
             str(len(r["clients_dropped"]) + len(r["clients_rejected"]))] for r in res.rounds]
    print(table(rows, ["round", "accuracy", f"robust ({cfg.eval_threat.value} {cfg.eval_eps:g})",
                       "bytes up", "bytes down", "clients left out"]))
    print(f"\nwrote {out / 'summary.json'}, report.md, accuracy.png, checkpoint.pt and tb/ under {out}")
    return 0
