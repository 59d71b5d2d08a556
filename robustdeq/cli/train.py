"""``robustdeq train``: train a model from the zoo (defaults: the demo's recipe)."""
from __future__ import annotations

import json
from pathlib import Path

from ..demo import DEMO_MODEL, DEMO_TRAIN, default_model_options
from ..registry import DATASETS, MODELS, RECIPES
from .common import (add_device_arg, data_root_hint, device_of, int_at_least, json_arg, out_folder,
                     positive_float, refuse_flag_keys, HELP_DATA_ROOT, HELP_NO_PROGRESS, HELP_NO_RESUME, HELP_SEED)


def add_parser(sub) -> None:
    """Add the ``train`` command and its options to the subparsers ``sub``."""
    t = sub.add_parser("train", help="train a model from the zoo")
    t.add_argument("--model", default=None, help=f"zoo name ({', '.join(MODELS.names())})")
    t.add_argument("--model-options", default=None,
                   help='JSON, e.g. \'{"hidden": 64}\'; mlp_deq defaults to the demo\'s options '
                        + json.dumps(DEMO_MODEL["options"]))
    t.add_argument("--dataset", default="digits", choices=DATASETS.names(),
                   help="mnist5k: 5,000 real MNIST images (needs the 'data' extra)")
    t.add_argument("--data-root", default=None, help=HELP_DATA_ROOT)
    t.add_argument("--defense", default="none", help=", ".join(RECIPES.names()))
    t.add_argument("--defense-options", default=None, help="JSON options of the training objective")
    t.add_argument("--epochs", type=int_at_least(1), default=DEMO_TRAIN["epochs"],
                   help=f"default {DEMO_TRAIN['epochs']} (the demo's recipe)")
    t.add_argument("--batch-size", type=int_at_least(1), default=DEMO_TRAIN["batch_size"],
                   help=f"default {DEMO_TRAIN['batch_size']}")
    add_device_arg(t)
    t.add_argument("--lr", type=positive_float, default=DEMO_TRAIN["lr"],
                   help=f"learning rate (default {DEMO_TRAIN['lr']:g})")
    t.add_argument("--train-options", default=None, help="JSON, other TrainConfig options")
    t.add_argument("--out", required=True, help="output folder (checkpoint.pt, history.json, tb/)")
    t.add_argument("--seed", type=int, default=0, help=HELP_SEED)
    t.add_argument("--no-progress", action="store_true", help=HELP_NO_PROGRESS)
    t.add_argument("--no-resume", action="store_true", help=HELP_NO_RESUME)
    t.set_defaults(func=cmd_train)


# TrainConfig fields (and train_model's seed) that have a flag of their own in ``robustdeq train``
TRAIN_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "device": "--device",
               "seed": "--seed"}


def cmd_train(args) -> int:
    """``robustdeq train``: train a zoo model (or a recipe's own architecture) with a training
    recipe, write the checkpoint under ``--out`` and print the test accuracy. Returns the exit
    status (0); a ``TrainingError`` when no epoch was trained."""
    from .. import train
    from ..defenses.recipes import recipe
    from ..errors import ConfigError, TrainingError
    train_opts = json_arg(args.train_options, "--train-options")
    refuse_flag_keys(train_opts, TRAIN_FLAGS, "--train-options")
    rec = recipe(args.defense, **json_arg(args.defense_options, "--defense-options"))
    objective = rec.objective
    user_opts = json_arg(args.model_options, "--model-options")
    if rec.model is not None:
        if args.model is not None and args.model != rec.model:
            raise ConfigError(f"--defense {args.defense} trains its own architecture ({rec.model}), not "
                              f"--model {args.model}: drop --model or choose another defense")
        args.model = rec.model
    args.model = args.model or "mlp_deq"
    model_opts = {**default_model_options(args.model, args.dataset), **user_opts}
    out_folder(args.out)
    with data_root_hint(args.dataset, args.data_root):
        model, hist, _ = train.train_model(
            args.model, model_opts,
            {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "device": device_of(args),
             **train_opts},
            dataset=args.dataset, root=args.data_root, out_dir=args.out, objective=objective,
            progress=not args.no_progress, seed=args.seed, resume=not args.no_resume)
    if not hist:
        raise TrainingError(f"no epoch was trained and {args.out} holds none: no checkpoint was written")
    last = hist[-1]
    acc = last.get("val_accuracy")  # train_model validates on the test split every epoch
    acc_text = "not measured" if acc is None else f"{acc:.4f}"
    print(f"trained {args.model} on {args.dataset}: test accuracy {acc_text}; "
          f"checkpoint {Path(args.out) / 'checkpoint.pt'}")
    return 0
